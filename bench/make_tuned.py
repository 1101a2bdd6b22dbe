"""A synthetic "fine-tuned" checkpoint for the extract benchmark: base + a known low-rank ΔW.

    python bench/make_tuned.py                     # bench/data/sd15-fp16.safetensors → sd15-tuned-fp16.safetensors
    python bench/make_tuned.py --rank 128 --decay 0.97 --scale 0.04

Every module an extracted LoRA covers (``loratools.ops.extract.extract_targets``: U-Net
transformer, resnet and sampler weights incl. 3×3 convs, text-encoder attention and MLP) gets
``ΔW = U·diag(σ)·Vᵀ`` of rank ``min(rank, out, in·kh·kw)`` with random near-orthonormal ``U``, ``V``
(Gaussian / √n, seeded by the module name) and a geometric spectrum ``σᵢ ∝ decayⁱ`` — a slowly
decaying tail like a real fine-tune's, so a rank-64 extraction leaves a real residual and the
randomized SVD has work to do. ``‖ΔW‖_F = scale·‖W‖_F`` per module. ΔW is added in float32 and the
sum stored in the base dtype (so the tuned file also carries its own fp16 rounding, as real ones do).

Streamed: one base tensor (three for a fused q/k/v) in memory at a time; untouched tensors are
copied as raw bytes. Nothing is ever held twice at 2 GB.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_data import data_dir

from loratools.families.detect import detect
from loratools.io.checkpoint import open_checkpoint
from loratools.io.safetensors import StreamingWriter
from loratools.ops.extract import extract_targets


def low_rank_delta(module: str, weight: torch.Tensor, rank: int, decay: float, scale: float, seed: int) -> torch.Tensor:
    """The known ΔW of one module, float32, shaped like ``weight``."""
    out, flat = weight.shape[0], weight[0].numel()
    r = min(rank, out, flat)
    generator = torch.Generator().manual_seed(zlib.crc32(module.encode()) ^ seed)
    u = torch.randn(out, r, generator=generator) / out**0.5
    v = torch.randn(flat, r, generator=generator) / flat**0.5
    sigma = decay ** torch.arange(r, dtype=torch.float32)
    delta = (u * sigma) @ v.t()
    target = scale * float(torch.linalg.vector_norm(weight.float()))
    return (delta * (target / float(torch.linalg.vector_norm(delta)))).reshape(weight.shape)


def write_tuned(
    base: Path, output: Path, *, rank: int = 128, decay: float = 0.97, scale: float = 0.04, seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Stream ``base`` into ``output`` with the known ΔW added to every extract target."""
    with open_checkpoint(base) as ckpt:
        found = detect(ckpt.shapes(), ckpt.metadata)
        km, layout = found.keymap, found.layout
        targets = {f"{m}.weight" for m in extract_targets(found.family)}
        plan = {key: ckpt.info(key) for key in ckpt}
        counts = {"modified": 0, "copied": 0}
        metadata = {
            **(ckpt.metadata or {}),
            "loratools_synthetic": f"bench/make_tuned.py rank={rank} decay={decay} scale={scale}",
        }
        with StreamingWriter(output, plan, metadata, overwrite=overwrite) as writer:
            for key in ckpt:
                weights = [w for w in km.lookup(layout, key) if w.canonical in targets]
                if not weights:
                    handle, name = ckpt.raw(key)  # type: ignore[misc]
                    writer.copy_raw(key, handle, name)
                    counts["copied"] += 1
                    continue
                parts = km.split(layout, key, ckpt.read(key))
                for w in weights:
                    old = parts[w.canonical]
                    delta = low_rank_delta(w.module, old, rank, decay, scale, seed)
                    parts[w.canonical] = (old.float() + delta).to(old.dtype)
                    counts["modified"] += 1
                writer.write(key, km.join(layout, key, parts).contiguous())
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base checkpoint (default: <data>/sd15-fp16.safetensors)")
    parser.add_argument("--out", default=None, help="output (default: <data>/sd15-tuned-fp16.safetensors)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--decay", type=float, default=0.97)
    parser.add_argument("--scale", type=float, default=0.04, help="‖ΔW‖_F / ‖W‖_F per module")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    data = data_dir()
    base = Path(args.base or data / "sd15-fp16.safetensors")
    out = Path(args.out or data / "sd15-tuned-fp16.safetensors")
    if out.exists() and not args.overwrite:
        print(f"{out} exists (--overwrite to regenerate)")
        return 0
    if not base.exists():
        sys.exit(f"missing {base}: run python bench/make_data.py --only sd15-fp16.safetensors first")
    start = time.perf_counter()
    counts = write_tuned(base, out, rank=args.rank, decay=args.decay, scale=args.scale, overwrite=args.overwrite)
    print(f"wrote {out}: {counts['modified']} weights with a rank-{args.rank} ΔW, {counts['copied']} tensors copied "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
