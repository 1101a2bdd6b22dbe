"""One representation for every LoRA dialect: adapters keyed by canonical module name.

Every adapter carries an explicit ``alpha`` with the kohya/LyCORIS convention ``scale = alpha / r``
(docs/FORMATS.md §0). Readers translate other conventions into it — peft's rsLoRA ``alpha / √r`` becomes
``alpha·√r``, a missing alpha becomes ``alpha = r`` (scale 1, reported), cloneofsimo's raw product
becomes ``alpha = r`` — so every operation sees one rule. Factor tensors keep their file dtype;
ΔW is always computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeGuard, Union

from ..families.spec import FamilySpec
from .verdict import VERBATIM, ModelVerdict, sd_verdict, unknown_verdict

if TYPE_CHECKING:
    import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.to(torch.float32)


def _shaped(delta: torch.Tensor, shape: tuple[int, ...] | None, what: str) -> torch.Tensor:
    """``delta`` reshaped to the weight shape; a factor set that cannot fill it is an error, never ignored."""
    if shape is None or tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != math.prod(shape):
        raise ValueError(f"{what}: ΔW {tuple(delta.shape)} cannot be reshaped to the weight {tuple(shape)}")
    return delta.reshape(shape)


# ``(U·S, Vh)`` of ``up @ down``: the factor-space SVD lives in ops/lowrank (svd_of_product), above
# this layer, so kinds that need one take it as an argument; the default is the dense SVD.
PairSVD = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]
Factors = tuple["torch.Tensor", Union["torch.Tensor", None], tuple[int, ...]]


def dense_pair_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·S, Vh)`` of ``up @ down`` by a dense float64 SVD (the default :data:`PairSVD`)."""
    import torch

    u, s, vh = torch.linalg.svd(up.to(torch.float64) @ down.to(torch.float64), full_matrices=False)
    return u * s, vh


def _compute_dtype(adapter: object) -> torch.dtype:
    """float64 factors stay float64; everything else is computed in float32."""
    import torch

    return torch.float64 if factor_dtype(adapter) == torch.float64 else torch.float32


def _dense_factors(delta: torch.Tensor) -> Factors:
    """A dense ΔW as ``(ΔW as a matrix, None, ΔW's shape)``: kinds with no exact product form."""
    return delta.reshape(delta.shape[0], -1), None, tuple(delta.shape)


def _khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: row i of the result is kron(a[i], b[i])."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def _signed(t: torch.Tensor, negative: bool) -> torch.Tensor:
    import torch

    return torch.neg(t) if negative else t  # a sign flip is exact in every float dtype


def _times(t: torch.Tensor, by: float) -> torch.Tensor:
    import torch

    return (t.to(torch.float32) * by).to(t.dtype)


