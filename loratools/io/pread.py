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
