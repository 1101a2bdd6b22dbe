"""A path opened once: what it is (folder, safetensors, pickle), its header, its unpickled object.

Every layer that used to take a path and open it again (``classify``, :func:`.io.load_lora`) takes
a :class:`Source` instead: the file is classified once, a safetensors header is parsed once, and a
pickle is unpickled at most once (``torch.load`` is by far the dearest step for a ``.ckpt``).
Nothing here imports torch until a pickle is read. A ``Source`` is an ``os.PathLike``, so code
that only needs the path (sizes, messages, same-file checks) takes it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import regular_file
from .headers import header_of
from .hub import resolve as resolve_hub
from .safetensors import Header
from .suffixes import PICKLE_SUFFIXES

FOLDER, SAFETENSORS, PICKLE = "folder", "safetensors", "pickle"


@dataclass(eq=False)
class Source:
    """One input, opened once; ``kind`` is "folder", "safetensors" or "pickle" (told from bytes
    for a file not named ``.safetensors`` or a pickle suffix, never from the name alone)."""

    path: Path
    kind: str
    _header: Header | None = field(default=None, repr=False)
    _unpickled: tuple[Any, list[str]] | None = field(default=None, repr=False)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def suffix(self) -> str:
        return self.path.suffix

    def header(self) -> Header:
        """The safetensors header (parsed on first use, then kept)."""
        if self._header is None:
            self._header = header_of(self.path)
        return self._header

    def unpickled(self) -> tuple[Any, list[str]]:
        """What the pickle holds with its ``state_dict`` wrappers taken off, and the names of the
        wrapper entries left behind (:func:`loratools.io.pickle.unwrap_state_dict`); unpickled
        on first use only."""
        if self._unpickled is None:
            from . import pickle as pickles  # torch is imported here, not before

            self._unpickled = pickles.unwrap_state_dict(pickles.load_pickle_raw(self.path))
        return self._unpickled


def _looks_safetensors(path: Path) -> bool:
    regular_file(path)  # a FIFO or device would block or stream forever in open()/read()
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def open_source(path: str | os.PathLike[str] | Source) -> Source:
    """``path`` opened once (an ``hf://`` reference is fetched first); a ``Source`` is returned as is.

    Only the kind is decided here (a stat and, for an unnamed file, nine bytes); headers and
    pickles are read when first asked for. A missing path is left to the caller's own message.
    """
    if isinstance(path, Source):
        return path
    local = resolve_hub(path)
    if local.is_dir():
        return Source(local, FOLDER)
    if local.suffix == ".safetensors":
        return Source(local, SAFETENSORS)
    if local.suffix in PICKLE_SUFFIXES or not local.exists() or local.stat().st_size == 0:
        return Source(local, PICKLE)
    return Source(local, SAFETENSORS if _looks_safetensors(local) else PICKLE)
