"""One representation for every LoRA dialect: adapters keyed by canonical module name.

Every adapter carries an explicit ``alpha`` with the kohya/LyCORIS convention ``scale = alpha / r``
(FORMATS.md §0). Readers translate other conventions into it — peft's rsLoRA ``alpha / √r`` becomes
``alpha·√r``, a missing alpha becomes ``alpha = r`` (scale 1, reported), cloneofsimo's raw product
becomes ``alpha = r`` — so every operation sees one rule. Factor tensors keep their file dtype;
ΔW is always computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Union

import torch

from ..families.spec import FamilySpec


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


@dataclass
class LowRank:
    """``ΔW = alpha/r · up @ down`` (Linear or conv; Tucker ``mid`` for k×k convs; optional DoRA).

    Shapes: ``up (out, r[, 1, 1])``, ``down (r, in[, kh, kw])``; with ``mid (r, r, kh, kw)`` the
    down factor is ``(r, in, 1, 1)``. ``dora_scale`` is the magnitude vector as stored, with
    ``dora_axis`` saying which axis it normalises ("out" rows or "in" columns).
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    dora_axis: str | None = None
    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.out_features, int(self.down.shape[1]), *self.mid.shape[2:])
        if self.down.dim() == 4:
            return (self.out_features, *self.down.shape[1:])
        return (self.out_features, int(self.down.shape[1]))

    def delta(self) -> torch.Tensor:
        """ΔW in float32, shaped like the weight (without DoRA, which needs the base weight)."""
        up = _f32(self.up).reshape(self.out_features, self.rank)
        if self.mid is not None:
            down = _f32(self.down).reshape(self.rank, -1)  # (r, in)
            mid = _f32(self.mid)  # (r, r, kh, kw)
            # ΔW[o,i,:,:] = Σ_{m,n} up[o,m] · mid[m,n,:,:] · down[n,i]  (LyCORIS rebuild_tucker)
            delta = torch.einsum("om,mnhw,ni->oihw", up, mid, down)
        else:
            delta = (up @ _f32(self.down).reshape(self.rank, -1)).reshape(self.delta_shape())
        return delta * self.scale

    def parameters(self) -> int:
        return sum(t.numel() for t in (self.up, self.down, self.mid, self.dora_scale) if t is not None)


@dataclass
class LoHa:
    """``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r`` (LyCORIS HadaWeight; Tucker with t1/t2)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None  # the weight shape, when the factors cannot tell it
    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        if self.t1 is not None and self.t2 is not None:
            # M[p,q,:,:] = Σ_{i,j} t[i,j,:,:] · a[i,p] · b[j,q]  (LyCORIS HadaWeightTucker)
            m1 = torch.einsum("ijhw,ip,jq->pqhw", _f32(self.t1), _f32(self.w1a), _f32(self.w1b))
            m2 = torch.einsum("ijhw,ip,jq->pqhw", _f32(self.t2), _f32(self.w2a), _f32(self.w2b))
            return m1 * m2 * self.scale
        delta = (_f32(self.w1a) @ _f32(self.w1b)) * (_f32(self.w2a) @ _f32(self.w2b)) * self.scale
        return delta.reshape(self.shape) if self.shape is not None else delta

    def parameters(self) -> int:
        return sum(t.numel() for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None)


@dataclass
class LoKr:
    """``ΔW = kron(w1, w2) · alpha/r`` (LyCORIS make_kron); either factor full or low-rank."""

    alpha: float
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None
    kind = "lokr"

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
        # Both halves full: LyCORIS forces alpha = r, ComfyUI uses 1.0 (FORMATS.md §4.3, §4.8).
        return 1.0 if self.rank is None else self.alpha / self.rank

    def _w1(self) -> torch.Tensor:
        if self.w1 is not None:
            return _f32(self.w1)
        return _f32(self.w1a) @ _f32(self.w1b)  # type: ignore[arg-type]

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return _f32(self.w2)
        if self.t2 is not None:
            return torch.einsum("ijhw,ip,jq->pqhw", _f32(self.t2), _f32(self.w2a), _f32(self.w2b))  # type: ignore[arg-type]
        return _f32(self.w2a) @ _f32(self.w2b)  # type: ignore[arg-type]

    def delta(self) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2) * self.scale
        return delta.reshape(self.shape) if self.shape is not None and delta.numel() == math.prod(self.shape) else delta

    def parameters(self) -> int:
        tensors = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        return sum(t.numel() for t in tensors if t is not None)


@dataclass
class Full:
    """A stored weight difference: ``W' = W + diff`` (and ``b' = b + diff_b``)."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    alpha: float = 1.0
    kind = "full"

    @property
    def rank(self) -> None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    def delta(self) -> torch.Tensor:
        return _f32(self.diff)

    def parameters(self) -> int:
        return self.diff.numel() + (self.diff_b.numel() if self.diff_b is not None else 0)


Adapter = Union[LowRank, LoHa, LoKr, Full]  # noqa: UP007 (a runtime alias)


@dataclass
class LoraFile:
    """A LoRA read from any dialect: adapters by canonical module name, plus what came with them."""

    adapters: dict[str, Adapter]
    family: FamilySpec
    source_format: str  # the dialect it was read from: kohya, diffusers, peft, cloneofsimo, …
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # textual-inversion tokens
    warnings: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)  # file module name → why it matched nothing
    path: str | None = None

    def __repr__(self) -> str:
        return (
            f"LoraFile({self.source_format}, {self.family.name}, {len(self.adapters)} modules, "
            f"{len(self.embeddings)} embeddings)"
        )

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for adapter in self.adapters.values():
            name = "dora" if isinstance(adapter, LowRank) and adapter.dora_scale is not None else adapter.kind
            counts[name] = counts.get(name, 0) + 1
        return counts

    def components(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.adapters:
            component = module.split(".", 1)[0]
            counts[component] = counts.get(component, 0) + 1
        return counts

    def only_plain_lora(self) -> bool:
        return all(isinstance(a, LowRank) and a.dora_scale is None for a in self.adapters.values())

    def with_adapters(self, adapters: dict[str, Adapter]) -> LoraFile:
        return replace(self, adapters=adapters)
