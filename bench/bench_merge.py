"""Merge benchmark: a kohya LoRA baked into a full-size fp16 checkpoint. One run, one table per case.

    python bench/make_data.py                       # once: checkpoints and LoRAs in bench/data/
    python bench/bench_merge.py                     # SD1.5 rank 128 and SDXL rank 32
    python bench/bench_merge.py --only sd15 --runs 3

Rows (each in its own child process, page cache warm, outputs on the same disk):
  cp                          the file-copy floor (returns before the data is durable)
  cp + fsync                  the durable copy floor (loratools fsyncs before its atomic rename)
  safetensors load + save     the whole file through memory, no math
  naive merge                 load everything, W += scale·up@down per module in fp32, save
  fp32 arithmetic only        loratools' batched engine on preloaded tensors: no I/O at all
  loratools merge             streamed, batched, arithmetic overlapped with the copy (API, torch preloaded)
  loratools CLI               `python -m loratools merge` in a fresh process: torch's import included,
                              overlapped with the plan (cli/merge_cmd.py); --cli-tree DIR adds the same
                              row for another checkout (PYTHONPATH=DIR), interleaved, for before/after
The naive and loratools outputs are compared tensor by tensor (fp16 values may differ by one
rounding step where fp32 summation order differs; the count is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure

DATA = Path(os.environ.get("LORATOOLS_BENCH_DIR", Path(__file__).parent / "data"))
OUT = Path(__file__).parent / "out"
TASKS = str(Path(__file__).parent / "merge_tasks.py")
ROOT = str(Path(__file__).resolve().parents[1])
CASES = {
    "sd15": ("sd15-fp16.safetensors", "sd15-r128-kohya.safetensors"),
    "sdxl": ("sdxl-fp16.safetensors", "sdxl-r32-kohya.safetensors"),
}


def compare(a: str, b: str) -> tuple[int, int, float]:
    """(tensors that differ, elements that differ, largest difference in units of fp16 spacing)."""
    import torch
    from safetensors import safe_open

    tensors = elements = 0
    worst = 0.0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = list(fa.keys())
        if set(keys) != set(fb.keys()):
            raise SystemExit(f"{a} and {b} hold different keys")
        for key in keys:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if torch.equal(x, y):
                continue
            tensors += 1
            diff = x.float() != y.float()
            elements += int(diff.sum())
            spacing = torch.finfo(x.dtype).eps * x.float().abs().clamp_min(torch.finfo(x.dtype).tiny)
            worst = max(worst, float(((x.float() - y.float()).abs() / spacing)[diff].max()))
    return tensors, elements, worst


def _cli(base: Path, lora: Path, dst: str) -> list[str]:
    """The CLI merge in a fresh interpreter; which checkout is the measure env's PYTHONPATH."""
    return [sys.executable, "-m", "loratools", "merge", str(base), str(lora), "-o", dst, "--json"]


