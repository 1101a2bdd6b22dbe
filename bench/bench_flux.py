"""FLUX.1 at full size: merge a rank-16 kohya LoRA into the 23.8 GB bf16 BFL transformer file, and
resize a rank-64 Flux LoRA, each against its floor measured in the same run (issue 17).

    python bench/bench_flux.py                      # generates the inputs once (≈ 25 GB, streamed)
    python bench/bench_flux.py --only resize        # the LoRA rows only (≈ 1.5 GB of inputs)
    python bench/bench_flux.py --only merge --blocks 2 2            # full width, 2 double + 2 single
    python bench/bench_flux.py --only merge --blocks 2 2 --profile  # + where the merge's time goes

``--blocks D S`` keeps the real widths but only D double and S single blocks (inputs named
``…-dDsS``): a merge that runs in well under a minute and still spends its time as the full one
does, tensor for tensor. ``--profile`` adds the merge run in-process under cProfile twice, with
and without the rounding-loss measurement of bf16/fp8 outputs (ops/delta.COARSE_DTYPES), and
prints the top functions by own time and the CPU seconds of each.

Inputs (random weights, real names and shapes, written through loratools' streaming writer, in
$LORATOOLS_BENCH_DIR or bench/data): ``flux1-dev-bf16.safetensors`` — the transformer alone, BFL
names without a prefix, as black-forest-labs ships flux1-dev.safetensors — and kohya Flux LoRAs
(``lora_unet_<BFL path>`` on every Linear of the double and single blocks, fused qkv/linear1
as kohya trains them; networks/lora_flux.py) at ranks 16 and 64.

Rows (each in its own child process, page cache warm; peak RSS is that child's):
  python start                interpreter start, the smallest cost of any command
  cp + sync (durable floor)   the base copied to the output disk and made durable
  loratools merge             streamed: peak RSS bounded by a window, not the 23.8 GB file
  read LoRA + bare SVD work   the resize floor: python + numpy + reading the file + the least
                              factor-space arithmetic (one QR pair and an r×r SVD per module, one
                              thread, divided by the cores)
  loratools resize            rank 64 → 16
No naive "load everything" row: the base does not fit in this machine's memory, which is the point.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure

DATA = Path(os.environ.get("LORATOOLS_BENCH_DIR", Path(__file__).parent / "data"))


Blocks = tuple[int, int] | None  # (double, single) blocks kept; None: all of FLUX.1's 19 + 38


def _suffix(blocks: Blocks) -> str:
    return "" if blocks is None else f"-d{blocks[0]}s{blocks[1]}"


def base_name(blocks: Blocks = None) -> str:
    return f"flux1-dev-bf16{_suffix(blocks)}.safetensors"


def lora_name(rank: int, blocks: Blocks = None) -> str:
    return f"flux1-r{rank}-kohya{_suffix(blocks)}.safetensors"


def flux_spec(blocks: Blocks):  # type: ignore[no-untyped-def]
    """FLUX.1 at full width, with only ``blocks`` = (double, single) blocks when given."""
    from dataclasses import replace

    from loratools.families import FAMILIES

    spec = FAMILIES["flux1"]
    if blocks is None:
        return spec
    assert spec.transformer is not None
    return replace(spec, transformer=replace(spec.transformer, double_blocks=blocks[0], single_blocks=blocks[1]))


def make_base(path: Path, blocks: Blocks = None) -> None:
    import torch

    from loratools.synthetic import write_single_file

    write_single_file(flux_spec(blocks), path, dtype=torch.bfloat16, components=("transformer",), bare=True)


def make_lora(path: Path, rank: int, blocks: Blocks = None) -> None:
    """A kohya Flux LoRA on every block Linear, streamed; names and shapes from the family's key map."""
    import torch

    from loratools.formats.flux import flux_names
    from loratools.io.safetensors import StreamingWriter, TensorInfo

    names = flux_names(flux_spec(blocks))
    modules = {p: s for p, s in names.bfl_shapes.items() if p.startswith(("double_blocks.", "single_blocks."))}
    plan: dict[str, TensorInfo] = {}
    for module, (out, inp) in modules.items():
        stem = "lora_unet_" + module.replace(".", "_")
        plan[f"{stem}.alpha"] = TensorInfo("BF16", ())
        plan[f"{stem}.lora_down.weight"] = TensorInfo("BF16", (rank, inp))
        plan[f"{stem}.lora_up.weight"] = TensorInfo("BF16", (out, rank))
    generator = torch.Generator().manual_seed(rank)
    metadata = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_base_model_version": "flux1",
    }
    with StreamingWriter(path, plan, metadata) as writer:
        for key, info in plan.items():
            if key.endswith(".alpha"):
                writer.write(key, torch.tensor(float(rank), dtype=torch.bfloat16))
                continue
            std = 0.01 if "lora_up" in key else 1.0 / info.shape[1] ** 0.5
            writer.write(key, (torch.randn(info.shape, generator=generator) * std).to(torch.bfloat16))


def ensure(path: Path, make: object, *args: object) -> Path:
    if not path.exists():
        print(f"generating {path} …", flush=True)
        make(path, *args)  # type: ignore[operator]
    return path


def warm(*paths: Path) -> None:
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


