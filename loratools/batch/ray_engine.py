"""The batch's tasks as Ray tasks: the same :func:`~.work.run_task` per file, on a cluster.

``ray.init(address)`` joins a running cluster (``"auto"``: the one this machine belongs to) or,
with no address, starts a local one. Each file is one task needing one CPU; its worker sets one
intra-op torch thread. Ray retries a task whose worker died (``max_retries``); outputs are written
atomically and :func:`~.work.run_task` skips an output that is already complete, so a retry never
leaves a second or a half-written file. Every task must see the same paths (a shared filesystem
on a real cluster). Results come back to the driver and make the same summary and ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InputError
from .plan import Task
from .records import Result
from .work import run_task

MAX_RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray", hint="pip install 'loratools[ray]'") from None
    return ray


def _one_file(task: Task) -> Result:
    """A Ray worker's side: one intra-op thread, then the same run_task as the local engine."""
    import torch

    torch.set_num_threads(1)
    return run_task(task)


def run_on_ray(
    tasks: list[Task], *, address: str | None = None, progress: Callable[[Result], None] | None = None
) -> list[Result]:
    """Run ``tasks`` as Ray tasks; one :class:`Result` per task, in task order."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"--engine ray: cannot reach a Ray cluster at {address or 'a new local one'} ({exc})"
            ) from None
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_one_file)
    refs = [remote.remote(task) for task in tasks]
    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, Result] = {}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        for ref in ready:
            i = index[ref]
            try:
                result = ray.get(ref)
            except Exception as exc:  # a task out of retries (its worker kept dying): its row only
                task = tasks[i]
                message = " ".join(str(exc).split())[:300]
                result = Result(
                    task.command,
                    task.source,
                    task.output,
                    "failed",
                    attempts=MAX_RETRIES + 1,
                    error=f"Ray task failed: {type(exc).__name__}: {message}",
                    exit_code=70,
                )
            results[i] = result
            if progress:
                progress(result)
    return [results[i] for i in range(len(tasks))]
