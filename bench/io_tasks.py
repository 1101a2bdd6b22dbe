"""The Python sides of bench_io.py, one per child process (so each one's peak RSS is its own).

    python bench/io_tasks.py startup               # interpreter + imports only (the RSS/time floor)
    python bench/io_tasks.py naive SRC DST         # safetensors load_file + save_file
    python bench/io_tasks.py convert SRC DST       # loratools.ops.checkpoint.convert_checkpoint
    python bench/io_tasks.py rawcopy SRC DST       # SafetensorsFile + StreamingWriter.copy_raw

The last stdout line is JSON: ``inner_s`` (seconds of the work itself, after imports) and ``impl``.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import loratools
from loratools.io.safetensors import SafetensorsFile, StreamingWriter


def rawcopy(src: str, dst: str) -> dict[str, object]:
    """Same layout, same dtype: every tensor copied as raw bytes (copy_file_range), header rebuilt."""
    with SafetensorsFile(src) as source:
        plan = dict(source.header.tensors)
        with StreamingWriter(dst, plan, source.metadata or None) as writer:
            for name in plan:
                writer.copy_raw(name, source)
    return {"impl": "local: SafetensorsFile + StreamingWriter.copy_raw", "raw_copied": len(plan)}


def convert(src: str, dst: str) -> dict[str, object]:
    """loratools' own streaming copy, or the local equivalent while convert_checkpoint does not exist."""
    try:
        from loratools.ops.checkpoint import convert_checkpoint
    except Exception as exc:  # not written yet, or mid-edit
        result = rawcopy(src, dst)
        result["impl"] = f"FALLBACK ({type(exc).__name__}: {exc}) → {result['impl']}"
        return result
    params = inspect.signature(convert_checkpoint).parameters
    missing = [p for p in ("layout", "dtype", "overwrite", "progress") if p not in params]
    if missing:
        result = rawcopy(src, dst)
        result["impl"] = f"FALLBACK (convert_checkpoint lacks {missing}) → {result['impl']}"
        return result
    report = convert_checkpoint(src, dst)
    out: dict[str, object] = {"impl": "loratools.ops.checkpoint.convert_checkpoint"}
    for field in ("tensors_written", "raw_copied", "bytes_written", "family", "source_layout", "output_layout"):
        if hasattr(report, field):
            out[field] = getattr(report, field)
    return out


def naive(src: str, dst: str) -> dict[str, object]:
    import safetensors.torch  # the naive way needs torch; loratools' raw copy does not import it

    tensors = safetensors.torch.load_file(src)
    safetensors.torch.save_file(tensors, dst)
    return {"impl": f"safetensors {safetensors.__version__} load_file + save_file", "tensors": len(tensors)}


def startup() -> dict[str, object]:
    return {
        "impl": f"python {sys.version.split()[0]}, loratools at {Path(loratools.__file__).parent} (torch not imported)"
    }


TASKS = {"naive": naive, "convert": convert, "rawcopy": rawcopy, "startup": startup}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TASKS:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = TASKS[argv[0]](*argv[1:])
    result["inner_s"] = time.perf_counter() - start
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
