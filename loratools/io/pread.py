"""Exact reads of a byte span of a file: the one ``preadv`` loop, and its truncation error.

``preadv`` may return fewer bytes than asked (large spans, signals), so every read loops until the
span is full; a read that returns nothing means the file ended early — it shrank after its header
was checked against its size — and that is a :class:`~loratools.errors.CorruptFileError` naming
the file. Torch-free (numpy only where :func:`read_span` makes its buffer): the numpy paths
(``inspect --norms``, resize without torch) read through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CorruptFileError


def read_exact(fd: int, view: memoryview, offset: int, path: str | os.PathLike[str]) -> None:
    """Fill ``view`` (a writable byte view) with the bytes of open file ``fd`` from ``offset``.

    Raises :class:`CorruptFileError` (``path``'s name in the text) when the file ends first.
    """
    done = 0
    size = len(view)
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptFileError(f"{Path(path).name}: file ended while reading tensor data (truncated)")
        done += got


def read_span(path: str | os.PathLike[str], offset: int, size: int) -> memoryview:
    """``size`` bytes of the file at ``path`` from ``offset``, in a fresh buffer (see :func:`read_exact`)."""
    import numpy as np

    buffer = np.empty(size, dtype=np.uint8)  # not zero-filled: the read overwrites every byte
    view = buffer.data.cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, view, offset, path)
    finally:
        os.close(fd)
    return view


class SpanRead:
    """:func:`read_span` on a background thread, started now; :meth:`result` waits for it.

    ``preadv`` releases the GIL, so the copy out of the page cache (0.1 s for a 151 MB LoRA) runs
    on a second core while the caller parses headers in Python. A read nobody collects is left to
    finish on its own (a daemon thread): its buffer is freed with this object.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, size: int) -> None:
        import threading

        self._view: memoryview | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, offset, size), daemon=True)
        self._thread.start()

    def _run(self, path: str | os.PathLike[str], offset: int, size: int) -> None:
        try:
            self._view = read_span(path, offset, size)
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._error = exc

    def result(self) -> memoryview:
        """The bytes read; raises what the read raised (:class:`CorruptFileError` for a short file)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._view is not None
        return self._view