FLOOR_SVD = r"""
import json, struct, sys, time, numpy as np
start = time.perf_counter()
with open(sys.argv[1], "rb") as fh:
    size = struct.unpack("<Q", fh.read(8))[0]
    header = json.loads(fh.read(size))
    data = fh.read()
header.pop("__metadata__", None)
def tensor(key):  # bf16 → float32: the high half of a float32 (numpy has no bfloat16)
    info = header[key]
    begin, end = info["data_offsets"]
    raw = np.frombuffer(data, dtype=np.uint16, count=(end - begin) // 2, offset=begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
read_s = time.perf_counter() - start
ups = sorted(k for k in header if k.endswith("lora_up.weight"))
t0 = time.perf_counter()
for up_key in ups:
    up, down = tensor(up_key), tensor(up_key.replace("lora_up", "lora_down"))
    qu, ru = np.linalg.qr(up)
    qd, rd = np.linalg.qr(down.T)
    np.linalg.svd(ru @ rd.T)
arith_s = time.perf_counter() - t0
print(f"{read_s} {arith_s}")
"""


def table(rows: list[tuple[str, float, float]], floor: float, title: str) -> None:
    print(f"\n### {title}   (load average {os.getloadavg()[0]:.2f})")
    print("| row | wall s | ÷ floor | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.2f} | {wall / floor:.2f}× | {rss:.0f} |")


PROFILE = r"""
import cProfile, pstats, sys, time
import loratools.ops.delta as delta
from loratools.ops.merge import merge
base, lora, out, measured = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if not measured:
    delta.COARSE_DTYPES = frozenset()  # no rounding-loss measurement: the merge's bytes are the same
profile = cProfile.Profile()
cpu, wall = time.process_time(), time.perf_counter()
profile.enable()
report = merge(base, [lora], out, overwrite=True)
profile.disable()
print(f"wall {time.perf_counter() - wall:.2f} s, CPU {time.process_time() - cpu:.2f} s, rounding {report.rounding}")
pstats.Stats(profile).sort_stats("tottime").print_stats(12)
"""


def bench_merge(workdir: Path, blocks: Blocks = None, profile: bool = False) -> None:
    base = ensure(DATA / base_name(blocks), make_base, blocks)
    lora = ensure(DATA / lora_name(16, blocks), make_lora, 16, blocks)
    warm(base, lora)
    out = workdir / "merged.safetensors"
    start = measure([sys.executable, "-c", "pass"])
    copy = measure(["sh", "-c", f"cp '{base}' '{out}' && sync -d '{out}'"])
    out.unlink()
    ours = measure([sys.executable, "-m", "loratools", "merge", str(base), str(lora), "-o", str(out)])
    out.unlink()
    floor = start.wall_s + copy.wall_s
    rows = [
        ("python start", start.wall_s, start.maxrss_mib),
        ("cp + sync (durable floor)", copy.wall_s, copy.maxrss_mib),
        ("floor = python start + durable copy", floor, 0.0),
        ("loratools merge (r16 into bf16)", ours.wall_s, ours.maxrss_mib),
    ]
    size = base.stat().st_size / 1e9
    table(rows, floor, f"merge: {lora.name} into {base.name} ({size:.1f} GB); goal ≤ 1.2× floor, peak ≤ 1536 MiB")
    if profile:
        for measured in ("1", "0"):
            print(f"\n### cProfile, rounding-loss measurement {'on' if measured == '1' else 'off'}", flush=True)
            done = measure([sys.executable, "-c", PROFILE, str(base), str(lora), str(out), measured])
            print(done.stdout)
            out.unlink()


def bench_resize(workdir: Path) -> None:
    lora = ensure(DATA / lora_name(64), make_lora, 64)
    warm(lora)
    start = measure([sys.executable, "-c", "import numpy"])
    bare = measure([sys.executable, "-c", FLOOR_SVD, str(lora)])
    read_s, arith_s = (float(x) for x in bare.stdout.split())
    cores = os.cpu_count() or 1
    floor = start.wall_s + max(read_s, arith_s / cores)
    out = workdir / "resized.safetensors"
    ours = measure([sys.executable, "-m", "loratools", "resize", str(lora), "-o", str(out), "--rank", "16"])
    rows = [
        ("python + numpy import", start.wall_s, start.maxrss_mib),
        ("read of the input (numpy)", read_s, 0.0),
        (f"bare factor arithmetic, 1 thread ÷ {cores} cores", arith_s / cores, 0.0),
        ("floor = python+numpy + max(read, arith ÷ cores)", floor, 0.0),
        ("loratools resize 64 → 16", ours.wall_s, ours.maxrss_mib),
    ]
    table(rows, floor, f"resize: {lora.name} ({lora.stat().st_size / 1e9:.2f} GB) 64 → 16; goal ≤ 2× floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("merge", "resize"), nargs="+", default=["merge", "resize"])
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="a full-width cut of FLUX.1")
    parser.add_argument("--profile", action="store_true", help="cProfile the merge with and without rounding loss")
    args = parser.parse_args()
    blocks = tuple(args.blocks) if args.blocks else None
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DATA, prefix="_bench_flux_") as tmp:
        if "resize" in args.only:
            bench_resize(Path(tmp))
        if "merge" in args.only:
            bench_merge(Path(tmp), blocks, args.profile)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
