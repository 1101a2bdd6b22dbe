"""One record per file of a batch, and the exit status of the whole run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_SCHEMA = "loratools.batch.result/1"
# Exit status when at least one file failed and the others were done (0: every file succeeded or
# was skipped as already complete; 1-3/70 keep their meaning for errors that stop the whole run).
EXIT_SOME_FAILED = 4

STATUSES = ("ok", "skipped", "failed", "planned")

RESULT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": RESULT_SCHEMA,
    "type": "object",
    "required": ["schema", "command", "file", "output", "status", "seconds", "output_bytes", "error"],
    "properties": {
        "schema": {"const": RESULT_SCHEMA},
        "command": {"type": "string"},
        "file": {"type": "string"},
        "output": {"type": ["string", "null"]},
        "status": {"enum": list(STATUSES)},
        "seconds": {"type": "number", "minimum": 0},
        "output_bytes": {"type": ["integer", "null"], "minimum": 0},
        "error": {"type": ["string", "null"]},
        "exit_code": {"type": "integer"},
        "report": {"type": ["object", "null"]},
        "attempts": {"type": "integer", "minimum": 1},
    },
}


@dataclass
class Result:
    """What happened to one input file."""

    command: str
    file: str
    output: str | None
    status: str  # ok | skipped (output already complete) | failed | planned (--dry-run)
    seconds: float = 0.0
    output_bytes: int | None = None
    error: str | None = None  # the one-line reason when failed
    exit_code: int = 0  # the single-file command's exit status for this file
    report: dict[str, Any] | None = field(default=None, repr=False)  # the op's own report, as JSON
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RESULT_SCHEMA, **asdict(self)}


def exit_status(results: list[Result]) -> int:
    """0 when every file succeeded (or was already complete), :data:`EXIT_SOME_FAILED` otherwise."""
    return EXIT_SOME_FAILED if any(r.status == "failed" for r in results) else 0
