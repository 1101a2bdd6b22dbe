"""Shared fixtures: tiny checkpoints with the real SD1/SD2/SDXL key sets, in both layouts.

Generated once per test session from :mod:`loratools.synthetic` (real block and layer counts,
small widths); the same seed gives the same model in the single-file and diffusers layouts.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

# No test may touch the network: hub libraries are told they are offline before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
from helpers import FAMILY_NAMES, LAYOUTS, REAL_SKIP, under_ci

from loratools.synthetic import TINY, write_checkpoint


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Under CI a real-file test that skipped fails: CI has the files, so a skip there hides a lost check."""
    report: pytest.TestReport = yield
    if report.skipped and under_ci() and isinstance(report.longrepr, tuple) and REAL_SKIP in str(report.longrepr[2]):
        report.outcome = "failed"
        report.longrepr = f"CI=true but a real-file test skipped: {report.longrepr[2]}"
    return report


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_dir: Path) -> dict[tuple[str, str], Path]:
    """(family, layout) → path of a tiny fp32 checkpoint, seed 0."""
    paths = {}
    for family, spec in TINY.items():
        paths[(family, "single")] = write_checkpoint(spec, tiny_dir / f"{family}.safetensors", "single")
        paths[(family, "diffusers")] = write_checkpoint(spec, tiny_dir / f"{family}-diffusers", "diffusers")
    return paths


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test loudly instead of hanging on a closed network.

    Tests marked ``loopback`` may connect to 127.0.0.1 (a local server the test runs); any other
    address behaves like an unroutable one (blocks until the socket's timeout, then TimeoutError),
    so a timeout path is tested without a packet leaving the machine.
    """
    loopback = request.node.get_closest_marker("loopback") is not None
    real_connect, real_create = socket.socket.connect, socket.create_connection

    def unroutable(timeout: float | None) -> None:
        time.sleep(min(timeout if timeout is not None else 5.0, 5.0))
        raise TimeoutError("timed out (simulated unroutable address)")

    def connect(sock: socket.socket, address: object, *args: object) -> None:
        if loopback and isinstance(address, tuple) and address[0] == "127.0.0.1":
            return real_connect(sock, address)
        if loopback:
            return unroutable(sock.gettimeout())
        raise AssertionError(f"a test tried to open a network connection: {address!r}")

    def create_connection(address: tuple[str, int], timeout: float | None = None, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        if loopback and address[0] == "127.0.0.1":
            return real_create(address, timeout, *args, **kw)  # type: ignore[arg-type]
        if loopback:
            return unroutable(timeout)
        raise AssertionError(f"a test tried to open a network connection: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    try:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