def _present(adapter: object, params: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """The adapter's stored tensors under their LyCORIS/kohya names, in ``params`` order."""
    out = {}
    for attr, name in params:
        value = getattr(adapter, attr)
        if value is not None:
            out[name] = value
    return out


@dataclass
class LowRank:
    """``ΔW = alpha/r · up @ down`` (Linear or conv; Tucker ``mid`` for k×k convs; optional DoRA).

    Shapes: ``up (out, r[, 1, 1])``, ``down (r, in[, kh, kw])``; with ``mid (r, r, kh, kw)`` the
    down factor is ``(r, in, 1, 1)`` and ``ΔW[o,i] = Σ up[o,m]·mid[m,n]·down[n,i]``
    (KohakuBlueleaf/LyCORIS:lycoris/functional/locon.py (diff_weight via general.rebuild_tucker);
    comfyanonymous/ComfyUI:comfy/weight_adapter/base.py (tucker_weight_from_conv)).
    ``dora_scale`` is the magnitude vector as stored, with ``dora_axis`` saying which axis it
    normalises ("out" rows or "in" columns); see :func:`apply_dora`.
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    dora_axis: str | None = None
    kind = "lora"
    # (attribute, LyCORIS/kohya parameter name) in the order the writers emit them
    PARAMS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("down", "lora_down.weight"),
        ("up", "lora_up.weight"),
        ("mid", "lora_mid.weight"),
        ("dora_scale", "dora_scale"),
    )
    stores_alpha: ClassVar[bool] = True
    holds_dora: ClassVar[bool] = True

    @classmethod
    def from_tensors(cls, params: Mapping[str, torch.Tensor], alpha: float) -> LowRank:
        """From a parameter group in LyCORIS/kohya names (the readers have checked the shapes)."""
        return cls(params["lora_up.weight"], params["lora_down.weight"], alpha, params.get("lora_mid.weight"))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors under their LyCORIS/kohya names (no alpha), in written order."""
        return _present(self, self.PARAMS)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_pair(self) -> bool:
        """``ΔW = scale·up @ down`` with no Tucker core (DoRA or not)."""
        return self.mid is None

    @property
    def is_plain(self) -> bool:
        """A plain two-factor LoRA/LoCon: no Tucker core, no DoRA magnitude."""
        return self.mid is None and self.dora_scale is None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def natural_shape(self) -> tuple[int, ...]:
        """The shape the factors give (a pair's is the weight's own)."""
        return self.delta_shape()

    def delta_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.out_features, int(self.down.shape[1]), *self.mid.shape[2:])
        if self.down.dim() == 4:
            return (self.out_features, *self.down.shape[1:])
        return (self.out_features, int(self.down.shape[1]))

    @property
    def form(self) -> str:
        """lora, locon (a conv kernel other than 1×1) or tucker, DoRA aside (resize's rows).

        A kernel is a 1×1 one only when both axes are 1, as kohya decides it
        (kohya-ss/sd-scripts:networks/lora.py (LoRAInfModule.merge_to): ``down.size()[2:4] == (1, 1)``).
        """
        if self.mid is not None:
            return "tucker"
        return "locon" if self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1) else "lora"

    @property
    def label(self) -> str:
        """The kind as inspect and diff show it: lora, locon (k×k conv), tucker, dora."""
        return "dora" if self.dora_scale is not None else self.form

    @property
    def tally(self) -> str:
        """The name :attr:`LoraFile.kinds` counts this module under: lora or dora."""
        return "dora" if self.dora_scale is not None else self.kind

    def delta(self) -> torch.Tensor:
        """ΔW in float32, shaped like the weight (without DoRA, which needs the base weight)."""
        import torch

        up = _f32(self.up).reshape(self.out_features, self.rank)
        if self.mid is not None:
            down = _f32(self.down).reshape(self.rank, -1)  # (r, in)
            mid = _f32(self.mid)  # (r, r, kh, kw)
            # ΔW[o,i,:,:] = Σ_{m,n} up[o,m] · mid[m,n,:,:] · down[n,i]  (LyCORIS rebuild_tucker)
            delta = torch.einsum("om,mn...,ni->oi...", up, mid, down)
        else:
            delta = (up @ _f32(self.down).reshape(self.rank, -1)).reshape(self.delta_shape())
        return delta * self.scale

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def rescaled(self, by: float) -> tuple[LowRank, str]:
        """``by·ΔW``: ``|by|`` into alpha, a negative sign into ``up`` (factors kept bit for bit)."""
        return replace(self, up=_signed(self.up, by < 0), alpha=self.alpha * abs(by)), _sign_route(by)

    def product_factors(self, include_scale: bool = True, svd: PairSVD = dense_pair_svd) -> Factors:
        """``(up, down, shape)`` with ``ΔW = up @ down`` exactly (``down`` None: dense ΔW, Tucker).

        ``include_scale=False`` returns the pair as stored (its own dtype, ``alpha/r`` left out);
        otherwise float32 (float64 factors stay float64). DoRA is not applied (it needs the base
        weight). ``svd`` is unused: a pair is its own factorization.
        """
        if self.mid is not None:
            return _dense_factors(self.delta())
        shape = self.delta_shape()
        up, down = self.up.reshape(shape[0], self.rank), self.down.reshape(self.rank, -1)
        if not include_scale:  # the raw factors as stored: callers convert once, to what they need
            return up, down, shape
        dtype = _compute_dtype(self)
        return up.to(dtype) * self.scale, down.to(dtype), shape

    def kron_halves(self) -> None:
        """Not a Kronecker product (see :meth:`LoKr.kron_halves`)."""
        return None

    def with_dora(self, scale: torch.Tensor, axis: str) -> LowRank:
        return replace(self, dora_scale=scale, dora_axis=axis)

    def baked(self) -> LowRank:
        """The scale folded into the factors: ``alpha := r``, ``up := up·alpha/r`` (ΔW unchanged).

        Computed in float32 and stored back in ``up``'s dtype; a negative scale flips ``up`` — no
        square root of a signed number is ever taken.
        """
        import torch

        if self.alpha == self.rank:
            return self
        up = (self.up.to(torch.float32) * self.scale).to(self.up.dtype)
        return replace(self, up=up, alpha=float(self.rank))


