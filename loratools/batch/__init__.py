"""Many files at once: every file-in/file-out LoRA command over folders, globs and lists.

The unit of work is the existing Python API call of one command on one file
(:func:`loratools.ops.rescale.rescale`, :func:`~loratools.ops.resize.resize`,
:func:`~loratools.ops.convert.convert_lora`, :func:`~loratools.ops.blend.blend`,
:func:`loratools.report.inspect_lora`), registered in :mod:`.work`. :mod:`.plan` finds the inputs
and names the outputs, :mod:`.runner` runs the tasks (in this process, in a process pool, or as Ray
tasks through :mod:`.ray_engine`) and returns one :class:`~.records.Result` per file. See
docs/SCALE.md.
"""

from __future__ import annotations

from .plan import Task, discover, plan_tasks
from .records import EXIT_SOME_FAILED, RESULT_SCHEMA, Result
from .runner import default_jobs, run_tasks

__all__ = [
    "EXIT_SOME_FAILED",
    "RESULT_SCHEMA",
    "Result",
    "Task",
    "default_jobs",
    "discover",
    "plan_tasks",
    "run_tasks",
]
