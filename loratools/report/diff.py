"""What differs between two LoRAs or two checkpoints, as plain data (schema ``loratools.diff/1``).

LoRAs are compared by canonical module, whatever their dialects: modules only in one, modules
whose kind/rank/alpha differ, and per module ``‖ΔW_A − ΔW_B‖_F`` computed in factor space —
``ΔW_A − ΔW_B = [U_A, −U_B]·[V_A; V_B]``, whose squared norm is ``Σ (UᵀU) ⊙ (V Vᵀ)`` of the
stacked factors, in float64 (LoKr pairs straight from their Kronecker factors). Bit-identical
modules are recognised first, so the expansion's rounding (~1e-8 relative) never shows as a
difference. Checkpoints are compared tensor by tensor, streamed:
by key when both have the same layout, by canonical name through the key maps otherwise (a
single file against a diffusers folder).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..threads import torch_threads

DIFF_SCHEMA = "loratools.diff/1"
SAME_RTOL = 1e-6  # below this relative difference two modules count as the same (float32 rounding)


@dataclass
class DiffEntry:
    """One module (LoRAs) or tensor (checkpoints) present in both, or in one only."""

    name: str
    status: str  # same, changed, only_a, only_b
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    diff_norm: float | None  # ‖A − B‖_F (‖ΔW_A − ΔW_B‖_F for LoRAs); the one side's norm if only in one
    relative: float | None  # diff_norm / max(‖A‖, ‖B‖)


@dataclass
class DiffReport:
    """Everything ``diff`` says."""

    kind: str  # "lora" or "checkpoint"
    a: dict[str, Any]
    b: dict[str, Any]
    only_a: list[str]
    only_b: list[str]
    changed_facts: list[dict[str, Any]]  # {name, field, a, b}
    entries: list[DiffEntry]
    identical: int
    differing: int
    total_diff_norm: float | None
    metadata_changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"schema": DIFF_SCHEMA, **asdict(self)}


def _metadata_changes(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, Any]:
    return {
        "only_a": sorted(k for k in a if k not in b),
        "only_b": sorted(k for k in b if k not in a),
        "changed": sorted(k for k in a if k in b and a[k] != b[k]),
    }


def _drop_non_finite(entries: list[DiffEntry], notes: list[str], squares: float, unit: str) -> float:
    """NaN/inf values (or shapes that cannot be compared) have no difference to report: their
    numbers become None (JSON has no NaN), a note says how many, the total is summed without them."""
    broken = [e for e in entries if e.diff_norm is not None and not math.isfinite(e.diff_norm)]
    if not broken:
        return squares
    notes.append(
        f"{len(broken)} {unit} have no finite difference (NaN/inf values or incomparable shapes), e.g. {broken[0].name}"
    )
    for e in broken:
        e.diff_norm, e.relative = None, None
    return sum(e.diff_norm**2 for e in entries if e.diff_norm is not None and e.status != "same")


# --- LoRAs ----------------------------------------------------------------------------------------


def _factors(adapter: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ΔW = up @ down`` in float64 (``down`` None: ``up`` is the dense, flattened ΔW)."""
    from ..ops.lowrank import factorize

    try:
        up, down, _ = factorize(adapter)
    except InputError:  # DoRA on a kind factorize keeps dense: its directional update
        delta = adapter.delta()
        return delta.reshape(delta.shape[0], -1).to(torch.float64), None
    return up.to(torch.float64), None if down is None else down.to(torch.float64)


