"""The command run in a child process, for signals (and for inputs that may hang).

Children are forked from a ``forkserver`` that has already imported torch and loratools, so a
child starts in tens of milliseconds instead of the ~2 s a fresh interpreter takes; each is still a
separate process that receives a real SIGTERM/SIGINT. The child slows the writer down (every
tensor written sleeps) and creates ``marker`` at the first one, so the parent can signal it while
a temporary output is half-written.
"""

from __future__ import annotations

import _socket
import contextlib
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_CONTEXT: list[Any] = []


def context() -> Any:
    """The forkserver context, its server preloaded with torch and the CLI (started on first use)."""
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "loratools.cli.main", "loratools.ops.merge", __name__])
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


@contextlib.contextmanager
def local_sockets_allowed() -> Iterator[None]:
    """Let AF_UNIX connections through a test's no-network guard (tests/conftest.py).

    The forkserver hands out children over a UNIX socket; every other connection still meets the
    guard, so no test can reach a network through this.
    """
    guarded = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX:
            return _socket.socket.connect(self, address)
        return guarded(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = guarded  # type: ignore[method-assign]


def run(argv: list[str], marker: str, stdout: str, stderr: str) -> None:
    """Child body: output to files, writer slowed down, then the CLI exactly as ``loratools`` runs it."""
    import sys

    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    from loratools.io import safetensors as st

    def slowed(original: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: object, *args: object, **kwargs: object) -> None:
            if not os.path.exists(marker):
                Path(marker).touch()
            time.sleep(0.2)  # the signal arrives in here, with the temporary file half-written
            original(self, *args, **kwargs)

        return wrapper

    st.StreamingWriter.write = slowed(st.StreamingWriter.write)  # type: ignore[method-assign]
    st.StreamingWriter.copy_raw = slowed(st.StreamingWriter.copy_raw)  # type: ignore[method-assign]
    st.StreamingWriter.write_bytes = slowed(st.StreamingWriter.write_bytes)  # type: ignore[method-assign]  # numpy path
    from loratools.cli.main import main

    sys.argv = ["loratools", *argv]
    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
