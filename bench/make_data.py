"""Generate the full-size synthetic benchmark inputs (no download; random weights, real key sets).

    python bench/make_data.py                 # everything, into bench/data/ (or $LORATOOLS_BENCH_DIR)
    python bench/make_data.py --skip-sdxl-checkpoint   # all but the 6.94 GB SDXL checkpoint
    python bench/make_data.py --only sd15-fp16 --out /big/disk

Existing files are kept (delete one to regenerate it). Every file is written through loratools'
streaming writer (temporary file, fsync, rename), so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from synth_lora import module_counts, write_kohya_lora

from loratools.families import FAMILIES
from loratools.synthetic import write_single_file

BENCH = Path(__file__).resolve().parent
DEFAULT_DIR = BENCH / "data"

# name → (tensor data bytes, excluding the header; writer)
DATASETS: dict[str, tuple[int, Callable[[Path], Path]]] = {
    "sd15-fp16.safetensors": (
        2_132_495_236,
        lambda p: write_single_file(FAMILIES["sd1"], p, dtype=torch.float16),
    ),
    "sdxl-fp16.safetensors": (
        6_937_676_352,
        lambda p: write_single_file(FAMILIES["sdxl"], p, dtype=torch.float16),
    ),
    "sd15-r128-kohya.safetensors": (
        150_995_472,
        lambda p: write_kohya_lora("sd1", p, rank=128, dtype=torch.float16),
    ),
    "sdxl-r32-kohya.safetensors": (
        228_034_484,
        lambda p: write_kohya_lora("sdxl", p, rank=32, dtype=torch.float16),
    ),
}
SDXL_CHECKPOINT = "sdxl-fp16.safetensors"


def data_dir(out: str | None = None) -> Path:
    """The data folder: --out, else $LORATOOLS_BENCH_DIR, else bench/data."""
    return Path(out or os.environ.get("LORATOOLS_BENCH_DIR") or DEFAULT_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"data folder (default $LORATOOLS_BENCH_DIR or {DEFAULT_DIR})")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), metavar="NAME", help="generate only these")
    parser.add_argument("--skip-sdxl-checkpoint", action="store_true", help=f"do not generate {SDXL_CHECKPOINT}")
    args = parser.parse_args(argv)

    out = data_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or [n for n in DATASETS if not (args.skip_sdxl_checkpoint and n == SDXL_CHECKPOINT)]
    print(f"data folder: {out}")
    print(f"kohya module counts: sd1 {module_counts('sd1')}, sdxl {module_counts('sdxl')}")
    for name in names:
        path = out / name
        approx, writer = DATASETS[name]
        if path.exists():
            print(f"  {name}: exists ({path.stat().st_size:,} bytes), skipped")
            continue
        print(f"  {name}: generating (~{approx / 1e9:.2f} GB) …", flush=True)
        start = time.perf_counter()
        writer(path)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        print(f"  {name}: {size:,} bytes ({size / 2**30:.2f} GiB) in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
