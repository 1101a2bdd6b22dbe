"""Helpers for the many-files tests (batch, census, Ray): local sockets only, and a fake Hub.

tests/conftest.py's autouse ``_no_network`` makes every ``socket.connect`` fail. Worker pools
(a forkserver's Unix socket), Ray (127.0.0.1) and the loopback fake Hub need local sockets:
:func:`local_sockets` allows exactly those — AF_UNIX and the loopback addresses — and still
fails any other connection loudly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

# taken at import (collection), before any test's monkeypatching replaces them
_CONNECT = socket.socket.connect
_CREATE_CONNECTION = socket.create_connection
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _allowed(sock: socket.socket, address: object) -> bool:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    host = address[0] if isinstance(address, tuple) and address else None
    return host in LOOPBACK


def _connect(self: socket.socket, address: object) -> None:
    if not _allowed(self, address):
        raise AssertionError(f"a test tried to open a non-loopback connection: {address!r}")
    _CONNECT(self, address)  # type: ignore[arg-type]


def _create_connection(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
    if address[0] not in LOOPBACK:
        raise AssertionError(f"a test tried to open a non-loopback connection: {address!r}")
    return _CREATE_CONNECTION(address, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def local_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Opt in to Unix and loopback sockets (after conftest's ``_no_network`` refused them all)."""
    monkeypatch.setattr(socket.socket, "connect", _connect)
    monkeypatch.setattr(socket, "create_connection", _create_connection)
    yield
