"""Progress bars on stderr, quiet when not a terminal or when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console

if TYPE_CHECKING:  # rich.progress (~10 ms, more on a busy box) loads only when a bar is drawn
    from rich.progress import Progress, ProgressColumn, TaskID


@contextmanager
def byte_progress(
    console: Console, label: str, *, enabled: bool = True, total: int | None = None
) -> Iterator[Callable[[int], None]]:
    """A bar counting bytes; yields the ``advance(nbytes)`` callback the library ops accept."""
    stderr = Console(stderr=True)
    if not enabled or not stderr.is_terminal:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


class Meter:
    """``advance(n)`` callback of a counting bar; ``set_total(n)`` is called by the op once it knows n.

    ops/parallel.map_modules calls ``set_total(len(items))`` on any progress callback that has it,
    so every per-module op (resize, blend, …) gets a bar with a total without a second pass.
    """

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def set_total(self, total: int) -> None:
        """The bar's total (the op calls it before its first ``advance``)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)


class PhaseMeter(Meter):
    """A :class:`Meter` for a command that runs several ops in turn (``inspect --norms --hashes``):
    each ``set_total`` starts the bar over with that op's total (modules, or bytes)."""

    def set_total(self, total: int) -> None:
        """Start the bar over at 0 of ``total``."""
        if self._progress is not None and self._task is not None:
            self._progress.reset(self._task, total=total)


M = TypeVar("M", bound=Meter)


@contextmanager
def _meter_bar(
    label: str, enabled: bool, columns: Callable[[], tuple[ProgressColumn, ...]], meter: type[M]
) -> Iterator[M]:
    """A transient bar of ``columns()`` on stderr (a terminal only), driven through ``meter``."""
    stderr = Console(stderr=True)
    if not enabled or not stderr.is_terminal:
        yield meter(None, None)
        return
    from rich.progress import Progress

    with Progress(*columns(), console=stderr, transient=True) as progress:
        yield meter(progress, progress.add_task(label, total=None))


@contextmanager
def module_progress(label: str, *, enabled: bool = True) -> Iterator[Meter]:
    """A bar counting modules on stderr (a terminal only); the op sets its total through :class:`Meter`."""

    def columns() -> tuple[ProgressColumn, ...]:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        return (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())

    with _meter_bar(label, enabled, columns, Meter) as meter:
        yield meter


@contextmanager
def phase_progress(label: str, *, enabled: bool = True) -> Iterator[PhaseMeter]:
    """A percentage bar on stderr (a terminal only) restarted by each op's total; see :class:`PhaseMeter`."""

    def columns() -> tuple[ProgressColumn, ...]:
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn

        return (TextColumn(label), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())

    with _meter_bar(label, enabled, columns, PhaseMeter) as meter:
        yield meter
