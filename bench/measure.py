"""Run one command in a child process; report its wall seconds and that child's peak RSS.

Each measurement goes through a fresh wrapper process (this file run as a script) whose only child
is the command, so ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in the wrapper is exactly the peak RSS
of that command (the largest of it and any descendants it waited for, e.g. ``cp`` under ``sh -c``)
and never a leftover from an earlier measurement. Linux reports ru_maxrss in KiB.

    python bench/measure.py -- cp a b        # prints {"wall_s": …, "maxrss_mib": …, "rc": 0}

    from measure import measure
    m = measure(["cp", "a", "b"])            # Measurement(wall_s=…, maxrss_mib=…, rc=0, stdout=…, stderr=…)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

WRAPPER = os.path.abspath(__file__)


@dataclass(frozen=True)
class Measurement:
    wall_s: float  # spawn to exit of the command, measured inside the wrapper
    maxrss_mib: float  # peak resident set of the command (ru_maxrss of the wrapper's children)
    rc: int
    stdout: str = ""
    stderr: str = ""


def measure(cmd: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None) -> Measurement:
    """Run ``cmd`` under a fresh wrapper process and return its wall time and peak RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="measure-") as result:
        proc = subprocess.run(
            [sys.executable, WRAPPER, "--result", result.name, "--", *cmd],
            capture_output=True,
            text=True,
            env=env,
        )
        raw = result.read()
    if not raw:
        raise RuntimeError(f"measure wrapper failed (rc {proc.returncode}): {proc.stderr.strip()}")
    data = json.loads(raw)
    m = Measurement(data["wall_s"], data["maxrss_mib"], data["rc"], proc.stdout, proc.stderr)
    if check and m.rc != 0:
        raise RuntimeError(f"command failed (rc {m.rc}): {' '.join(cmd)}\n{m.stderr.strip()}")
    return m


def _wrap(cmd: list[str]) -> dict[str, float | int]:
    start = time.perf_counter()
    rc = subprocess.call(cmd)  # stdout/stderr inherited: the caller captures them
    wall = time.perf_counter() - start
    maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "maxrss_mib": maxrss_kib / 1024, "rc": rc}


def main(argv: list[str]) -> int:
    result_path = None
    if argv[:1] == ["--result"]:
        result_path, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: measure.py [--result FILE] -- COMMAND [ARG …]", file=sys.stderr)
        return 2
    data = _wrap(argv)
    text = json.dumps(data)
    if result_path:
        with open(result_path, "w") as fh:
            fh.write(text)
    else:
        print(text, file=sys.stderr)
    return int(data["rc"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
