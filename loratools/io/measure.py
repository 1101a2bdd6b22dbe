"""Dry runs below the CLI: while :func:`measuring` is active, writers add up what they would write.

A writer asked to write ``path`` during a dry run checks the destination as it would, computes the
file's bytes from its plan (names, dtypes, shapes, metadata: io/safetensors.py ``build_header``)
and records them here instead of creating anything, not even a temporary file. The tally lives in
a context variable, so the commands' own code paths are the ones measured: there is no second
description of what a command writes that could drift from the first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tally:
    """The files a dry run would write (path → bytes), in the order the writers reached them."""

    files: dict[Path, int] = field(default_factory=dict)

    def add(self, path: str | os.PathLike[str], nbytes: int) -> None:
        """Record ``nbytes`` at ``path`` (a second write of the same path replaces the first, as on disk)."""
        self.files[Path(path)] = nbytes

    @property
    def total(self) -> int:
        return sum(self.files.values())


_ACTIVE: ContextVar[Tally | None] = ContextVar("loratools_dry_run", default=None)


@contextmanager
def measuring() -> Iterator[Tally]:
    """Make every writer reached inside the block record its bytes in the yielded tally, writing nothing."""
    tally = Tally()
    token = _ACTIVE.set(tally)
    try:
        yield tally
    finally:
        _ACTIVE.reset(token)


def active() -> Tally | None:
    """The tally of the dry run in progress, or None when writes are real."""
    return _ACTIVE.get()


def text_bytes(text: str) -> int:
    """Bytes ``Path.write_text(text)`` puts on disk (UTF-8, as the writers' JSON is)."""
    return len(text.encode("utf-8"))


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a folder (links followed, as copies follow them)."""
    path = Path(path)
    if path.is_dir():
        return sum(
            os.stat(Path(top) / name).st_size for top, _, names in os.walk(path, followlinks=True) for name in names
        )
    return path.stat().st_size if path.exists() else 0
