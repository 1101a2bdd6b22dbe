"""Busy-box benchmark: every full-size operation quiet and with both cores kept busy.

    python bench/make_data.py --only sd15-fp16.safetensors sd15-r128-kohya.safetensors sdxl-r32-kohya.safetensors
    python bench/make_tuned.py
    python bench/bench_busy.py --runs 3                 # all operations
    python bench/bench_busy.py --only resize blend      # some

Each operation is the real command line in a child process (``bench/measure.py``), run quiet and
then with one spinning process per core (``python3 -c 'while True: pass'``) that this script starts
before and stops after the busy runs. Quiet and busy runs alternate (quiet, busy, quiet, busy …)
so drift affects both alike; each cell is the minimum over ``--runs``. ``--threads 1`` rows give
the single-thread reference (goal: default threads never slower than one thread when quiet).
The issue-18 goal: busy ≤ 2.5× quiet for every operation (a fair share of two busy cores is 2×).
The load average is printed at start and end; compare rows only within one table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import measure

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL = 2.5


def operations(data: Path, out: Path) -> dict[str, list[str]]:
    """Operation name → loratools arguments (full-size SD1.5/SDXL inputs from bench/make_*.py)."""
    base, tuned = data / "sd15-fp16.safetensors", data / "sd15-tuned-fp16.safetensors"
    lora, xl = data / "sd15-r128-kohya.safetensors", data / "sdxl-r32-kohya.safetensors"
    return {
        "merge": ["merge", str(base), f"{lora}:0.8", "-o", str(out / "merged.safetensors"), "--overwrite"],
        "resize": ["resize", str(lora), "--rank", "32", "-o", str(out / "r32.safetensors"), "--overwrite"],
        "blend": [
            "blend",
            str(lora),
            f"{lora}:0.5",
            "--mode",
            "svd",
            "--rank",
            "64",
            "-o",
            str(out / "blend.safetensors"),
            "--overwrite",
        ],
        "extract": ["extract", str(base), str(tuned), "--rank", "64", "-o", str(out / "ex.safetensors"), "--overwrite"],
        "inspect --norms": ["inspect", str(xl), "--norms"],
        "convert --to-lora": [
            "convert",
            str(lora),
            str(out / "tolora.safetensors"),
            "--to-lora",
            "--rank",
            "32",
            "--overwrite",
        ],
    }


def spinners(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that keep one core each busy until stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("LORATOOLS_BENCH_DIR", str(HERE / "data")))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="operation names (default: all whose inputs exist)")
    parser.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)), help="spinning processes")
    parser.add_argument("--no-single", action="store_true", help="leave out the --threads 1 rows")
    args = parser.parse_args(argv)
    data = Path(args.data)
    out = Path(tempfile.mkdtemp(prefix="bench_busy-", dir=data))
    ops = operations(data, out)
    chosen = args.only or list(ops)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "loratools.cli.main"]
    print(f"load average at start: {os.getloadavg()}  cores: {len(os.sched_getaffinity(0))}  runs: {args.runs}")
    rows = []
    for name in chosen:
        inputs = [a for a in ops[name] if a.startswith(str(data)) and "bench_busy-" not in a]
        missing = [a for a in inputs if not Path(a.split(":")[0]).exists()]
        if missing:
            print(f"skip {name}: missing {missing[0]}")
            continue
        variants = {"default": []} if args.no_single else {"default": [], "--threads 1": ["--threads", "1"]}
        for label, extra in variants.items():
            cmd = [*cli, *ops[name], *extra]
            quiet, busy = [], []
            for _ in range(args.runs):
                quiet.append(measure(cmd, env=env).wall_s)
                procs = spinners(args.busy)
                time.sleep(0.3)  # let the spinners take their cores
                try:
                    busy.append(measure(cmd, env=env).wall_s)
                finally:
                    stop(procs)
            rows.append((name, label, min(quiet), min(busy)))
            print(f"  {name} {label}: quiet {min(quiet):.2f} s, busy {min(busy):.2f} s", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print()
    print("| operation | threads | quiet s (min) | busy s (min) | busy / quiet | goal ≤ 2.5× |")
    print("|---|---|---:|---:|---:|---|")
    for name, label, q, b in rows:
        print(f"| {name} | {label} | {q:.2f} | {b:.2f} | {b / q:.2f}× | {'met' if b / q <= GOAL else 'NOT met'} |")
    singles = {r[0]: r for r in rows if r[1] == "--threads 1"}
    for name, label, q, _ in rows:
        if label == "default" and name in singles:
            ratio = q / singles[name][2]
            print(f"{name}: quiet default / quiet one thread = {ratio:.2f} ({'ok' if ratio <= 1.05 else 'SLOWER'})")
    for path in out.iterdir():
        if path.is_file():
            path.unlink()
        else:
            import shutil

            shutil.rmtree(path)
    out.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
