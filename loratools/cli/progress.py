"""Progress bars on stderr, quiet when not a terminal or when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


@contextmanager
def byte_progress(
    console: Console, label: str, *, enabled: bool = True, total: int | None = None
) -> Iterator[Callable[[int], None]]:
    """A bar counting bytes; yields the ``advance(nbytes)`` callback the library ops accept."""
    stderr = Console(stderr=True)
    if not enabled or not stderr.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
