"""The per-file work of every batchable command: one existing API call per file.

:data:`WORK` maps a command name to a function ``(source, output, options, overwrite) -> report``
that calls the command's Python API on one file and returns its report as JSON-ready data. Adding
a command to batch is one entry here (plus ``@batchable`` on its click command, which passes the
command's parsed options through unchanged). :func:`run_task` is what every engine runs: it never
raises — a file's failure becomes its :class:`~.records.Result` — and it skips an output that is
already complete, so a retried or repeated task leaves exactly one output.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LoratoolsError
from .complete import is_complete, output_bytes, remove_leftovers
from .plan import Task
from .records import Result

Work = Callable[[str, "str | None", dict[str, Any], bool], dict[str, Any]]
RULE_NAMES = ("rank", "conv_rank", "sv_ratio", "sv_fro", "sv_cumulative", "min_rank", "max_rank")
EXIT_INTERNAL = 70


def _rules(options: dict[str, Any]) -> dict[str, Any]:
    return {n: options.get(n) for n in RULE_NAMES}


def _common(options: dict[str, Any]) -> dict[str, Any]:
    return {"to": options.get("to"), "dtype": options.get("dtype"), "family": options.get("family")}


def work_rescale(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.ops.rescale.rescale` on one file."""
    from ..ops.rescale import rescale

    assert output is not None
    return rescale(source, output, options["by"], **_common(options), overwrite=overwrite).to_dict()


def work_resize(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.ops.resize.resize` on one file."""
    from ..ops.resize import resize

    assert output is not None
    return resize(source, output, **_rules(options), **_common(options), overwrite=overwrite).to_dict()


def work_blend(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.ops.blend.blend` of one file (weight ``weight``) with the fixed ``partner``."""
    from ..ops.blend import blend

    assert output is not None
    sources: list[Any] = [(source, float(options.get("weight", 1.0))), options["partner"]]
    report = blend(
        sources,
        output,
        mode=options.get("mode", "concat"),
        **_rules(options),
        metadata=options.get("metadata_policy", "keep-first"),
        **_common(options),
        overwrite=overwrite,
    )
    return report.to_dict()


def work_convert(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.ops.convert.convert_lora` on one file (LoRAs only; checkpoints are refused)."""
    from ..classify import classify
    from ..errors import InputError
    from ..ops.convert import convert_lora

    assert output is not None
    if classify(source) != "lora":
        raise InputError(f"{source}: a checkpoint, not a LoRA (batch convert is for LoRAs)")
    target = options.get("target") or "kohya"
    report = convert_lora(
        source,
        output,
        target,
        family=options.get("family"),
        dtype=options.get("dtype"),
        bake_scale=bool(options.get("bake")),
        to_lora=bool(options.get("to_lora")),
        rank=options.get("rank"),
        error=options.get("error"),
        overwrite=overwrite,
    )
    return dict(report.__dict__)


def work_inspect(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.report.inspect_lora` (or ``inspect_checkpoint``) on one file; writes nothing."""
    from ..classify import classify
    from ..report import inspect_checkpoint, inspect_lora

    hashes, keys = bool(options.get("hashes")), bool(options.get("keys"))
    if classify(source) == "lora":
        norms = bool(options.get("norms"))
        return inspect_lora(source, family=options.get("family"), norms=norms, hashes=hashes, keys=keys).to_dict()
    return inspect_checkpoint(source, family=options.get("family"), hashes=hashes, keys=keys).to_dict()


def work_check(source: str, output: str | None, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """:func:`loratools.check.check_lora` on one file; writes nothing."""
    from ..check import check_lora

    target = options.get("target") or "all"
    return check_lora(source, target, base=options.get("base"), family=options.get("family")).to_dict()


WORK: dict[str, Work] = {
    "rescale": work_rescale,
    "resize": work_resize,
    "blend": work_blend,
    "convert": work_convert,
    "inspect": work_inspect,
    "check": work_check,
}
READ_ONLY = frozenset({"inspect", "check"})  # commands that write no output file


def output_suffix(command: str, options: dict[str, Any]) -> str:
    """The suffix of a command's outputs: none for a peft adapter folder, ``.safetensors`` otherwise."""
    target = options.get("target") if command == "convert" else options.get("to")
    return "" if target == "peft" else ".safetensors"


def _fault_hook(task: Task) -> None:
    """Test hook (``LORATOOLS_BATCH_KILL_ONCE=<folder>``): the first attempt at each file leaves a
    half-written temporary beside its output and kills its own process, as an OOM kill or a lost
    node would; later attempts find the marker and run normally."""
    folder = os.environ.get("LORATOOLS_BATCH_KILL_ONCE")
    if not folder or task.output is None or not os.path.isdir(folder):
        return  # not set, or set but not armed (the folder does not exist)
    marker = Path(folder) / (Path(task.source).name + ".killed")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    out = Path(task.output)
    (out.parent / f".{out.name}.killed.partial").write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)


def run_task(task: Task, *, attempt: int = 1) -> Result:
    """Run one task to a :class:`Result`; never raises for the file's own failures."""
    start = time.perf_counter()

    def result(status: str, **fields: Any) -> Result:
        return Result(
            task.command, task.source, task.output, status, time.perf_counter() - start, attempts=attempt, **fields
        )

    try:
        if task.output is not None and os.path.lexists(task.output) and not task.overwrite:
            if is_complete(task.output):
                remove_leftovers(task.output)
                return result("skipped", output_bytes=output_bytes(task.output))
            return result(
                "failed", error=f"{task.output}: exists and is not a complete output (pass --overwrite)", exit_code=3
            )
        _fault_hook(task)
        work = WORK[task.command]
        report = work(task.source, task.output, dict(task.options), task.overwrite)
        size = None
        if task.output is not None:
            remove_leftovers(task.output)
            size = output_bytes(task.output)
        return result("ok", output_bytes=size, report=report)
    except LoratoolsError as exc:
        return result("failed", error=exc.one_line(), exit_code=exc.exit_code)
    except MemoryError:
        return result("failed", error="out of memory", exit_code=EXIT_INTERNAL)
    except Exception as exc:  # a bug met on one file: that file's row, never the whole run
        message = " ".join(str(exc).split())[:300]
        return result("failed", error=f"internal error: {type(exc).__name__}: {message}", exit_code=EXIT_INTERNAL)
