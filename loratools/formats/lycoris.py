"""Adapters from kohya-namespace parameter groups: LoRA/LoCon, LoHa, LoKr, full diff, DoRA.

LyCORIS writes every algorithm into the kohya name space (``lora_unet_…``); which algorithm a
module uses is told purely by which parameter suffixes exist, as ComfyUI does
(comfyanonymous/ComfyUI:comfy/lora.py (load_lora)). FORMATS.md §4.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .adapters import Adapter, Full, LoHa, LoKr, LowRank

LORA_PARAMS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
LOHA_PARAMS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_PARAMS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL_PARAMS = {"diff", "diff_b"}
COMMON_PARAMS = {"alpha", "dora_scale"}
KNOWN_PARAMS = LORA_PARAMS | LOHA_PARAMS | LOKR_PARAMS | FULL_PARAMS | COMMON_PARAMS
UNSUPPORTED = {"on_input": "IA3", "weight": "IA3", "w_norm": "norm", "b_norm": "norm"}


def read_alpha(params: dict[str, torch.Tensor], rank: int | None, name: str, warnings: list[str]) -> float:
    """alpha as a float; missing ⇒ rank (scale 1), stated; zero ⇒ kept (the loaders' scale 0), stated."""
    tensor = params.get("alpha")
    if tensor is None:
        return float(rank) if rank else 1.0
    if tensor.numel() != 1:
        raise InputError(f"{name}: alpha has {tensor.numel()} elements, expected one")
    value = float(tensor.reshape(()).to(torch.float64))
    if not math.isfinite(value):
        raise InputError(f"{name}: alpha is {value}")
    if value == 0:
        warnings.append(f"{name}: alpha is 0, so the module has no effect (as in kohya's merge and ComfyUI)")
    return value


def dora_axis(scale: torch.Tensor, out_features: int) -> str:
    """Which axis a stored DoRA magnitude normalises: ComfyUI's shape rule (FORMATS.md §4.7)."""
    return "out" if scale.shape[0] == out_features and scale.dim() >= 1 and scale.numel() == out_features else "in"


def adapter_from_params(
    name: str, params: dict[str, torch.Tensor], weight_shape: tuple[int, ...] | None, warnings: list[str]
) -> Adapter:
    """Build the adapter a kohya/LyCORIS parameter group describes."""
    keys = set(params)
    unknown = keys - KNOWN_PARAMS
    if unknown:
        algo = {UNSUPPORTED[k] for k in unknown if k in UNSUPPORTED}
        what = (
            f"LyCORIS {'/'.join(sorted(algo))} modules are not supported"
            if algo
            else f"unknown parameters {sorted(unknown)}"
        )
        raise InputError(f"{name}: {what}")
    kinds = [
        k
        for k, group in (("lora", LORA_PARAMS), ("loha", LOHA_PARAMS), ("lokr", LOKR_PARAMS), ("full", FULL_PARAMS))
        if keys & group
    ]
    if len(kinds) != 1:
        raise InputError(f"{name}: parameters {sorted(keys)} mix or lack adapter kinds")
    kind = kinds[0]
    if kind == "lora":
        if "lora_down.weight" not in params or "lora_up.weight" not in params:
            raise InputError(f"{name}: lora_down/lora_up pair incomplete ({sorted(keys)})")
        up, down, mid = params["lora_up.weight"], params["lora_down.weight"], params.get("lora_mid.weight")
        rank = int(down.shape[0])
        if int(up.shape[1]) != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise InputError(f"{name}: rank mismatch: lora_down has rank {rank}, lora_up {tuple(up.shape)}")
        adapter = LowRank(up, down, read_alpha(params, rank, name, warnings), mid)
        scale = params.get("dora_scale")
        if scale is not None:
            adapter.dora_scale = scale
            adapter.dora_axis = dora_axis(scale, adapter.out_features)
        return adapter
    if kind == "loha":
        if not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
            raise InputError(f"{name}: LoHa factors incomplete ({sorted(keys)})")
        w1a, w1b = params["hada_w1_a"], params["hada_w1_b"]
        tucker = "hada_t1" in params
        rank = int(w1b.shape[0])
        if (w1a.shape[0] if tucker else w1a.shape[1]) != rank:
            raise InputError(f"{name}: LoHa rank mismatch ({tuple(w1a.shape)} vs {tuple(w1b.shape)})")
        return LoHa(
            w1a,
            w1b,
            params["hada_w2_a"],
            params["hada_w2_b"],
            read_alpha(params, rank, name, warnings),
            params.get("hada_t1"),
            params.get("hada_t2"),
            weight_shape,
        )
    if kind == "lokr":
        if not ({"lokr_w1"} <= keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) or not (
            {"lokr_w2"} <= keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        ):
            raise InputError(f"{name}: LoKr factors incomplete ({sorted(keys)})")
        adapter = LoKr(
            0.0,
            params.get("lokr_w1"),
            params.get("lokr_w1_a"),
            params.get("lokr_w1_b"),
            params.get("lokr_w2"),
            params.get("lokr_w2_a"),
            params.get("lokr_w2_b"),
            params.get("lokr_t2"),
            weight_shape,
        )
        adapter.alpha = read_alpha(params, adapter.rank, name, warnings)
        return adapter
    if "diff" not in params:
        raise InputError(f"{name}: full-diff module has diff_b but no diff")
    return Full(params["diff"], params.get("diff_b"))


def adapter_params(adapter: Adapter, alpha_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS parameter group of an adapter (inverse of :func:`adapter_from_params`)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(adapter, LowRank):
        out["lora_down.weight"] = adapter.down
        out["lora_up.weight"] = adapter.up
        if adapter.mid is not None:
            out["lora_mid.weight"] = adapter.mid
        if adapter.dora_scale is not None:
            out["dora_scale"] = adapter.dora_scale
    elif isinstance(adapter, LoHa):
        out.update(hada_w1_a=adapter.w1a, hada_w1_b=adapter.w1b, hada_w2_a=adapter.w2a, hada_w2_b=adapter.w2b)
        if adapter.t1 is not None and adapter.t2 is not None:
            out.update(hada_t1=adapter.t1, hada_t2=adapter.t2)
    elif isinstance(adapter, LoKr):
        for key, value in (
            ("lokr_w1", adapter.w1),
            ("lokr_w1_a", adapter.w1a),
            ("lokr_w1_b", adapter.w1b),
            ("lokr_w2", adapter.w2),
            ("lokr_w2_a", adapter.w2a),
            ("lokr_w2_b", adapter.w2b),
            ("lokr_t2", adapter.t2),
        ):
            if value is not None:
                out[key] = value
    else:
        out["diff"] = adapter.diff
        if adapter.diff_b is not None:
            out["diff_b"] = adapter.diff_b
        return out
    out["alpha"] = torch.tensor(adapter.alpha, dtype=alpha_dtype)
    return out