def run_case(name: str, runs: int, trees: Sequence[str] = (), skip: Sequence[str] = ()) -> list[dict[str, object]]:
    base_name, lora_name = CASES[name]
    base, lora = DATA / base_name, DATA / lora_name
    for path in (base, lora):
        if not path.exists():
            raise SystemExit(f"missing {path}: run python bench/make_data.py first")
    rows = {
        "cp (floor)": lambda dst: ["cp", str(base), dst],
        "cp + fsync (durable floor)": lambda dst: ["sh", "-c", f"cp '{base}' '{dst}' && sync -d '{dst}'"],
        "safetensors load + save": lambda dst: [sys.executable, TASKS, "roundtrip", str(base), dst],
        "naive merge (load all, per module)": lambda dst: [sys.executable, TASKS, "naive", str(base), str(lora), dst],
        "loratools merge": lambda dst: [sys.executable, TASKS, "ours", str(base), str(lora), dst],
        "loratools CLI": lambda dst: _cli(base, lora, dst),
    }
    envs = {"loratools CLI": {**os.environ, "PYTHONPATH": ROOT}}
    for tree in trees:
        rows[f"loratools CLI ({tree})"] = lambda dst: _cli(base, lora, dst)
        envs[f"loratools CLI ({tree})"] = {**os.environ, "PYTHONPATH": tree}
    # the floors, the naive merge and the compared outputs stay: the table is read against them
    keep = ("cp", "naive", "loratools merge")
    rows = {k: v for k, v in rows.items() if k.startswith(keep) or not any(k.startswith(x) for x in skip)}
    results: dict[str, list[tuple[float, float]]] = {row: [] for row in rows}
    details: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=DATA, prefix="_bench_merge_") as tmp:
        for path in (base, lora):  # warm the page cache, untimed
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        arith = measure([sys.executable, TASKS, "arith", str(base), str(lora)])
        details["arith"] = json.loads(arith.stdout.strip().splitlines()[-1])
        for run in range(runs):
            order = list(rows)[run % len(rows) :] + list(rows)[: run % len(rows)]
            for row in order:
                dst = str(Path(tmp) / f"{abs(hash(row))}.safetensors")
                m = measure(rows[row](dst), env=envs.get(row))
                results[row].append((m.wall_s, m.maxrss_mib))
                if row in ("naive merge (load all, per module)", "loratools merge") and run == runs - 1:
                    keep = Path(tmp) / ("naive.safetensors" if row.startswith("naive") else "ours.safetensors")
                    os.replace(dst, keep)
                else:
                    os.unlink(dst)
        differing = compare(str(Path(tmp) / "naive.safetensors"), str(Path(tmp) / "ours.safetensors"))

    floor = statistics.median(w for w, _ in results["cp (floor)"])
    durable = statistics.median(w for w, _ in results["cp + fsync (durable floor)"])
    arith_s = float(details["arith"]["batched_s"])  # type: ignore[arg-type]
    binding = max(durable, arith_s)
    print(
        f"\n### {name}: {lora_name} into {base_name} ({base.stat().st_size / 1e9:.2f} GB)   "
        f"runs {runs}, load average {os.getloadavg()[0]:.2f}"
    )
    print("| method | wall s (median) | min–max s | / cp | / binding floor | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    table = []
    for row, values in results.items():
        walls = [w for w, _ in values]
        median = statistics.median(walls)
        rss = max(r for _, r in values)
        print(
            f"| {row} | {median:.2f} | {min(walls):.2f}–{max(walls):.2f} | {median / floor:.2f}× | "
            f"{median / binding:.2f}× | {rss:.0f} |"
        )
        table.append({"case": name, "method": row, "wall_median_s": median, "walls": walls, "peak_rss_mib": rss})
    a = details["arith"]
    print(
        f"| fp32 arithmetic only, batched (in memory, {a['modules']} modules, {a['gflop']:.0f} GFLOP) | "
        f"{arith_s:.2f} | | {arith_s / floor:.2f}× | {arith_s / binding:.2f}× | |"
    )
    print(f"| fp32 arithmetic only, one module at a time | {a['per_module_s']:.2f} | | | | |")
    print(
        f"binding floor = max(cp + fsync {durable:.2f} s, arithmetic {arith_s:.2f} s) = {binding:.2f} s.  "
        f"naive vs loratools output: {differing[0]} tensors / {differing[1]} values differ, "
        f"at most {differing[2]:.1f} fp16 rounding steps."
    )
    table.append({"case": name, "arith": a, "binding_floor_s": binding, "differing": differing})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", choices=sorted(CASES), nargs="+", default=list(CASES))
    parser.add_argument("--cli-tree", action="append", default=[], help="another checkout's CLI row (before/after)")
    parser.add_argument("--skip", action="append", default=[], help="leave out rows whose name starts so")
    args = parser.parse_args()
    trees = " ".join(f"--cli-tree {t}" for t in args.cli_tree)
    print(f"command: python bench/bench_merge.py --runs {args.runs} --only {' '.join(args.only)} {trees}")
    tables = [row for case in args.only for row in run_case(case, args.runs, args.cli_tree, args.skip)]
    OUT.mkdir(exist_ok=True)
    (OUT / f"bench_merge-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(tables, indent=2))


if __name__ == "__main__":
    main()
