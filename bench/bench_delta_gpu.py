"""ΔW engine on a GPU: every module of a full-size SDXL rank-128 LoRA, achieved GB/s against the bound.

    python bench/bench_delta_gpu.py            # needs CUDA; says so and exits 0 without it

Two measurements, each the median of --runs after a warm-up:
  ΔW in device memory    ``DeltaEngine.deltas(on_device=True)``: factors on the device, ΔW (fp32)
                         written to HBM. Bytes = ΔW written + factors read; bound = the device's
                         own copy bandwidth (a large device-to-device copy, read + write).
  patch through the host ``DeltaEngine.patch``: fp16 base weights from pinned host memory to the
                         device, W + ΔW there, rounded fp16 back. Bytes = weights in + out; bound =
                         pinned host↔device copy bandwidth measured the same way.
The LoRA is random, with the real SDXL module list and shapes (bench/synth_lora.py's targets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _timed(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    seconds = _timed(lambda: b.copy_(a), 5)
    return 2 * nbytes / seconds / 1e9  # read + write


def host_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    host = torch.empty(nbytes // 2, dtype=torch.float16, pin_memory=True)
    dev = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    seconds = _timed(lambda: (dev.copy_(host, non_blocking=True), host.copy_(dev, non_blocking=True)), 5)
    return 2 * nbytes / seconds / 1e9  # there and back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (the CPU path is measured by bench_merge.py)")
        return 0

    from loratools.families import FAMILIES
    from loratools.formats.adapters import LowRank
    from loratools.ops.delta import DeltaEngine, Job, Term
    from loratools.synthetic import lora_modules

    spec = FAMILIES["sdxl"]
    from loratools.formats.names import name_tables

    tables = name_tables(spec)
    g = torch.Generator().manual_seed(0)
    modules = lora_modules(spec, conv=False, text=True)
    terms, weights = {}, {}
    for module in modules:
        shape = tables.modules[module].shape
        out, inp = shape[0], int(torch.tensor(shape[1:]).prod())
        up = (torch.randn(out, args.rank, generator=g) * 0.01).half()
        down = (torch.randn(args.rank, inp, generator=g) * 0.01).half()
        terms[module] = (tuple(shape), [Term(LowRank(up.cuda(), down.cuda(), args.rank / 2), 1.0)])
        weights[module] = torch.randn(*shape, generator=g).half().pin_memory()
    engine = DeltaEngine("cuda")
    delta_bytes = sum(4 * torch.Size(s).numel() for s, _ in terms.values())
    factor_bytes = sum(t[0].adapter.parameters() * 2 for _, t in terms.values())
    weight_bytes = sum(w.numel() * 2 for w in weights.values())

    seconds = _timed(lambda: engine.deltas(terms, on_device=True), args.runs)
    achieved = (delta_bytes + factor_bytes) / seconds / 1e9
    hbm = device_copy_bandwidth()
    jobs = {m: Job(weights[m], terms[m][1]) for m in modules}
    patch_seconds = _timed(lambda: engine.patch(jobs), args.runs)
    host_achieved = 2 * weight_bytes / patch_seconds / 1e9
    pcie = host_copy_bandwidth()

    name = torch.cuda.get_device_name()
    print(f"command: python bench/bench_delta_gpu.py --runs {args.runs} --rank {args.rank}   device: {name}")
    print(f"SDXL rank-{args.rank} LoRA: {len(modules)} modules, ΔW {delta_bytes / 1e9:.2f} GB fp32")
    print("| what | seconds | GB moved | achieved GB/s | bound GB/s | % of bound |")
    print("|---|---:|---:|---:|---:|---:|")
    moved = (delta_bytes + factor_bytes) / 1e9
    print(
        f"| ΔW of every module, in HBM | {seconds:.4f} | {moved:.2f} | {achieved:.0f} | {hbm:.0f} | {100 * achieved / hbm:.0f}% |"
    )
    print(
        f"| patch fp16 weights through pinned host memory | {patch_seconds:.4f} | {2 * weight_bytes / 1e9:.2f} | "
        f"{host_achieved:.1f} | {pcie:.1f} | {100 * host_achieved / pcie:.0f}% |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
