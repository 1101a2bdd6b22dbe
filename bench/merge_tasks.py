"""The Python sides of bench_merge.py, one per child process (each one's peak RSS is its own).

    python bench/merge_tasks.py ours BASE LORA DST       # loratools.merge (streamed, batched)
    python bench/merge_tasks.py naive BASE LORA DST      # load everything, patch module by module, save
    python bench/merge_tasks.py roundtrip BASE DST       # safetensors load_file + save_file, no math
    python bench/merge_tasks.py arith BASE LORA          # the bare fp32 arithmetic, tensors preloaded

The last stdout line is JSON with ``inner_s`` (seconds of the work itself, after imports).
"""

from __future__ import annotations

import json
import sys
import time

import torch


def ours(base: str, lora: str, dst: str) -> dict[str, object]:
    from loratools.ops.merge import merge

    report = merge(base, [lora], dst)
    return {"patched": sum(report.patched.values()), "raw_copied": report.raw_copied}


def _lora_targets(
    base_keys: set[str], lora: str
) -> list[tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor, float]]:
    """(single-file key, fused part, up, down, scale) per kohya module, names mapped by loratools' tables —
    the naive method's one borrowed piece (every merge script carries such a table)."""
    import safetensors.torch

    from loratools.families import FAMILIES, keymap
    from loratools.formats.names import name_tables

    raw = safetensors.torch.load_file(lora)
    for spec in FAMILIES.values():
        tables, km = name_tables(spec), keymap(spec)
        out = []
        for name in sorted({k.split(".", 1)[0] for k in raw}):
            module = tables.kohya.get(name)
            if module is None:
                break
            weight = km.by_canonical[f"{module}.weight"]
            key = weight.layout_name(spec.single_layout)
            if key not in base_keys:
                break
            down, up = raw[f"{name}.lora_down.weight"], raw[f"{name}.lora_up.weight"]
            # OpenCLIP's fused in_proj: q, k, v are row thirds of one tensor (docs/FORMATS.md §5.2).
            out.append((key, weight.single_part, up, down, float(raw[f"{name}.alpha"]) / down.shape[0]))
        else:
            return out
    raise SystemExit("no family maps this LoRA onto the base")


def naive(base: str, lora: str, dst: str) -> dict[str, object]:
    """What merge scripts do: the whole state dict in memory, W += scale·up@down per module in fp32."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(base)
    targets = _lora_targets(set(tensors), lora)
    for key, part, up, down, scale in targets:
        w = tensors[key] if part is None else tensors[key].chunk(part[1])[part[0]]
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape) * scale
        w.copy_((w.float() + delta).to(w.dtype))
    safetensors.torch.save_file(tensors, dst)
    return {"patched": len(targets)}


def roundtrip(base: str, dst: str) -> dict[str, object]:
    import safetensors.torch

    safetensors.torch.save_file(safetensors.torch.load_file(base), dst)
    return {}


def arith(base: str, lora: str) -> dict[str, object]:
    """The fp32 arithmetic alone (W' = W + ΔW, rounded to W's dtype) with every tensor in memory:
    loratools' batched engine, and the same sums one module at a time."""
    from safetensors import safe_open

    from loratools.formats.adapters import LowRank
    from loratools.ops.delta import DEFAULT_BUDGET, DeltaEngine, Job, Term

    with safe_open(base, "pt") as f:
        keys = set(f.keys())
        targets = _lora_targets(keys, lora)
        tensors = {key: f.get_tensor(key) for key, *_ in targets}
    weights = {
        (key, part): tensors[key] if part is None else tensors[key].chunk(part[1])[part[0]].clone()
        for key, part, *_ in targets
    }
    # The engine as the merge drives it: windows of DEFAULT_BUDGET bytes of fp32 work, results
    # rounded into the weights' own memory (cloned here, untimed, so the per-module run below
    # starts from the same values).
    windows: list[dict[str, Job]] = [{}]
    load = 0
    for key, part, up, down, scale in targets:
        w = weights[(key, part)]
        cost = w.numel() * 4
        if load and load + cost > DEFAULT_BUDGET:
            windows.append({})
            load = 0
        windows[-1][f"{key}{part}"] = Job(w.clone(), [Term(LowRank(up, down, scale * down.shape[0]), 1.0)], reuse=True)
        load += cost
    engine = DeltaEngine("cpu")
    start = time.perf_counter()
    for window in windows:
        engine.patch(window)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for key, part, up, down, scale in targets:
        w = weights[(key, part)]
        (w.float() + (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape) * scale).to(w.dtype)
    per_module = time.perf_counter() - start
    flops = sum(2 * up.shape[0] * down.shape[0] * down[0].numel() for _, _, up, down, _ in targets)
    return {"batched_s": batched, "per_module_s": per_module, "gflop": flops / 1e9, "modules": len(targets)}


TASKS = {"ours": ours, "naive": naive, "roundtrip": roundtrip, "arith": arith}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TASKS:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = TASKS[argv[0]](*argv[1:])
    result["inner_s"] = time.perf_counter() - start
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