def _gram_square(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F² = Σ (upᵀup) ⊙ (down downᵀ), float64: two k×k Grams, no out×in product."""
    return float(((up.T @ up) * (down @ down.T)).sum())


def factored_norm(up: torch.Tensor, down: torch.Tensor | None) -> float:
    """‖up @ down‖_F (dense when ``down`` is None)."""
    if down is None:
        return float(torch.linalg.vector_norm(up))
    return math.sqrt(max(_gram_square(up, down), 0.0))


def _lokr_difference(a: Any, b: Any) -> tuple[float, float, float] | None:
    """‖kron(A1, A2) − kron(B1, B2)‖ from the small factors, when their shapes agree.

    ‖kron(X, Y)‖ = ‖X‖·‖Y‖ and ⟨kron(A1, A2), kron(B1, B2)⟩ = ⟨A1, B1⟩·⟨A2, B2⟩.
    """
    halves_a, halves_b = a.kron_halves(), b.kron_halves()
    if halves_a is None or halves_b is None or a.dora_scale is not None or b.dora_scale is not None:
        return None
    a1, a2, b1, b2 = (w.to(torch.float64) for w in (*halves_a, *halves_b))
    if a1.shape != b1.shape or a2.shape != b2.shape or a.delta_shape() != b.delta_shape():
        return None
    sa, sb = a.scale, b.scale
    aa = sa * sa * float((a1 * a1).sum()) * float((a2 * a2).sum())
    bb = sb * sb * float((b1 * b1).sum()) * float((b2 * b2).sum())
    ab = sa * sb * float((a1 * b1).sum()) * float((a2 * b2).sum())
    return math.sqrt(max(aa + bb - 2 * ab, 0.0)), math.sqrt(aa), math.sqrt(bb)


def delta_difference(a: Any, b: Any) -> tuple[float, float, float]:
    """(‖ΔW_A − ΔW_B‖_F, ‖ΔW_A‖_F, ‖ΔW_B‖_F) in factor space, float64.

    ``ΔW_A − ΔW_B = [U_A, −U_B]·[V_A; V_B]``: one Gram pair of the stacked factors gives ‖A‖²,
    ‖B‖² and ⟨A, B⟩ together. float64 keeps the difference exact to ~1e-8·‖ΔW‖, far below what
    a merge in fp16 can show; bit-identical modules are recognised before this is called.
    """
    fast = _lokr_difference(a, b)
    if fast is not None:
        return fast
    ua, va = _factors(a)
    ub, vb = _factors(b)
    if va is None or vb is None or ua.shape[0] != ub.shape[0] or va.shape[1] != vb.shape[1]:
        dense_a = ua if va is None else ua @ va
        dense_b = ub if vb is None else ub @ vb
        norm_a, norm_b = float(torch.linalg.vector_norm(dense_a)), float(torch.linalg.vector_norm(dense_b))
        if dense_a.numel() != dense_b.numel():
            return math.nan, norm_a, norm_b
        return float(torch.linalg.vector_norm(dense_a.reshape(-1) - dense_b.reshape(-1))), norm_a, norm_b
    k = ua.shape[1]
    up = torch.cat([ua, -ub], 1)
    down = torch.cat([va, vb], 0)
    products = (up.T @ up) * (down @ down.T)
    aa = float(products[:k, :k].sum())
    bb = float(products[k:, k:].sum())
    total = float(products.sum())  # = aa + bb − 2⟨A, B⟩
    return math.sqrt(max(total, 0.0)), math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))


def _same_tensors(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    for (_, x), (_, y) in zip(sorted(vars(a).items()), sorted(vars(b).items()), strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape:
                return False
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _lora_side(lora: Any, path: str) -> dict[str, Any]:
    return {
        "path": path,
        "format": lora.source_format,
        "family": lora.family_name,
        "modules": len(lora.adapters),
    }


def _module_facts(adapter: Any) -> dict[str, Any]:
    return {
        "kind": adapter.label,
        "rank": adapter.rank,
        "alpha": adapter.alpha if adapter.rank else None,
        "shape": list(adapter.delta_shape()),
    }


def diff_loras(
    path_a: str | os.PathLike[str], path_b: str | os.PathLike[str], *, family: str | None = None
) -> DiffReport:
    """Compare two LoRAs module by module (any dialects; same family expected)."""
    from ..formats.io import load_lora

    a, b = load_lora(path_a, family), load_lora(path_b, family)
    notes = []
    comparable = a.same_naming(b)
    if not comparable:
        notes.append(f"A is for {a.family_title}, B for {b.family_title}: no module can be compared")
    only_a = [m for m in a.adapters if m not in b.adapters]
    only_b = [m for m in b.adapters if m not in a.adapters]
    entries: list[DiffEntry] = []
    changed: list[dict[str, Any]] = []
    squares = 0.0
    identical = 0
    for name, adapter in a.adapters.items():
        other = b.adapters.get(name)
        facts_a = _module_facts(adapter)
        if other is None or not comparable:
            norm = factored_norm(*_factors(adapter))
            squares += norm * norm
            entries.append(DiffEntry(name, "only_a", facts_a, None, norm, 1.0 if norm else 0.0))
            continue
        facts_b = _module_facts(other)
        for key in ("kind", "rank", "alpha"):
            if facts_a[key] != facts_b[key]:
                changed.append({"name": name, "field": key, "a": facts_a[key], "b": facts_b[key]})
        if _same_tensors(adapter, other):
            identical += 1
            entries.append(DiffEntry(name, "same", facts_a, facts_b, 0.0, 0.0))
            continue
        diff, norm_a, norm_b = delta_difference(adapter, other)
        top = max(norm_a, norm_b)
        relative = diff / top if top else 0.0
        if math.isfinite(diff):
            squares += diff * diff
        status = "same" if relative <= SAME_RTOL else "changed"
        identical += status == "same"
        entries.append(DiffEntry(name, status, facts_a, facts_b, diff, relative))
    for name in b.adapters:
        if name not in a.adapters or not comparable:
            norm = factored_norm(*_factors(b.adapters[name]))
            squares += norm * norm
            entries.append(DiffEntry(name, "only_b", None, _module_facts(b.adapters[name]), norm, 1.0 if norm else 0.0))
    squares = _drop_non_finite(entries, notes, squares, "modules")
    return DiffReport(
        kind="lora",
        a=_lora_side(a, str(path_a)),
        b=_lora_side(b, str(path_b)),
        only_a=only_a,
        only_b=only_b,
        changed_facts=changed,
        entries=entries,
        identical=identical,
        differing=sum(e.status != "same" for e in entries),
        total_diff_norm=math.sqrt(squares),
        metadata_changes=_metadata_changes(a.metadata, b.metadata),
        notes=notes,
    )


# --- checkpoints ----------------------------------------------------------------------------------


def _tensor_diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    x64, y64 = x.to(torch.float64).reshape(-1), y.to(torch.float64).reshape(-1)
    top = max(float(torch.linalg.vector_norm(x64)), float(torch.linalg.vector_norm(y64)))
    return float(torch.linalg.vector_norm(x64 - y64)), top


def _canonical_index(ckpt: Any, km: Any, layout: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """canonical tensor → (key in this checkpoint, canonical shape)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key in ckpt:
        for weight in km.lookup(layout, key):
            out[weight.canonical] = (key, tuple(weight.shape))
    return out


def diff_checkpoints(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    family: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor (streamed: one tensor of each side in memory)."""
    from ..families.detect import detect
    from ..io.checkpoint import open_checkpoint

    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b:
        found_a = detect(a.shapes(), a.metadata, family=family)
        found_b = detect(b.shapes(), b.metadata, family=family)
        sides = [
            {"path": str(p), "family": f.family.name, "layout": f.layout, "tensors": len(c)}
            for p, f, c in ((path_a, found_a, a), (path_b, found_b, b))
        ]
        notes: list[str] = []
        entries: list[DiffEntry] = []
        changed: list[dict[str, Any]] = []
        squares, identical = 0.0, 0
        if found_a.family.name != found_b.family.name:
            raise InputError(
                f"A is {found_a.family.title}, B is {found_b.family.title}: checkpoints of different families differ everywhere"
            )
        if found_a.layout == found_b.layout:
            only_a = [k for k in a if k not in b]
            only_b = [k for k in b if k not in a]
            for key in a:
                if key not in b:
                    continue
                ia, ib = a.info(key), b.info(key)
                if ia.shape != ib.shape:
                    changed.append({"name": key, "field": "shape", "a": list(ia.shape), "b": list(ib.shape)})
                    continue
                if ia.dtype != ib.dtype:
                    changed.append({"name": key, "field": "dtype", "a": ia.dtype, "b": ib.dtype})
                diff, top = _tensor_diff(a.read(key), b.read(key))
                if progress is not None:
                    progress(ia.nbytes + ib.nbytes)
                squares += diff * diff
                relative = diff / top if top else 0.0
                status = "same" if diff == 0 else "changed"
                identical += status == "same"
                facts_a = {"shape": list(ia.shape), "dtype": ia.dtype}
                facts_b = {"shape": list(ib.shape), "dtype": ib.dtype}
                entries.append(DiffEntry(key, status, facts_a, facts_b, diff, relative))
        else:
            notes.append(f"layouts differ ({found_a.layout} vs {found_b.layout}): compared by canonical name")
            km = found_a.keymap
            index_a = _canonical_index(a, km, found_a.layout)
            index_b = _canonical_index(b, found_b.keymap, found_b.layout)
            only_a = [c for c in index_a if c not in index_b]
            only_b = [c for c in index_b if c not in index_a]
            cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

            def part(side: str, ckpt: Any, found: Any, key: str, canonical: str) -> torch.Tensor:
                if (side, key) not in cache:
                    if len(cache) > 8:
                        cache.clear()
                    cache[(side, key)] = found.keymap.split(found.layout, key, ckpt.read(key))
                return cache[(side, key)][canonical]

            for canonical, (key_a, _shape) in index_a.items():
                if canonical not in index_b:
                    continue
                key_b = index_b[canonical][0]
                x = part("a", a, found_a, key_a, canonical)
                y = part("b", b, found_b, key_b, canonical)
                if tuple(x.shape) != tuple(y.shape):
                    changed.append({"name": canonical, "field": "shape", "a": list(x.shape), "b": list(y.shape)})
                    continue
                diff, top = _tensor_diff(x, y)
                if progress is not None:
                    progress(x.numel() * x.element_size() + y.numel() * y.element_size())
                squares += diff * diff
                status = "same" if diff == 0 else "changed"
                identical += status == "same"
                facts_a = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
                facts_b = {"shape": list(y.shape), "dtype": str(y.dtype).removeprefix("torch.")}
                entries.append(DiffEntry(canonical, status, facts_a, facts_b, diff, diff / top if top else 0.0))
        squares = _drop_non_finite(entries, notes, squares, "tensors")
        return DiffReport(
            kind="checkpoint",
            a=sides[0],
            b=sides[1],
            only_a=only_a,
            only_b=only_b,
            changed_facts=changed,
            entries=entries,
            identical=identical,
            differing=sum(e.status != "same" for e in entries) + len(only_a) + len(only_b),
            total_diff_norm=math.sqrt(squares),
            metadata_changes=_metadata_changes(a.metadata, b.metadata),
            notes=notes,
        )


def diff(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str], *, family: str | None = None) -> DiffReport:
    """Two LoRAs or two checkpoints (``hf://`` references welcome); a LoRA against a checkpoint is refused."""
    from ..classify import classify
    from ..io.source import open_source

    # opened once: hf:// fetched, a pickle unpickled to classify it and then reused by the readers
    local_a, local_b = open_source(path_a), open_source(path_b)
    kinds = classify(local_a), classify(local_b)
    if kinds[0] != kinds[1]:
        raise InputError(
            f"A is a {kinds[0]}, B is a {kinds[1]}: diff compares two LoRAs or two checkpoints",
            hint="to see what a LoRA changes in a checkpoint, use inspect --norms",
        )
    # one thread (loratools/threads.py): small factor products, and norms summed in one order
    with torch_threads(1):
        report = (
            diff_loras(local_a, local_b, family=family)
            if kinds[0] == "lora"
            else diff_checkpoints(local_a, local_b, family=family)
        )
    report.a["path"], report.b["path"] = str(path_a), str(path_b)
    return report
