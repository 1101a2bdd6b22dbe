"""Adapters from kohya-namespace parameter groups: LoRA/LoCon, LoHa, LoKr, full diff, DoRA.

LyCORIS writes every algorithm into the kohya name space (``lora_unet_…``); which algorithm a
module uses is told purely by which parameter suffixes exist, as ComfyUI does
(comfyanonymous/ComfyUI:comfy/lora.py (load_lora)). docs/FORMATS.md §4.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import InputError
from .adapters import Adapter, Full, LoHa, LoKr, LowRank
from .keys import (  # noqa: F401 (the parameter tables are re-exported)
    FULL_PARAMS,
    KNOWN_PARAMS,
    LOHA_PARAMS,
    LOKR_PARAMS,
    LORA_PARAMS,
    UNSUPPORTED,
    adapter_kind_of,
)

if TYPE_CHECKING:
    import torch


def read_alpha(params: dict[str, torch.Tensor], rank: int | None, name: str, warnings: list[str]) -> float:
    """alpha as a float; missing ⇒ rank (scale 1; the caller reports it); zero ⇒ kept (the loaders' scale 0), stated."""
    tensor = params.get("alpha")
    if tensor is None:
        return float(rank) if rank else 1.0
    if tensor.numel() != 1:
        raise InputError(f"{name}: alpha has {tensor.numel()} elements, expected one")
    value = _scalar(tensor)
    if not math.isfinite(value):
        raise InputError(f"{name}: alpha is {value}")
    if value == 0:
        warnings.append(f"{name}: alpha is 0, so the module has no effect (as in kohya's merge and ComfyUI)")
    return value


def _scalar(tensor: torch.Tensor) -> float:
    """A one-element tensor's value; a header-only view (:class:`.scan.ParamRef`) reads its bytes."""
    read = getattr(tensor, "scalar", None)
    if read is not None:
        return float(read())
    import torch

    return float(tensor.reshape(()).to(torch.float64))


def dora_axis(scale: torch.Tensor, out_features: int, in_features: int | None = None) -> str:
    """Which axis a stored DoRA magnitude normalises: ComfyUI's shape rule (docs/FORMATS.md §4.7).

    ``(out, 1[, 1, 1])`` (LyCORIS ≥ 3.2) or ``(out,)`` ⇒ "out"; ``(1, in[, 1, 1])`` (LyCORIS
    2.2–3.1) ⇒ "in". With ``in_features`` given, a vector that fits neither raises InputError.
    """
    shape = tuple(scale.shape)
    if scale.dim() >= 1 and shape[0] == out_features and scale.numel() == out_features:
        return "out"
    if in_features is None or (scale.dim() >= 2 and shape[0] == 1 and shape[1] == in_features == scale.numel()):
        return "in"
    raise InputError(
        f"dora_scale {shape} fits neither the output axis ({out_features}) nor the input axis ({in_features})"
    )


def _attach_dora(
    name: str, adapter: Adapter, params: dict[str, torch.Tensor], shape: tuple[int, ...] | None
) -> Adapter:
    scale = params.get("dora_scale")
    if scale is None:
        return adapter
    if not adapter.holds_dora:
        raise InputError(f"{name}: dora_scale on a full-diff module is not a LyCORIS layout")
    shape = shape or adapter.delta_shape()
    try:
        axis = dora_axis(scale, int(shape[0]), int(shape[1]))
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    return adapter.with_dora(scale, axis)


def _check_shape(name: str, adapter: Adapter, weight_shape: tuple[int, ...] | None) -> None:
    """The ΔW the factors describe must fill the target weight exactly (same element count, same out-dim)."""
    if weight_shape is None:
        return
    natural = adapter.natural_shape()
    if natural[0] != weight_shape[0] or math.prod(natural) != math.prod(weight_shape):
        raise InputError(
            f"{name}: the factors give a ΔW of shape {tuple(natural)}, the weight is {tuple(weight_shape)}"
        )


def _rank_error(name: str, what: str, shapes: dict[str, torch.Tensor]) -> InputError:
    listed = ", ".join(f"{k} {tuple(v.shape)}" for k, v in shapes.items())
    return InputError(f"{name}: {what} rank mismatch ({listed})")


def _read_lora(name: str, params: dict[str, torch.Tensor], warnings: list[str]) -> LowRank:
    keys = set(params)
    if "lora_down.weight" not in params or "lora_up.weight" not in params:
        raise InputError(f"{name}: lora_down/lora_up pair incomplete ({sorted(keys)})")
    up, down, mid = params["lora_up.weight"], params["lora_down.weight"], params.get("lora_mid.weight")
    rank = int(down.shape[0])
    if (
        up.dim() < 2
        or down.dim() < 2
        or int(up.shape[1]) != rank
        or any(int(k) != 1 for k in up.shape[2:])
        or (mid is not None and tuple(mid.shape[:2]) != (rank, rank))
    ):
        shown = {"lora_down": down, "lora_up": up} | ({"lora_mid": mid} if mid is not None else {})
        raise _rank_error(name, "LoRA", shown)
    if mid is not None and any(int(k) != 1 for k in down.shape[2:]):
        raise InputError(f"{name}: a Tucker lora_down must be (r, in, 1, 1), got {tuple(down.shape)}")
    return LowRank.from_tensors(params, read_alpha(params, rank, name, warnings))


def _read_loha(name: str, params: dict[str, torch.Tensor], shape: tuple[int, ...] | None, warnings: list[str]) -> LoHa:
    keys = set(params)
    if not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
        raise InputError(f"{name}: LoHa factors incomplete ({sorted(keys)})")
    if ("hada_t1" in keys) != ("hada_t2" in keys):
        raise InputError(f"{name}: LoHa Tucker needs both hada_t1 and hada_t2 ({sorted(keys)})")
    w1a, w1b, w2a, w2b = (params[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    t1, t2 = params.get("hada_t1"), params.get("hada_t2")
    rank = int(w1b.shape[0])
    if t1 is not None and t2 is not None:
        # Tucker: w?_a (r, out), w?_b (r, in), t? (r, r, kh, kw) (LyCORIS LohaModule.__init__)
        ok = (
            w1a.dim() == w1b.dim() == w2a.dim() == w2b.dim() == 2
            and int(w1a.shape[0]) == rank
            and tuple(t1.shape[:2]) == (rank, rank)
            and int(w2a.shape[0]) == int(w2b.shape[0]) == t2.shape[0] == t2.shape[1]
            and w1a.shape[1] == w2a.shape[1]
            and w1b.shape[1] == w2b.shape[1]
            and t1.shape[2:] == t2.shape[2:]
        )
    else:
        ok = (
            w1a.dim() >= 2
            and w2a.dim() >= 2
            and int(w1a.shape[1]) == rank
            and int(w2a.shape[1]) == int(w2b.shape[0])
            and w1a.shape[0] == w2a.shape[0]
            and math.prod(w1b.shape[1:]) == math.prod(w2b.shape[1:])
        )
    if not ok:
        factors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
        if t1 is not None and t2 is not None:
            factors |= {"hada_t1": t1, "hada_t2": t2}
        raise _rank_error(name, "LoHa", factors)
    if int(w2b.shape[0]) != rank:
        warnings.append(f"{name}: LoHa halves have ranks {rank} and {int(w2b.shape[0])}; scale uses {rank} (hada_w1_b)")
    return LoHa.from_tensors(params, read_alpha(params, rank, name, warnings), shape)


def _read_lokr(name: str, params: dict[str, torch.Tensor], shape: tuple[int, ...] | None, warnings: list[str]) -> LoKr:
    keys = set(params)
    has_w1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
    has_w2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
    if not has_w1 or not has_w2:
        raise InputError(f"{name}: LoKr factors incomplete ({sorted(keys)})")
    if ("lokr_w1" in keys and keys & {"lokr_w1_a", "lokr_w1_b"}) or (
        "lokr_w2" in keys and keys & {"lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    ):
        raise InputError(f"{name}: LoKr half given both full and factored ({sorted(keys)})")
    adapter = LoKr.from_tensors(params, 0.0, shape)
    ranks = []
    if adapter.w1a is not None and adapter.w1b is not None:
        if adapter.w1a.dim() != 2 or adapter.w1b.dim() != 2 or adapter.w1a.shape[1] != adapter.w1b.shape[0]:
            raise _rank_error(name, "LoKr w1", {"lokr_w1_a": adapter.w1a, "lokr_w1_b": adapter.w1b})
        ranks.append(int(adapter.w1b.shape[0]))
    if adapter.w2a is not None and adapter.w2b is not None:
        t2 = adapter.t2
        if t2 is not None:  # Tucker: t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d)
            ok = adapter.w2a.dim() == adapter.w2b.dim() == 2 and (
                adapter.w2a.shape[0] == adapter.w2b.shape[0] == t2.shape[0] == t2.shape[1]
            )
        else:
            ok = adapter.w2a.dim() == 2 and adapter.w2a.shape[1] == adapter.w2b.shape[0]
        if not ok:
            factors = {"lokr_w2_a": adapter.w2a, "lokr_w2_b": adapter.w2b}
            raise _rank_error(name, "LoKr w2", factors | ({"lokr_t2": t2} if t2 is not None else {}))
        ranks.append(int(adapter.w2b.shape[0]))
    if len(set(ranks)) > 1:
        warnings.append(
            f"{name}: LoKr halves have ranks {ranks[0]} and {ranks[1]}; scale uses {ranks[0]} (lokr_w1_b), "
            "as LyCORIS does (ComfyUI would use lokr_w2_b's)"
        )
    # Both halves full: scale 1 whatever alpha says (LyCORIS stores alpha = its lora_dim then).
    adapter.alpha = read_alpha(params, adapter.rank, name, warnings)
    return adapter


def adapter_from_params(
    name: str, params: dict[str, torch.Tensor], weight_shape: tuple[int, ...] | None, warnings: list[str]
) -> Adapter:
    """Build the adapter a kohya/LyCORIS parameter group describes (docs/FORMATS.md §4).

    ``weight_shape``: the target module's weight shape; the factors must describe a ΔW that fills
    it (InputError otherwise), and LoHa/LoKr reshape their product to it (kernel axes folded in
    the old 2-D conv layout). A missing alpha becomes ``alpha = r`` (scale 1); reporting that is
    the caller's job (one warning per file).
    """
    kind = adapter_kind_of(name, set(params))
    adapter: Adapter
    if kind == "lora":
        adapter = _read_lora(name, params, warnings)
    elif kind == "loha":
        adapter = _read_loha(name, params, weight_shape, warnings)
    elif kind == "lokr":
        adapter = _read_lokr(name, params, weight_shape, warnings)
    else:
        if "diff" not in params:
            raise InputError(f"{name}: full-diff module has diff_b but no diff")
        if "alpha" in params:
            warnings.append(f"{name}: a full-diff module has no scale; its alpha is ignored")
        adapter = Full.from_tensors(params)
        if weight_shape is not None and tuple(adapter.diff.shape) != tuple(weight_shape):
            raise InputError(
                f"{name}: diff {tuple(adapter.diff.shape)} is not the weight's shape {tuple(weight_shape)}"
            )
    _check_shape(name, adapter, weight_shape)
    return _attach_dora(name, adapter, params, weight_shape)


def adapter_params(adapter: Adapter, alpha_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS parameter group of an adapter (inverse of :func:`adapter_from_params`):
    its :meth:`~.adapters.AdapterKind.tensors`, then ``alpha`` for kinds that store one;
    ``alpha_dtype`` None leaves ``alpha`` out (its factors only, torch-free)."""
    out = adapter.tensors()
    if adapter.stores_alpha and alpha_dtype is not None:
        import torch

        out["alpha"] = torch.tensor(adapter.alpha, dtype=alpha_dtype)
    return out
