"""Running a batch's tasks: in this process, in a pool of worker processes, or on Ray.

Files are independent, so the parallelism is over files: ``jobs`` worker processes, each doing
one file at a time with **one** intra-op torch thread (``torch.set_num_threads(1)`` in every
worker), so ``-j 2`` keeps two cores busy without four threads fighting over them. ``jobs=1``
runs in this process with the command's usual threads (the single-file command's path, bit for
bit: :mod:`loratools.ops.parallel` computes every module on one thread whatever the count).

A worker that dies (a crash, the OOM killer) takes only its own file down: the pool is rebuilt,
the files it had in flight are retried, and a file that kills a worker twice is a failed row.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from ..threads import file_workers
from .plan import Task
from .records import Result
from .work import run_task

MAX_ATTEMPTS = 2  # a file whose own worker dies this many times (alone in its pool) is failed


def default_jobs(tasks: int) -> int:
    """``-j`` when not given: :func:`loratools.threads.file_workers` (the free cores, never more
    than there are files)."""
    return file_workers(tasks)


def _init_worker(settings: dict[str, str]) -> None:
    """Each worker does one file at a time on one intra-op thread, with the parent's current
    ``LORATOOLS_*`` settings (a forkserver's children inherit the server's environment, which
    may be older than the parent's)."""
    os.environ.update(settings)
    os.environ["OMP_NUM_THREADS"] = "1"
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a clean server process that has imported loratools and torch
    once, never from a parent whose torch thread pools may already run (fork would copy them)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["loratools.batch.work", "torch"])
        return ctx
    return multiprocessing.get_context("spawn")  # pragma: no cover - not POSIX


def run_tasks(
    tasks: list[Task],
    *,
    jobs: int = 1,
    engine: str = "local",
    address: str | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run every task; one :class:`Result` per task, in task order. ``progress(result)`` is called
    as each finishes. ``engine``: ``"local"`` (this machine, ``jobs`` processes) or ``"ray"``
    (Ray tasks on the cluster at ``address``, a local one when None; see :mod:`.ray_engine`)."""
    if engine == "ray":
        from .ray_engine import run_on_ray

        return run_on_ray(tasks, address=address, progress=progress)
    if engine != "local":
        raise ValueError(f"unknown engine {engine!r}")
    if jobs <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(run_task(task))
            if progress:
                progress(results[-1])
        return results
    return _run_pool(tasks, jobs, progress)


def _run_pool(tasks: list[Task], jobs: int, progress: Callable[[Result], None] | None) -> list[Result]:
    """All tasks in one pool; the files in flight when a worker died are then retried one at a
    time, each in a pool of its own, so the file that kills its worker is known (a bystander is
    never charged) and is failed after :data:`MAX_ATTEMPTS` deaths of its own."""
    settings = {k: v for k, v in os.environ.items() if k.startswith("LORATOOLS_")}
    # Outputs already on disk before this run: a retry that finds an output not in this set finds
    # the work of its own lost attempt (a bystander whose worker finished writing just as the
    # pool broke), which is "ok", not "skipped".
    preexisting = {i for i, task in enumerate(tasks) if task.output is not None and os.path.lexists(task.output)}
    done: dict[int, Result] = {}
    crashed = _pool_round(tasks, list(range(len(tasks))), jobs, settings, done, progress, attempt=1)
    for i in crashed:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if not _pool_round(
                tasks, [i], 1, settings, done, progress, attempt=attempt + 1, written_here=i not in preexisting
            ):
                break
        else:
            task = tasks[i]
            done[i] = Result(
                task.command,
                task.source,
                task.output,
                "failed",
                attempts=MAX_ATTEMPTS + 1,
                error="its worker process died (killed or crashed) on every attempt",
                exit_code=70,
            )
            if progress:
                progress(done[i])
    return [done[i] for i in range(len(tasks))]


def _pool_round(
    tasks: list[Task],
    indices: list[int],
    jobs: int,
    settings: dict[str, str],
    done: dict[int, Result],
    progress: Callable[[Result], None] | None,
    *,
    attempt: int,
    written_here: bool = False,
) -> list[int]:
    """Run ``indices`` in one pool, filling ``done``; returns those whose worker died.
    ``written_here``: the (retried) outputs did not exist before the run, so one found complete
    now was written by this run's lost attempt."""
    crashed: list[int] = []
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(indices)), mp_context=_context(), initializer=_init_worker, initargs=(settings,)
    ) as pool:
        futures: dict[Future[Result], int] = {pool.submit(run_task, tasks[i], attempt=attempt): i for i in indices}
        for future in as_completed(futures):
            i = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                crashed.append(i)
                continue
            except Exception as exc:  # pickling trouble and the like: still this file's row only
                task = tasks[i]
                result = Result(
                    task.command,
                    task.source,
                    task.output,
                    "failed",
                    error=f"internal error: {type(exc).__name__}: {exc}",
                    exit_code=70,
                )
            if written_here and result.status == "skipped":
                result.status = "ok"
            done[i] = result
            if progress:
                progress(result)
    return sorted(crashed)
