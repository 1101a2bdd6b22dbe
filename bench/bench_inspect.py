"""inspect benchmark: the issue-7 goals on the full-size SDXL rank-32 kohya LoRA (228 MB).

    python bench/make_data.py --only sdxl-r32-kohya.safetensors
    python bench/bench_inspect.py [--runs 7]

Goals: ``inspect`` without ``--norms`` reads only the header, < 0.2 s wall and ≤ 1.3× the
``safe_open`` floor row (issue 18 item 4); with ``--norms`` ≤ 2 s on 2 cores. ``--header-only``
times just the floors and the header-only rows (a quick check on a busy machine). Every row is the real command line (``python -m loratools.cli.main …``, output
to a pipe) in its own child process (bench/measure.py), so wall time includes interpreter start
and imports; the floor rows show what those cost alone. Run it on a quiet machine: the load
average at start and end is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure

DATA = Path(os.environ.get("LORATOOLS_BENCH_DIR", Path(__file__).parent / "data"))
OUT = Path(__file__).parent / "out"
PY = sys.executable  # the interpreter itself: a pyenv shim in front of it adds ~60 ms of bash
CLI = [PY, "-m", "loratools.cli.main"]
HEADER_ONLY_GOAL_S = 0.2
NORMS_GOAL_S = 2.0
FLOOR_RATIO_GOAL = 1.3  # header-only inspect ÷ the safe_open floor (issue 18 item 4)
SAFE_OPEN_FLOOR = "floor: safetensors safe_open keys + metadata (numpy)"
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_summary(argv: list[str], env: dict[str, str], top: int = 10) -> list[str]:
    """``python -X importtime`` of one run of ``argv``: the ``top`` modules by cumulative import
    time (what the header-only path still imports, issue 18 item 4) as table rows."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env)
    found = [(int(m[2]), int(m[1]), len(m[3]) // 2, m[4]) for m in IMPORT_LINE.finditer(done.stderr)]
    total = sum(own for _, own, _, _ in found) / 1e6
    rows = [
        f"| {name} | {cumulative / 1e6:.4f} | {own / 1e6:.4f} | {depth} |"
        for cumulative, own, depth, name in sorted(found, reverse=True)[:top]
    ]
    return [f"all {len(found)} imports: {total:.3f} s self time in total", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lora", default="sdxl-r32-kohya.safetensors")
    parser.add_argument("--header-only", action="store_true", help="only the floors and the header-only rows")
    args = parser.parse_args()
    lora = DATA / args.lora
    if not lora.exists():
        sys.exit(f"missing {lora}: run python bench/make_data.py --only {args.lora} first")
    rows: dict[str, list[str]] = {
        "floor: python -c pass": [PY, "-c", "pass"],
        "floor: import loratools.cli.main": [PY, "-c", "import loratools.cli.main"],
        SAFE_OPEN_FLOOR: [
            PY,
            "-c",
            "import sys; from safetensors import safe_open\n"
            "with safe_open(sys.argv[1], 'numpy') as f: f.keys(); f.metadata()",
            str(lora),
        ],
        "inspect (header only)": [*CLI, "inspect", str(lora)],
        "inspect --json (header only)": [*CLI, "inspect", "--json", str(lora)],
        "inspect --norms": [*CLI, "inspect", "--norms", str(lora)],
        "inspect --hashes (streamed sha256 ×2)": [*CLI, "inspect", "--hashes", str(lora)],
        f"inspect {DATA.name}/ (folder, {len(list(DATA.glob('*.safetensors')))} files, headers)": [
            *CLI,
            "inspect",
            str(DATA),
        ],
    }
    if args.header_only:
        rows = {name: argv for name, argv in rows.items() if name.startswith("floor") or "header only" in name}
    # Byte-compiled modules, as any installed package has them: a PYTHONDONTWRITEBYTECODE
    # environment (this VM sets it) recompiles every loratools module from source on every run
    # (~45 ms). The .pyc files go to a cache folder outside the source tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    for argv in rows.values():  # one untimed run each: writes the .pyc files, warms the page cache
        measure(argv, env=env)
    load_start = os.getloadavg()[0]
    lora.read_bytes()  # warm the page cache once, untimed: every row reads a cached file
    results: dict[str, list[float]] = {name: [] for name in rows}
    for run in range(args.runs):
        names = list(rows)
        names = names[run % len(names) :] + names[: run % len(names)]  # rotate the order each round
        for name in names:
            results[name].append(measure(rows[name], env=env).wall_s)
    load_end = os.getloadavg()[0]
    print(
        f"command: python bench/bench_inspect.py --runs {args.runs}{' --header-only' * args.header_only}   input: {lora.name} "
        f"({lora.stat().st_size / 1e6:.0f} MB)   cpus {os.cpu_count()}   "
        f"load average {load_start:.2f} → {load_end:.2f}   bytecode cached (PYTHONPYCACHEPREFIX)"
    )
    print("| command | wall s (median) | min–max s | ÷ safe_open floor | goal |")
    print("|---|---:|---:|---:|---|")
    table = []
    floor = statistics.median(results[SAFE_OPEN_FLOOR])
    for name, walls in results.items():
        median = statistics.median(walls)
        goal = ""
        if "header only" in name:
            ratio = median / floor
            goal = (
                f"< {HEADER_ONLY_GOAL_S} s: {'met' if median < HEADER_ONLY_GOAL_S else 'MISSED'}; "
                f"≤ {FLOOR_RATIO_GOAL}× floor: {'met' if ratio <= FLOOR_RATIO_GOAL else 'MISSED'}"
            )
        elif name == "inspect --norms":
            goal = f"≤ {NORMS_GOAL_S} s: {'met' if median <= NORMS_GOAL_S else 'MISSED'}"
        print(f"| {name} | {median:.3f} | {min(walls):.3f}–{max(walls):.3f} | {median / floor:.2f}× | {goal} |")
        table.append({"command": name, "argv": rows[name], "wall_median_s": median, "walls": walls})
    header_only = next(name for name in rows if "header only" in name)
    summary = import_summary(rows[header_only], env)
    print(f"\n`python -X importtime` of `{header_only}`, one run, top 10 by cumulative time; {summary[0]}")
    print("| module | cumulative s | self s | depth |")
    print("|---|---:|---:|---:|")
    print("\n".join(summary[1:]))
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_inspect-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
