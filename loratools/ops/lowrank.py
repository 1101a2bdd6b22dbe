"""Low-rank algebra in factor space: exact SVDs of products without forming dense matrices.

For ``ΔW = U @ V`` with inner width k, ``QR(U) = Qu·Ru`` and ``QR(Vᵀ) = Qv·Rv`` give
``ΔW = Qu · (Ru Rvᵀ) · Qvᵀ``; the SVD of the k×k core is the SVD of ΔW. Cost O((out+in)·k²)
instead of O(out·in·min(out,in)), and the truncation is the optimal one (Eckart–Young).
LoHa and LoKr have exact low-rank factorizations too (Khatri–Rao and Kronecker structure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats.adapters import Adapter, Full, LoHa, LoKr, LowRank


@dataclass
class Factored:
    """``ΔW = up @ down`` (float32) with the singular values of ΔW, largest first."""

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in·kh·kw)
    singular_values: torch.Tensor  # (k,)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Factored:
    """SVD of ``up @ down`` through QR of each factor and an SVD of the small core.

    Returns ``U·diag(S)`` as up and ``Vh`` as down (all singular values in up, as kohya does).
    """
    up, down = up.to(torch.float32), down.to(torch.float32)
    k = up.shape[1]
    if k > min(up.shape[0], down.shape[1]):  # wider than the matrix: a dense SVD is cheaper
        u, s, vh = torch.linalg.svd(up @ down, full_matrices=False)
        return Factored(u * s, vh, s)
    qu, ru = torch.linalg.qr(up)
    qv, rv = torch.linalg.qr(down.t())
    u, s, vh = torch.linalg.svd(ru @ rv.t())
    return Factored((qu @ u) * s, vh @ qv.t(), s)


def choose_rank(singular_values: torch.Tensor, *, rank: int | None = None, error: float | None = None) -> int:
    """Rank to keep: ``rank`` (capped by what exists), or the smallest whose relative Frobenius
    error ``‖ΔW − ΔW_k‖ / ‖ΔW‖`` is at most ``error``. At least 1."""
    available = int(singular_values.numel())
    if rank is not None:
        return max(1, min(rank, available))
    if error is None:
        raise InputError("give a rank or an error bound")
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[i] = Σ_{j≥i} σ_j²
    for k in range(1, available + 1):
        remaining = float(tail[k]) if k < available else 0.0
        if math.sqrt(remaining / total) <= error:
            return k
    return available


def _khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: row i of the result is kron(a[i], b[i])."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _factor_svd(
    full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·S, Vh)`` of one Kronecker factor, keeping only its true rank when it is stored low-rank."""
    if full is not None:
        u, s, vh = torch.linalg.svd(full.to(torch.float32).reshape(full.shape[0], -1), full_matrices=False)
        return u * s, vh
    factored = svd_of_product(a.to(torch.float32), b.to(torch.float32).reshape(b.shape[0], -1))  # type: ignore[union-attr]
    return factored.up, factored.down


def factorize(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """An exact ``ΔW = up @ down`` (scale included, float32) and ΔW's shape, for any adapter kind.

    LoHa: ``(A1 B1) ⊙ (A2 B2) = (A1 ⊛ A2)(B1ᵀ ⊛ B2ᵀ)ᵀ`` with ⊛ the row-wise Kronecker product
    (rank ≤ r²). LoKr: ``kron(w1, w2)`` from the SVDs of w1 and w2 (rank = rank(w1)·rank(w2)).
    Tucker and full diffs fall back to the dense ΔW of that one module (``down`` is None then).
    """
    f32 = torch.float32
    if isinstance(adapter, LowRank) and adapter.mid is None:
        shape = adapter.delta_shape()
        up = adapter.up.to(f32).reshape(shape[0], adapter.rank) * adapter.scale
        return up, adapter.down.to(f32).reshape(adapter.rank, -1), shape
    if isinstance(adapter, LoHa) and adapter.t1 is None:
        up = _khatri_rao_rows(adapter.w1a.to(f32), adapter.w2a.to(f32)) * adapter.scale
        down = _khatri_rao_rows(adapter.w1b.to(f32).t(), adapter.w2b.to(f32).t()).t()
        shape = adapter.shape or (up.shape[0], down.shape[1])
        return up, down, shape
    if isinstance(adapter, LoKr) and adapter.t2 is None:
        # kron(U1 S1 V1ᵀ, U2 S2 V2ᵀ) = kron(U1 S1, U2 S2) · kron(V1, V2)ᵀ, from each factor's own SVD
        u1s1, v1 = _factor_svd(adapter.w1, adapter.w1a, adapter.w1b)
        u2s2, v2 = _factor_svd(adapter.w2, adapter.w2a, adapter.w2b)
        up = torch.kron(u1s1.contiguous(), u2s2.contiguous()) * adapter.scale
        down = torch.kron(v1.contiguous(), v2.contiguous())
        w2_shape = tuple(adapter.w2.shape) if adapter.w2 is not None else (u2s2.shape[0], v2.shape[1])
        natural = (u1s1.shape[0] * w2_shape[0], v1.shape[1] * w2_shape[1], *w2_shape[2:])
        shape = adapter.shape or natural
        return up, down, shape
    if isinstance(adapter, LowRank | LoHa | LoKr | Full):
        delta = adapter.delta()
        if isinstance(adapter, LowRank) and adapter.dora_scale is not None:
            raise InputError("a DoRA module's ΔW depends on the base weight; merge it into a checkpoint instead")
        return delta.reshape(delta.shape[0], -1), None, tuple(delta.shape)
    raise InputError(f"cannot factorize a {type(adapter).__name__}")


def to_lowrank(
    adapter: Adapter, *, rank: int | None = None, error: float | None = None, dtype: torch.dtype | None = None
) -> tuple[LowRank, float]:
    """The best rank-k LoRA approximation of any adapter, and its relative Frobenius error.

    The result has ``alpha = k`` (scale 1, singular values in ``up``); conv modules get the
    LoCon shapes ``down (k, in, kh, kw)``, ``up (out, k, 1, 1)``.
    """
    if getattr(adapter, "dora_scale", None) is not None:
        raise InputError("a DoRA module's ΔW depends on the base weight; merge it into a checkpoint instead")
    up, down, shape = factorize(adapter)
    if down is None:
        u, s, vh = torch.linalg.svd(up, full_matrices=False)
        factored = Factored(u * s, vh, s)
    else:
        factored = svd_of_product(up, down)
    k = choose_rank(factored.singular_values, rank=rank, error=error)
    s = factored.singular_values.to(torch.float64)
    total = float((s**2).sum())
    err = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    new_up, new_down = factored.up[:, :k], factored.down[:k]
    if len(shape) == 4:
        new_up = new_up.reshape(shape[0], k, 1, 1)
        new_down = new_down.reshape(k, *shape[1:])
    out_dtype = dtype or torch.float32
    return LowRank(new_up.contiguous().to(out_dtype), new_down.contiguous().to(out_dtype), float(k)), err
