"""LoRA conversion benchmark: full-size SDXL rank-32 kohya LoRA → diffusers, against the floor of a
safetensors load_file + save_file of the same file. One run, one table.

    python bench/make_data.py --only sdxl-r32-kohya.safetensors sd15-r128-kohya.safetensors
    python bench/bench_convert.py [--runs 5]

Each row runs in its own child process (bench/measure.py), so wall time includes interpreter and
torch start-up for both sides alike, and peak RSS is that process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure

DATA = Path(os.environ.get("LORATOOLS_BENCH_DIR", Path(__file__).parent / "data"))
OUT = Path(__file__).parent / "out"

NAIVE = "import sys, safetensors.torch as st; st.save_file(st.load_file(sys.argv[1]), sys.argv[2], metadata={'format': 'pt'})"
OURS = "import sys; from loratools.ops.convert import convert_lora; convert_lora(sys.argv[1], sys.argv[2], sys.argv[3])"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lora", default="sdxl-r32-kohya.safetensors")
    args = parser.parse_args()
    source = DATA / args.lora
    if not source.exists():
        sys.exit(f"missing {source}: run python bench/make_data.py first")
    rows = {
        "safetensors load_file + save_file (floor)": lambda dst: [sys.executable, "-c", NAIVE, str(source), dst],
        "loratools convert kohya → diffusers": lambda dst: [sys.executable, "-c", OURS, str(source), dst, "diffusers"],
        "loratools convert kohya → peft folder": lambda dst: [sys.executable, "-c", OURS, str(source), dst, "peft"],
        "loratools convert kohya → kohya": lambda dst: [sys.executable, "-c", OURS, str(source), dst, "kohya"],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        source.read_bytes()  # warm the page cache once, untimed
        for run in range(args.runs):
            names = list(rows)
            names = names[run % len(names) :] + names[: run % len(names)]  # rotate the order each round
            for name in names:
                dst = str(Path(tmp) / f"out-{run}-{abs(hash(name))}")
                m = measure(rows[name](dst))
                results[name].append((m.wall_s, m.maxrss_mib))
    floor = statistics.median(w for w, _ in results[next(iter(rows))])
    print(
        f"command: python bench/bench_convert.py --runs {args.runs}   input: {source.name} "
        f"({source.stat().st_size / 1e6:.0f} MB)   load average {os.getloadavg()[0]:.2f}"
    )
    print("| method | wall s (median) | min–max s | wall / floor | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    table = []
    for name, values in results.items():
        walls = [w for w, _ in values]
        median = statistics.median(walls)
        rss = max(r for _, r in values)
        print(f"| {name} | {median:.2f} | {min(walls):.2f}–{max(walls):.2f} | {median / floor:.2f}× | {rss:.0f} |")
        table.append({"method": name, "wall_median_s": median, "walls": walls, "peak_rss_mib": rss})
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_convert-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
