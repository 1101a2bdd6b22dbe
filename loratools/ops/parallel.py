"""Run many small, independent per-module computations on every core.

Factor-space SVDs of LoRA modules are made of small matrix products and an r×r ``eigh``; MKL's
``eigh`` of that size runs on one thread, and torch's intra-op threads split the small products
poorly. Two modules at a time, each on one thread, keep both cores busy: the SD1.5 rank-128
resize spends 0.60 s in module work instead of 0.85 s on the 2-core reference box
(``bench/bench_rank.py``). Results are identical to a serial run with one intra-op thread: every
module is computed by the same op sequence on one thread, whichever worker takes it, so the
bits do not depend on the core count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from .. import threads
from .progress import announce_total

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it after (process-wide)."""
    with threads.torch_threads(count):
        yield


def map_modules(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads (default: :func:`loratools.threads.module_workers`), in order.

    Every call of ``fn`` runs with one intra-op thread (also with one worker, so results do not
    depend on the core count). While it runs, torch's intra-op thread count is 1 (process-wide, restored after), so other
    torch work in the process runs single-threaded meanwhile. The first exception, in item
    order, is raised once the items before it are done; ``progress(1)`` is called per result.
    """
    count = threads.module_workers(len(items)) if workers is None else workers
    announce_total(progress, len(items))  # a CLI bar (cli/progress.Meter) learns its total here
    results: list[R] = []
    if count <= 1 or len(items) < 2:
        with intra_op_threads(1):
            for item in items:
                results.append(fn(item))
                if progress:
                    progress(1)
        return results
    with intra_op_threads(1), ThreadPoolExecutor(min(count, len(items)), thread_name_prefix="loratools") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                results.append(future.result())
                if progress:
                    progress(1)
        finally:
            for future in futures:
                future.cancel()
    return results


def map_ordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    ahead: int | None = None,
) -> Iterator[R]:
    """``fn(x)`` for each item, yielded in item order, on ``workers`` single-threaded workers.

    Like :func:`map_modules` but lazy and bounded: at most ``ahead`` (default ``workers + 1``)
    items are in flight, so a stream of large inputs (extract's pairs of dense weights) keeps a
    few in memory at a time. ``items`` is consumed in order from the caller's thread only.
    """
    count = threads.module_workers() if workers is None else max(1, workers)
    window = max(1, ahead if ahead is not None else count + 1)
    with intra_op_threads(1):
        if count <= 1:
            for item in items:
                yield fn(item)
            return
        with ThreadPoolExecutor(count, thread_name_prefix="loratools") as pool:
            pending: list[Future[R]] = []
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) >= window:
                        yield pending.pop(0).result()
                while pending:
                    yield pending.pop(0).result()
            finally:
                for future in pending:
                    future.cancel()
