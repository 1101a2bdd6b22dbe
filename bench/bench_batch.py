"""Batch resize of many LoRAs: serial vs ``-j 2`` worker processes vs Ray on this machine.

100 full-size kohya SD1.5 LoRAs (default; ``--files N``; rank 8, fp16, real module set) resized
to rank 4 three ways through the library call behind ``loratools resize loras/ --rank 4 -o out/``:
``jobs=1`` (in this process), ``jobs=2`` (two worker processes, one intra-op thread each), and
``engine="ray"`` (a local Ray with ``--ray-cpus`` CPUs; its start-up is timed separately).
Outputs of the three runs are compared byte for byte.

    python bench/bench_batch.py
    python bench/bench_batch.py --files 20 --no-ray
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(folder: Path, files: int, rank: int) -> None:
    import torch

    from loratools.families import FAMILIES
    from loratools.formats.io import save_lora
    from loratools.synthetic import make_lora

    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "lora-000.safetensors"
    if not template.exists():
        save_lora(make_lora(FAMILIES["sd1"], rank=rank, dtype=torch.float16, alphas="varied"), template, "kohya")
    for i in range(1, files):
        target = folder / f"lora-{i:03d}.safetensors"
        if not target.exists():
            shutil.copyfile(template, target)  # same bytes, each file its own work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--data", default=os.environ.get("LORATOOLS_BENCH_DIR", str(REPO / "bench" / "data")))
    args = parser.parse_args()
    from loratools.batch import plan_tasks, run_tasks

    inputs = Path(args.data) / f"batch-sd15-r{args.rank}"
    make_inputs(inputs, args.files, args.rank)
    sources = [str(p) for p in sorted(inputs.glob("*.safetensors"))[: args.files]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("serial (-j 1)", {"jobs": 1}), ("-j 2 processes", {"jobs": 2})]
        if not args.no_ray:
            import ray

            start = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
            rows.append((f"ray.init(num_cpus={args.ray_cpus})", time.perf_counter() - start, None))
            runs.append((f"Ray local ({args.ray_cpus} CPUs)", {"engine": "ray"}))
        outputs = []
        for label, how in runs:
            out = Path(tmp) / label.split()[0].strip("-()")
            tasks = plan_tasks("resize", sources, str(out), options={"rank": 4})
            start = time.perf_counter()
            results = run_tasks(tasks, **how)  # type: ignore[arg-type]
            seconds = time.perf_counter() - start
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.error]
            rows.append((label, seconds, len(results) / seconds))
            outputs.append(out)
        same = all(
            (outputs[0] / Path(s).name).read_bytes() == (o / Path(s).name).read_bytes()
            for o in outputs[1:]
            for s in sources
        )
    load = os.getloadavg()
    print(f"{len(sources)} SD1.5 rank-{args.rank} fp16 LoRAs → rank 4; outputs identical across runs: {same}")
    print("| run | seconds | files/s |")
    print("|---|---:|---:|")
    for label, seconds, rate in rows:
        print(f"| {label} | {seconds:.1f} | {'' if rate is None else f'{rate:.2f}'} |")
    print(f"load average after (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"cores: {len(os.sched_getaffinity(0))}")  # fmt: skip


if __name__ == "__main__":
    main()