def _sign_route(by: float) -> str:
    """How a rescale carried ``by``: alpha, plus a sign flip in one factor when negative."""
    return "alpha+sign" if by < 0 else "alpha"


def _half_svd(
    full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, svd: PairSVD
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·S, Vh)`` of one Kronecker half, keeping only its true rank when it is stored low-rank."""
    import torch

    if full is not None:
        u, s, vh = torch.linalg.svd(full.to(torch.float64).reshape(full.shape[0], -1), full_matrices=False)
        return u * s, vh
    a, b = _given(a, "lokr_w_a"), _given(b, "lokr_w_b")
    return svd(a.to(torch.float64), b.to(torch.float64).reshape(b.shape[0], -1))


def _given(tensor: torch.Tensor | None, what: str) -> torch.Tensor:
    """A factor the adapter's layout requires (the readers check it is there)."""
    if tensor is None:
        raise ValueError(f"LoKr factor {what} missing")
    return tensor


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``M[p,q,…] = Σ_{i,j} t[i,j,…] · a[i,p] · b[j,q]`` (LyCORIS functional.general.rebuild_tucker)."""
    import torch

    return torch.einsum("ij...,ip,jq->pq...", _f32(t), _f32(a), _f32(b))


@dataclass
class LoHa:
    """``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r``, ``r = w1b.shape[0]`` (LyCORIS HadaWeight).

    Plain: ``w1a, w2a (out, r)``, ``w1b, w2b (r, in·kh·kw)`` (the kernel folded into the columns;
    ``shape`` restores it). Tucker (k×k conv): ``w1a, w2a (r, out)``, ``w1b, w2b (r, in)``,
    ``t1, t2 (r, r, kh, kw)`` and each Hadamard half is ``rebuild_tucker(t, a, b)``
    (LyCORIS HadaWeightTucker; ComfyUI comfy/weight_adapter/loha.py (calculate_weight)).
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None  # the weight shape, when the factors cannot tell it
    dora_scale: torch.Tensor | None = None
    dora_axis: str | None = None
    kind = "loha"
    PARAMS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("w1a", "hada_w1_a"),
        ("w1b", "hada_w1_b"),
        ("w2a", "hada_w2_a"),
        ("w2b", "hada_w2_b"),
        ("t1", "hada_t1"),
        ("t2", "hada_t2"),
        ("dora_scale", "dora_scale"),
    )
    stores_alpha: ClassVar[bool] = True
    holds_dora: ClassVar[bool] = True
    is_pair: ClassVar[bool] = False
    is_plain: ClassVar[bool] = False

    @classmethod
    def from_tensors(
        cls, params: Mapping[str, torch.Tensor], alpha: float, shape: tuple[int, ...] | None = None
    ) -> LoHa:
        """From a parameter group in LyCORIS names (the readers have checked the shapes)."""
        w1a, w1b, w2a, w2b = (params[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return cls(w1a, w1b, w2a, w2b, alpha, params.get("hada_t1"), params.get("hada_t2"), shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors under their LyCORIS names (no alpha), in written order."""
        return _present(self, self.PARAMS)

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def natural_shape(self) -> tuple[int, ...]:
        """The shape the factors give before any reshape to the weight."""
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1a.shape[0]), *self.w1b.shape[1:])

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape is not None else self.natural_shape()

    @property
    def form(self) -> str:
        return self.kind

    @property
    def label(self) -> str:
        """The kind as inspect and diff show it (``+dora`` with a magnitude)."""
        return self.kind + ("+dora" if self.dora_scale is not None else "")

    @property
    def tally(self) -> str:
        return self.label

    def delta(self) -> torch.Tensor:
        if self.t1 is not None and self.t2 is not None:
            delta = _tucker(self.t1, self.w1a, self.w1b) * _tucker(self.t2, self.w2a, self.w2b)
        else:
            m1 = _f32(self.w1a).reshape(self.w1a.shape[0], -1) @ _f32(self.w1b).reshape(self.w1b.shape[0], -1)
            m2 = _f32(self.w2a).reshape(self.w2a.shape[0], -1) @ _f32(self.w2b).reshape(self.w2b.shape[0], -1)
            delta = (m1 * m2).reshape(self.natural_shape())
        return _shaped(delta * self.scale, self.shape, "LoHa")

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def rescaled(self, by: float) -> tuple[LoHa, str]:
        """``by·ΔW``: ``|by|`` into alpha, a negative sign into ``w1a``."""
        return replace(self, w1a=_signed(self.w1a, by < 0), alpha=self.alpha * abs(by)), _sign_route(by)

    def product_factors(self, include_scale: bool = True, svd: PairSVD = dense_pair_svd) -> Factors:
        """``(A1 B1) ⊙ (A2 B2) = (A1 ⊛ A2)(B1ᵀ ⊛ B2ᵀ)ᵀ`` with ⊛ the row-wise Kronecker product
        (rank ≤ r²), scale included; Tucker falls back to the dense ΔW (``down`` None)."""
        if self.t1 is not None:
            return _dense_factors(self.delta())
        dtype = _compute_dtype(self)
        up = _khatri_rao_rows(self.w1a.to(dtype), self.w2a.to(dtype)) * self.scale
        down = _khatri_rao_rows(self.w1b.to(dtype).t(), self.w2b.to(dtype).t()).t()
        return up, down, self.shape or (up.shape[0], down.shape[1])

    def kron_halves(self) -> None:
        return None

    def with_dora(self, scale: torch.Tensor, axis: str) -> LoHa:
        return replace(self, dora_scale=scale, dora_axis=axis)


@dataclass
class LoKr:
    """``ΔW = kron(w1, w2) · scale`` (LyCORIS functional.lokr.make_kron); either factor full or low-rank.

    ``w1 = lokr_w1 (a, c)`` or ``w1a (a, r) @ w1b (r, c)``; ``w2 = lokr_w2 (b, d[, kh, kw])``, or
    ``w2a (b, r) @ w2b (r, d[·kh·kw])`` (a 4-D ``w2b (r, d, kh, kw)`` keeps its kernel axes), or,
    Tucker, ``rebuild_tucker(t2 (r, r, kh, kw), w2a (r, b), w2b (r, d))``. For a 4-D ``w2`` the
    2-D ``w1`` gets two trailing unit axes, so ``kron`` gives ``(a·b, c·d, kh, kw)``; in the old
    2-D conv layout both factors are flat and the ``(a·b, c·d·kh·kw)`` product — or, in the oldest
    files, a factorisation of ``in·kh·kw`` as a whole — is reshaped to the weight
    (ComfyUI comfy/weight_adapter/lokr.py (calculate_weight): ``kron(w1, w2).reshape(weight.shape)``).
    Scale ``alpha / r`` with ``r`` the inner width of ``w1b`` if present, else of ``w2b``; both
    halves full ⇒ scale 1 (docs/FORMATS.md §4.3, §4.8).
    """

    alpha: float
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None
    dora_scale: torch.Tensor | None = None
    dora_axis: str | None = None
    kind = "lokr"
    PARAMS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("w1", "lokr_w1"),
        ("w1a", "lokr_w1_a"),
        ("w1b", "lokr_w1_b"),
        ("w2", "lokr_w2"),
        ("w2a", "lokr_w2_a"),
        ("w2b", "lokr_w2_b"),
        ("t2", "lokr_t2"),
        ("dora_scale", "dora_scale"),
    )
    stores_alpha: ClassVar[bool] = True  # LyCORIS writes one even when both halves are full
    holds_dora: ClassVar[bool] = True
    is_pair: ClassVar[bool] = False
    is_plain: ClassVar[bool] = False

    @classmethod
    def from_tensors(
        cls, params: Mapping[str, torch.Tensor], alpha: float, shape: tuple[int, ...] | None = None
    ) -> LoKr:
        """From a parameter group in LyCORIS names (the readers check the shapes)."""
        w1, w1a, w1b, w2, w2a, w2b, t2 = (params.get(name) for attr, name in cls.PARAMS if attr != "dora_scale")
        return cls(alpha, w1, w1a, w1b, w2, w2a, w2b, t2, shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors under their LyCORIS names (no alpha), in written order."""
        return _present(self, self.PARAMS)

    @property
    def rank(self) -> int | None:
        """Inner width of the decomposed factor (w1 first), None when both are full matrices."""
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return None

    @property
    def scale(self) -> float:
        # Both halves full: LyCORIS forces alpha = r, ComfyUI uses 1.0 (docs/FORMATS.md §4.3, §4.8).
        return 1.0 if self.rank is None else self.alpha / self.rank

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return (int(self.w1.shape[0]), int(self.w1.shape[1]))
        return (int(_given(self.w1a, "lokr_w1_a").shape[0]), int(_given(self.w1b, "lokr_w1_b").shape[1]))

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            w2a, w2b = _given(self.w2a, "lokr_w2_a"), _given(self.w2b, "lokr_w2_b")
            return (int(w2a.shape[1]), int(w2b.shape[1]), *self.t2.shape[2:])
        return (int(_given(self.w2a, "lokr_w2_a").shape[0]), *_given(self.w2b, "lokr_w2_b").shape[1:])

    def natural_shape(self) -> tuple[int, ...]:
        """The kron product's shape before any reshape to the weight."""
        (a, c), w2 = self._w1_shape(), self._w2_shape()
        return (a * w2[0], c * w2[1], *w2[2:])

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape is not None else self.natural_shape()

    @property
    def form(self) -> str:
        return self.kind

    @property
    def label(self) -> str:
        """The kind as inspect and diff show it (``+dora`` with a magnitude)."""
        return self.kind + ("+dora" if self.dora_scale is not None else "")

    @property
    def tally(self) -> str:
        return self.label

    def _w1(self) -> torch.Tensor:
        if self.w1 is not None:
            return _f32(self.w1)
        return _f32(_given(self.w1a, "lokr_w1_a")) @ _f32(_given(self.w1b, "lokr_w1_b"))

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return _f32(self.w2)
        if self.t2 is not None:
            return _tucker(self.t2, _given(self.w2a, "lokr_w2_a"), _given(self.w2b, "lokr_w2_b"))
        w2a, w2b = _f32(_given(self.w2a, "lokr_w2_a")), _f32(_given(self.w2b, "lokr_w2_b"))
        return (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(w2a.shape[0], *w2b.shape[1:])

    def delta(self) -> torch.Tensor:
        import torch

        w1, w2 = self._w1(), self._w2().contiguous()  # torch.kron fails on einsum's strided output
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        return _shaped(torch.kron(w1.contiguous(), w2) * self.scale, self.shape, "LoKr")

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def rescaled(self, by: float) -> tuple[LoKr, str]:
        """``by·ΔW``: ``|by|`` into alpha and a negative sign into ``w1``/``w1a``; with both halves
        full the scale is fixed at 1, so ``by`` multiplies ``w1`` ("factor")."""
        negative = by < 0
        if self.rank is None:
            return replace(self, w1=_times(_given(self.w1, "lokr_w1"), by)), "factor"
        if self.w1 is not None:
            return replace(self, w1=_signed(self.w1, negative), alpha=self.alpha * abs(by)), _sign_route(by)
        w1a = _signed(self.w1a, negative) if self.w1a is not None else None
        return replace(self, w1a=w1a, alpha=self.alpha * abs(by)), _sign_route(by)

    def product_factors(self, include_scale: bool = True, svd: PairSVD = dense_pair_svd) -> Factors:
        """``kron(U1 S1 V1ᵀ, U2 S2 V2ᵀ) = kron(U1 S1, U2 S2) · kron(V1, V2)ᵀ`` from each half's own SVD
        (rank = rank(w1)·rank(w2)), scale included. A full half gets a dense SVD, a factored one
        ``svd`` of its pair (ops/lowrank passes its factor-space one). Tucker: dense ΔW."""
        import torch

        if self.t2 is not None:
            return _dense_factors(self.delta())
        u1s1, v1 = _half_svd(self.w1, self.w1a, self.w1b, svd)
        u2s2, v2 = _half_svd(self.w2, self.w2a, self.w2b, svd)
        up = torch.kron(u1s1.contiguous(), u2s2.contiguous()) * self.scale
        down = torch.kron(v1.contiguous(), v2.contiguous())
        w2_shape = tuple(self.w2.shape) if self.w2 is not None else (u2s2.shape[0], v2.shape[1])
        natural = (u1s1.shape[0] * w2_shape[0], v1.shape[1] * w2_shape[1], *w2_shape[2:])
        return up, down, self.shape or natural

    def kron_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` in float32 with ``ΔW = scale·kron(w1, w2)`` (before any reshape to the weight)."""
        return self._w1(), self._w2()

    def with_dora(self, scale: torch.Tensor, axis: str) -> LoKr:
        return replace(self, dora_scale=scale, dora_axis=axis)


@dataclass
class Full:
    """A stored weight difference: ``W' = W + diff`` (and ``b' = b + diff_b``); no alpha, scale 1.

    (KohakuBlueleaf/LyCORIS:lycoris/modules/full.py (custom_state_dict); ComfyUI "diff" patches.)
    """

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    alpha: float = 1.0
    kind = "full"
    PARAMS: ClassVar[tuple[tuple[str, str], ...]] = (("diff", "diff"), ("diff_b", "diff_b"))
    stores_alpha: ClassVar[bool] = False  # no scale: a full diff is written without alpha
    holds_dora: ClassVar[bool] = False
    is_pair: ClassVar[bool] = False
    is_plain: ClassVar[bool] = False
    dora_scale: ClassVar[None] = None
    dora_axis: ClassVar[None] = None

    @classmethod
    def from_tensors(cls, params: Mapping[str, torch.Tensor]) -> Full:
        """From ``diff`` (and ``diff_b``)."""
        return cls(params["diff"], params.get("diff_b"))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``diff`` (and ``diff_b``), the LyCORIS names."""
        return _present(self, self.PARAMS)

    @property
    def rank(self) -> None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def natural_shape(self) -> tuple[int, ...]:
        return self.delta_shape()

    @property
    def form(self) -> str:
        return self.kind

    @property
    def label(self) -> str:
        return self.kind

    @property
    def tally(self) -> str:
        return self.kind

    def delta(self) -> torch.Tensor:
        return _f32(self.diff)

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else _f32(self.diff_b)

    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def rescaled(self, by: float) -> tuple[Full, str]:
        """``by·diff`` (and ``by·diff_b``): no alpha to carry it ("factor")."""
        diff_b = None if self.diff_b is None else _times(self.diff_b, by)
        return replace(self, diff=_times(self.diff, by), diff_b=diff_b), "factor"

    def product_factors(self, include_scale: bool = True, svd: PairSVD = dense_pair_svd) -> Factors:
        """The dense ΔW (``down`` None): a stored difference has no product form."""
        return _dense_factors(self.delta())

    def kron_halves(self) -> None:
        return None

    def with_dora(self, scale: torch.Tensor, axis: str) -> Full:
        raise ValueError("a full-diff module holds no DoRA magnitude")


def factor_dtype(adapter: object) -> torch.dtype:
    """The dtype an adapter's factors are stored in (its first floating-point tensor)."""
    import torch

    for value in vars(adapter).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


Adapter = Union[LowRank, LoHa, LoKr, Full]  # noqa: UP007 (a runtime alias)


class AdapterKind(Protocol):
    """What every adapter kind offers, so operations call it instead of branching on the class.

    :data:`Adapter` (the union) is what signatures take; this protocol lists the shared API and
    mypy checks each kind against it (:data:`KINDS`).
    """

    kind: str  # lora / loha / lokr / full
    alpha: float
    PARAMS: ClassVar[tuple[tuple[str, str], ...]]  # (attribute, LyCORIS/kohya name), written order

    @property
    def rank(self) -> int | None: ...
    @property
    def scale(self) -> float: ...
    @property
    def form(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def tally(self) -> str: ...
    @property
    def is_pair(self) -> bool: ...
    @property
    def is_plain(self) -> bool: ...
    @property
    def stores_alpha(self) -> bool: ...
    @property
    def holds_dora(self) -> bool: ...
    @property
    def dora_scale(self) -> torch.Tensor | None: ...
    def delta_shape(self) -> tuple[int, ...]: ...
    def natural_shape(self) -> tuple[int, ...]: ...
    def delta(self) -> torch.Tensor: ...
    def parameters(self) -> int: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def rescaled(self, by: float) -> tuple[Adapter, str]: ...
    def product_factors(self, include_scale: bool = True, svd: PairSVD = dense_pair_svd) -> Factors: ...
    def kron_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    def with_dora(self, scale: torch.Tensor, axis: str) -> Adapter: ...


KINDS: tuple[type[AdapterKind], ...] = (LowRank, LoHa, LoKr, Full)  # mypy checks each against the protocol


def plain_lora(adapter: Adapter) -> TypeGuard[LowRank]:
    """:attr:`~LowRank.is_plain`, narrowing for mypy (only a LowRank is plain)."""
    return adapter.is_plain


def lora_pair(adapter: Adapter) -> TypeGuard[LowRank]:
    """:attr:`~LowRank.is_pair` (up @ down, DoRA or not), narrowing for mypy."""
    return adapter.is_pair


def low_rank(adapter: Adapter) -> TypeGuard[LowRank]:
    """A LowRank of any form (pair, Tucker, DoRA): what has an ``up`` a scale can be folded into."""
    return adapter.kind == LowRank.kind


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``: one sum first (NaN and ±inf survive a sum; 3× faster than a
    float64 sum and 7× faster than an elementwise isfinite on CPU); a sum that is not finite —
    real NaN/inf, or values near their dtype's maximum overflowing it — is confirmed elementwise.

    bfloat16 is summed in its own dtype: torch accumulates it in float32 anyway, and
    ``sum(dtype=float32)`` converts every element first (0.20 s against 0.013 s for 66M elements,
    one thread) — a merge checks every patched FLUX.1 weight, 12B of them. Its result overflows
    only where a float32 sum would. float16 is not: its own sum's result overflows at 65,504.
    """
    import torch

    tensor = tensor.detach()
    total = tensor.sum() if tensor.dtype == torch.bfloat16 else tensor.sum(dtype=torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(tensor).all())


def is_finite(adapter: Adapter) -> bool:
    """Whether every floating-point factor of ``adapter`` is free of NaN and inf (:func:`all_finite`)."""
    import torch

    return all(all_finite(v) for v in vars(adapter).values() if isinstance(v, torch.Tensor) and v.is_floating_point())


DORA_EPS = 2.0**-23  # torch.finfo(torch.float32).eps, without importing torch here


def dora_magnitude(adapter: Adapter, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The stored DoRA magnitude as a float32 tensor that broadcasts against the weight.

    ``dora_axis == "out"``: one value per output row, shaped ``(out, 1, …)``; ``"in"``: one per
    input column, ``(1, in, 1, …)``. Reshaped explicitly — never left to broadcasting a 1-D vector,
    the ComfyUI ``(N,)`` → ``(N, N)`` bug (docs/FORMATS.md §4.8).
    """
    scale = getattr(adapter, "dora_scale", None)
    axis = getattr(adapter, "dora_axis", None)
    if scale is None:
        raise ValueError(f"a {adapter.kind} module without dora_scale has no DoRA magnitude")
    ones = [1] * (len(weight_shape) - 1)
    if axis == "out":
        shape = (weight_shape[0], *ones)
    elif axis == "in":
        shape = (1, weight_shape[1], *ones[1:])
    else:
        raise ValueError(f"unknown DoRA axis {axis!r}")
    if scale.numel() != math.prod(shape):
        raise ValueError(
            f"dora_scale {tuple(scale.shape)} does not fit the {axis}-axis of a {tuple(weight_shape)} weight"
        )
    return _f32(scale).reshape(shape)


def weight_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ per output row (``axis="out"``, shape ``(out, 1, …)``) or per input column (``(1, in, 1, …)``)."""
    import torch

    dims = tuple(d for d in range(weight.dim()) if d != (0 if axis == "out" else 1))
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def apply_dora(weight: torch.Tensor, adapter: Adapter, strength: float = 1.0) -> torch.Tensor:
    """The DoRA-merged weight ``W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps)``, in float32.

    ``m`` is the adapter's ``dora_scale``, the norm taken along its ``dora_axis``: per output row
    (LyCORIS ≥ 3.2 ``wd_on_out=True``, peft) or per input column (LyCORIS 2.2–3.1). ``eps`` is
    float32's machine epsilon added to the norm, as LyCORIS does
    (KohakuBlueleaf/LyCORIS:lycoris/functional/general.py (weight_decompose): ``norm + finfo.eps``;
    ComfyUI comfy/weight_adapter/base.py (weight_decompose) divides without it). ΔW is the
    adapter's full, alpha-scaled delta — only ``strength == 1`` is defined here, the one point where
    LyCORIS, ComfyUI and A1111 agree (docs/FORMATS.md §4.7); other strengths raise ValueError.
    """
    if strength != 1.0:
        raise ValueError(
            f"DoRA at strength {strength:g} differs between LyCORIS and ComfyUI (docs/FORMATS.md §4.7); only 1 is supported"
        )
    base = _f32(weight)
    magnitude = dora_magnitude(adapter, tuple(base.shape))
    merged = base + adapter.delta().reshape(base.shape)
    axis = getattr(adapter, "dora_axis", None)
    assert axis is not None  # dora_magnitude refused a module without one
    return merged * (magnitude / (weight_norm(merged, axis) + DORA_EPS))


@dataclass
class LoraFile:
    """A LoRA read from any dialect: adapters by canonical module name, plus what came with them."""

    adapters: dict[str, Adapter]
    family: FamilySpec | None  # None: no family map applies; adapters keep the file's own names
    source_format: str  # the dialect it was read from: kohya, diffusers, peft, cloneofsimo, …
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # textual-inversion tokens
    warnings: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)  # file module name → why it matched nothing
    path: str | None = None
    source_order: dict[str, str] = field(default_factory=dict)  # component → pair order (cloneofsimo)
    model: ModelVerdict | None = None  # what model it is for (formats.verdict); derived when not given
    source_names: dict[str, str] = field(default_factory=dict)  # adapter key → its module name in the file
    # the file's keys in file order, for writers that re-emit the source's own spelling (FLUX.1 dialects)
    source_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model is None:
            if self.family is not None:
                self.model = sd_verdict(self.family.name, self.family.title, full_size=True)
            else:
                self.model = unknown_verdict(self.adapters)

    def __repr__(self) -> str:
        return (
            f"LoraFile({self.source_format}, {self.family_name}, {len(self.adapters)} modules, "
            f"{len(self.embeddings)} embeddings)"
        )

    @property
    def verdict(self) -> ModelVerdict:
        assert self.model is not None  # set in __post_init__
        return self.model

    @property
    def family_name(self) -> str:
        """sd1/sd2/sdxl, or the verdict's family (flux1, sd3, language-model, unknown)."""
        return self.family.name if self.family is not None else self.verdict.family

    @property
    def family_title(self) -> str:
        return self.family.title if self.family is not None else self.verdict.title

    @property
    def names(self) -> str:
        """How adapters are keyed: "canonical" (SD name tables) or, with no family map, verbatim in
        the source dialect's namespace ("kohya" lora_names, "peft" dotted module paths)."""
        if self.family is not None:
            return "canonical"
        return VERBATIM[0] if self.source_format == "kohya" else VERBATIM[1]

    def same_naming(self, other: LoraFile) -> bool:
        """Whether two LoRAs' adapter keys name the same modules (blend, diff)."""
        if self.family is not None and other.family is not None:
            return self.family.name == other.family.name
        return self.family is None and other.family is None and self.names == other.names

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for adapter in self.adapters.values():
            name = adapter.tally
            counts[name] = counts.get(name, 0) + 1
        return counts

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.adapters:
            component = module.split(".", 1)[0] if self.family is not None else "other"
            counts[component] = counts.get(component, 0) + 1
        return counts

    def only_plain_lora(self) -> bool:
        """Every module a LowRank without DoRA (Tucker allowed): kohya's networks.lora metadata."""
        return all(a.tally == LowRank.kind for a in self.adapters.values())

    def with_adapters(self, adapters: dict[str, Adapter]) -> LoraFile:
        return replace(self, adapters=adapters)
