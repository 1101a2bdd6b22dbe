"""Blend LoRAs: one LoRA whose ΔW is ``Σ wᵢ·ΔWᵢ`` for every module, exactly or truncated.

``concat`` is exact: per module the factors are stacked, ``up = [c₁·up₁ | c₂·up₂ | …]``,
``down = [down₁; down₂; …]`` with ``cᵢ = wᵢ·alphaᵢ/rᵢ`` split as ``sign(cᵢ)·√|cᵢ|`` on up and ``√|cᵢ|``
on down (balanced magnitudes for fp16 storage; the square root is only ever taken of ``|cᵢ|``), and
``alpha = Σ rᵢ`` (scale 1). Ranks add. This is what kohya's ``merge_lora.py --concat`` aims at, but
it keeps the first model's alpha and multiplies *both* factors by ``√(ratio·alphaᵢ/alpha₀)``, which
rescales every part and squares the ratio (docs/FORMATS.md §1.5).

``svd`` truncates the same stacked factors in factor space (:func:`~loratools.ops.lowrank.matrix_svd`):
the result is the optimal rank-k approximation of the dense ``Σ wᵢ·ΔWᵢ`` — what kohya's
``svd_merge_lora.py`` computes densely (and then clamps to the 0.99 quantile, which loratools
does not: clamping moves the result away from the optimum) — at O((out+in)·(Σrᵢ)²).

Ranks, alphas and kinds may differ between inputs; negative weights subtract. LoHa/LoKr modules
enter through their exact low-rank factorizations, Tucker through its dense ΔW.

A module with a full-diff part (LyCORIS ``diff``/``diff_b``) stays a full diff in both modes:
``diff = Σ wᵢ·ΔWᵢ`` (every part dense, summed in float64) and ``diff_b = Σ wᵢ·diff_bᵢ``. The sum of
full deltas is a full delta; as LoRA factors it would need rank up to min(out, in) — bigger than
the diff — and would lose ``diff_b`` (docs/FORMATS.md §4.4). A rank rule does not apply to it, and
the report says so.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import Adapter, Full, LoraFile, LowRank, factor_dtype
from ..formats.io import load_lora
from .blocks import DEFAULT_TOOL
from .checkpoint import parse_dtype
from .hashes import file_hashes
from .lowrank import F64, RankRule, factorize, kept_fraction, lowrank_from, matrix_svd
from .merge import parse_lora_arg, weighted_lora
from .parallel import map_modules
from .rank_common import check_output, output_format, rank_rule, write_lora
from .rank_rule import rank_tally
from .resize import is_conv_kxk

SCHEMA = "loratools.blend/1"
MODES = ("concat", "svd")
METADATA_POLICIES = ("keep-first", "merge", "fresh")
FULL_SUMMED = (
    "modules with a full-diff part summed exactly as full diffs: the rank rule applies to low-rank modules "
    "(docs/FORMATS.md §4.4)"
)


@dataclass
class BlendedModule:
    """One output module: which inputs fed it, and the rank it came out with."""

    module: str
    inputs: list[int]  # indices of the inputs that have this module (weight ≠ 0)
    ranks_in: list[int]  # 0 for a part without a rank (a full diff)
    new_rank: int | None  # None for a full diff (FULL_SUMMED)
    fro_kept: float = 1.0  # svd mode: ‖ΔW_k‖_F / ‖ΣwᵢΔWᵢ‖_F
    limited_by: str | None = None
    kind: str = "lora"  # "full": the module came out as a full diff


@dataclass
class BlendReport:
    """What a blend did (``to_dict()`` is the ``--json`` output)."""

    inputs: list[dict[str, object]]  # [{"source", "weight", "format", "modules"}]
    output: str | None
    output_format: str | None
    family: str
    mode: str
    rule: str | None
    metadata_policy: str
    modules: list[BlendedModule] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # modules whose every weight is 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "inputs": self.inputs,
            "output": self.output,
            "output_format": self.output_format,
            "family": self.family,
            "mode": self.mode,
            "rule": self.rule,
            "metadata_policy": self.metadata_policy,
            "module_count": len(self.modules),
            "ranks_after": rank_tally(m.new_rank for m in self.modules),
            "fro_kept_min": min((m.fro_kept for m in self.modules), default=1.0),
            "modules": [asdict(m) for m in self.modules],
            "dropped": self.dropped,
            "warnings": self.warnings,
        }


def parse_weighted(spec: str) -> tuple[str, float]:
    """``"path:w"`` → ``(path, w)``; a path without a numeric ``:w`` suffix has weight 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _part(adapter: Adapter, weight: float) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], float]:
    """``(up, down, shape, c)`` with ``wᵢ·ΔWᵢ = c·up@down`` exactly (float32/float64)."""
    if adapter.dora_scale is not None:
        raise InputError(
            "a DoRA module's ΔW depends on the base weight, so it cannot be added to another",
            hint="merge the LoRAs into a checkpoint instead",
        )
    if adapter.is_pair:  # DoRA was refused above: the stored pair, its scale in c
        up, down, shape = factorize(adapter, include_scale=False)
        assert down is not None  # a plain LowRank always factors into up and down
        return up, down, shape, weight * adapter.scale
    up, down, shape = factorize(adapter)
    if down is None:  # a dense ΔW (Tucker, full diff): its exact factors, zero directions dropped
        u, s, vh = torch.linalg.svd(up.to(F64), full_matrices=False)
        keep = max(1, int((s > float(s[0]) * max(up.shape) * torch.finfo(F64).eps).sum()))
        up, down = u[:, :keep] * s[:keep], vh[:keep]
    return up, down, shape, weight


def blend_full(module: str, parts: Sequence[tuple[Adapter, float]], dtype: torch.dtype) -> Full:
    """``Σ wᵢ·ΔWᵢ`` of a module with a full-diff part, as a full diff in ``dtype``: every part dense
    in float64, in the shape of the first full part's ``diff``; ``diff_b = Σ wᵢ·diff_bᵢ`` over the
    parts that have one (None when none has)."""
    first = next(a for a, _ in parts if isinstance(a, Full))
    shape = tuple(first.diff.shape)
    diff = torch.zeros(shape, dtype=F64)
    bias: torch.Tensor | None = None
    for adapter, weight in parts:
        if isinstance(adapter, Full):
            dense = adapter.diff.to(F64) * weight
            if adapter.diff_b is not None:
                term = adapter.diff_b.to(F64) * weight
                bias = term if bias is None else bias + term
        else:
            try:
                up, down, _, c = _part(adapter, weight)
            except InputError as exc:
                raise InputError(f"{module}: {exc.message}", hint=exc.hint) from None
            dense = c * (up.to(F64) @ down.to(F64))
        if dense.numel() != diff.numel() or dense.shape[0] != shape[0]:
            raise InputError(f"{module}: ΔW shapes differ between inputs ({shape} and {tuple(dense.shape)})")
        diff += dense.reshape(shape)
    return Full(diff.to(dtype), None if bias is None else bias.to(dtype))


def blend_module(
    module: str, parts: Sequence[tuple[Adapter, float]], mode: str, rule: RankRule | None, dtype: torch.dtype
) -> tuple[Adapter, int | None, float, str | None]:
    """``Σ wᵢ·ΔWᵢ`` of one module; returns it with its rank, Frobenius kept, limit.

    A LoRA module, or a full diff (rank None) when any part is one (:func:`blend_full`)."""
    if any(isinstance(adapter, Full) for adapter, _ in parts):
        return blend_full(module, parts, dtype), None, 1.0, None
    ups, downs = [], []
    shape: tuple[int, ...] | None = None
    for adapter, weight in parts:
        try:
            up, down, part_shape, c = _part(adapter, weight)
        except InputError as exc:
            raise InputError(f"{module}: {exc.message}", hint=exc.hint) from None
        flat = (part_shape[0], math.prod(part_shape[1:]))
        if shape is None:
            shape = part_shape
        elif flat != (shape[0], math.prod(shape[1:])):
            raise InputError(f"{module}: ΔW shapes differ between inputs ({tuple(shape)} and {tuple(part_shape)})")
        if mode == "concat":
            root = math.sqrt(abs(c))
            ups.append(up.to(F64) * (math.copysign(root, c)))
            downs.append(down.to(F64) * root)
        else:
            ups.append(up.to(F64) * c)
            downs.append(down.to(F64))
    assert shape is not None
    up_all, down_all = torch.cat(ups, 1), torch.cat(downs, 0)
    if mode == "concat":
        k = up_all.shape[1]
        if len(shape) == 4:  # the LoCon shapes, as lowrank_from writes them
            up_all, down_all = up_all.reshape(shape[0], k, 1, 1), down_all.reshape(k, *shape[1:])
        lowrank = LowRank(up_all.contiguous().to(dtype), down_all.contiguous().to(dtype), float(k))
        return lowrank, k, 1.0, None
    if rule is None:
        raise ValueError("blend_module: an SVD blend needs a rank rule")
    svd = matrix_svd(up_all, down_all)
    choice = rule.choose(svd.singular_values, conv=is_conv_kxk(shape))
    kept = kept_fraction(svd.singular_values, choice.rank)
    return lowrank_from(svd, choice.rank, shape, dtype=dtype), choice.rank, kept, choice.limited_by


def _merged_metadata(
    loras: Sequence[LoraFile], names: Sequence[str], weights: Sequence[float], policy: str, warnings: list[str]
) -> dict[str, str]:
    if policy == "keep-first":
        metadata = dict(loras[0].metadata)
    elif policy == "merge":
        metadata = {}
        conflicts: set[str] = set()
        for lora in loras:
            for key, value in lora.metadata.items():
                if key in metadata and metadata[key] != value:
                    conflicts.add(key)
                metadata.setdefault(key, value)
        if conflicts:
            warnings.append(
                f"metadata merge: {len(conflicts)} keys differ between inputs, the first input's value kept "
                f"({', '.join(sorted(conflicts)[:5])}{' …' if len(conflicts) > 5 else ''})"
            )
    elif policy == "fresh":
        metadata = {}
    else:
        raise InputError(f"unknown metadata policy {policy!r} (choose from {', '.join(METADATA_POLICIES)})")
    for stale in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        metadata.pop(stale, None)  # hashes of an input are not hashes of the blend
    metadata["merged_from"] = json.dumps(
        [{"name": n, "weight": w, **_input_hashes(lora)} for n, w, lora in zip(names, weights, loras, strict=True)]
    )
    return metadata


def _input_hashes(lora: LoraFile) -> dict[str, object]:
    """SHA-256 and AutoV2 (its first 10 hex, docs/FORMATS.md §6) of the file a LoRA was read from;
    a folder (peft) gets one entry per weight file; none for a LoRA made in memory."""
    path = Path(lora.path) if lora.path else None
    if path is None or not path.exists():
        return {}
    if path.is_file():
        h = file_hashes(path)
        return {"sha256": h.sha256, "autov2": h.autov2}
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return {"files": {p.name: {"sha256": (h := file_hashes(p)).sha256, "autov2": h.autov2} for p in weights}}


def blend_loras(
    inputs: Sequence[tuple[LoraFile, float]],
    *,
    mode: str = "concat",
    rule: RankRule | None = None,
    metadata: str = "keep-first",
    names: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[LoraFile, BlendReport]:
    """One LoRA with ``ΔW = Σ wᵢ·ΔWᵢ`` per module (``inputs`` = (LoraFile, wᵢ) pairs).

    ``mode="concat"``: exact, ranks add; ``mode="svd"``: the optimal truncation by ``rule``.
    ``metadata``: "keep-first" (the first input's), "merge" (all, first wins on conflicts) or
    "fresh" (none); ``merged_from`` (JSON list of ``{"name", "weight", "sha256", "autov2"}``, the
    hashes of the file each input was read from) is always recorded.
    ``names``: how ``merged_from`` names the inputs (default: their file names).
    """
    if not inputs:
        raise InputError("nothing to blend: give at least one LoRA")
    if mode not in MODES:
        raise InputError(f"unknown blend mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "concat" and rule is not None:
        raise InputError("--mode concat is exact and keeps every rank; a rank rule needs --mode svd")
    if mode == "svd" and rule is None:
        raise InputError("--mode svd needs a rank rule: --rank N, --sv-ratio R, --sv-fro F or --sv-cumulative C")
    for _, weight in inputs:
        if not math.isfinite(weight):
            raise InputError(f"blend weights must be finite numbers, got {weight}")
    loras = [lora for lora, _ in inputs]
    weights = [w for _, w in inputs]
    first = loras[0]
    for lora in loras[1:]:
        if not lora.same_naming(first):
            raise InputError(
                f"cannot blend a {first.family_title} LoRA with a {lora.family_title} one "
                f"(module names {first.names} and {lora.names}) "
                f"({Path(loras[0].path or 'input 1').name} and {Path(lora.path or 'input').name})"
            )
    labels = (
        list(names)
        if names is not None
        else [Path(x.path).name if x.path else f"input{i + 1}" for i, x in enumerate(loras)]
    )
    report = BlendReport(
        [
            {"source": lora.path, "weight": w, "format": lora.source_format, "modules": len(lora.adapters)}
            for lora, w in inputs
        ],
        None,
        None,
        first.family_name,
        mode,
        rule.describe() if rule else None,
        metadata,
    )
    modules: dict[str, None] = {}
    for lora in loras:
        modules.update(dict.fromkeys(lora.adapters))
    adapters: dict[str, Adapter] = {}
    work = []
    for module in modules:
        parts = [(lora.adapters[module], w) for lora, w in inputs if module in lora.adapters and w != 0]
        sources = [i for i, (lora, w) in enumerate(inputs) if module in lora.adapters and w != 0]
        if parts:
            work.append((module, parts, sources))
        else:
            report.dropped.append(module)

    def blend_one(
        item: tuple[str, list[tuple[Adapter, float]], list[int]],
    ) -> tuple[Adapter, int | None, float, str | None]:
        module, parts, _ = item
        return blend_module(module, parts, mode, rule, dtype or factor_dtype(parts[0][0]))

    for (module, parts, sources), (blended, k, kept, limited) in zip(
        work, map_modules(blend_one, work, progress=progress), strict=True
    ):
        adapters[module] = blended
        ranks_in = [a.rank if a.rank is not None else 0 for a, _ in parts]
        report.modules.append(BlendedModule(module, sources, ranks_in, k, kept, limited, blended.kind))
    if not adapters:
        raise InputError("every module has weight 0: the blend would be empty")
    full = sum(m.kind == "full" for m in report.modules)
    if full and rule is not None:  # concat keeps every module exact anyway: nothing to say there
        report.warnings.append(f"{full} {FULL_SUMMED}")
    if report.dropped:
        report.warnings.append(f"{len(report.dropped)} modules have weight 0 in every input and were left out")
    embeddings: dict[str, torch.Tensor] = {}
    for lora, label in zip(loras, labels, strict=True):
        for token, tensor in lora.embeddings.items():
            if token in embeddings and not torch.equal(embeddings[token], tensor):
                report.warnings.append(f"embedding {token} differs in {label}; the first one kept")
            embeddings.setdefault(token, tensor)
    merged = LoraFile(
        adapters,
        first.family,
        first.source_format,
        _merged_metadata(loras, labels, weights, metadata, report.warnings),
        embeddings,
        model=first.model,
        source_names=dict(first.source_names),  # written back in the first input's own keys
        source_keys=first.source_keys,
        # modules a reader could not place: the writers refuse them by name rather than drop them
        unmatched={name: why for lora in loras for name, why in lora.unmatched.items()},
    )
    return merged, report


def blend(
    sources: Sequence[str | tuple[str | os.PathLike[str], float]],
    output: str | os.PathLike[str],
    *,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    rule: RankRule | None = None,
    metadata: str = "keep-first",
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | FamilySpec | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    blocks_from: str = DEFAULT_TOOL,
) -> BlendReport:
    """Blend LoRA files (``"path:w"`` strings or ``(path, w)`` pairs) into ``output``; a string may
    carry merge's per-module options (``path:unet=…,te2=…,lbw=…@TOOL``, ``blocks_from`` for an
    untagged vector), folded into each module's factors.

    See :func:`blend_loras`. ``to``: output dialect (default: the first input's; kohya for
    read-only dialects); ``dtype``: fp16/bf16/fp32 (default: the first part's factor dtype).
    """
    pairs = [parse_weighted(s) if isinstance(s, str) else (str(s[0]), float(s[1])) for s in sources]
    given = {i: parse_lora_arg(s, blocks_from) for i, s in enumerate(sources) if isinstance(s, str) and "=" in s}
    pairs = [(str(given[i].source), 1.0) if i in given else pair for i, pair in enumerate(pairs)]
    options = (rank, conv_rank, sv_ratio, sv_fro, sv_cumulative, min_rank, max_rank)
    chosen = (
        None
        if rule is None and all(o is None for o in options)
        else rank_rule(
            rank=rank,
            conv_rank=conv_rank,
            sv_ratio=sv_ratio,
            sv_fro=sv_fro,
            sv_cumulative=sv_cumulative,
            min_rank=min_rank,
            max_rank=max_rank,
            rule=rule,
        )
    )
    check_output(output, *(p for p, _ in pairs))
    loaded = [(load_lora(path, family), w) for path, w in pairs]
    loaded = [(weighted_lora(given[i], lora), w) if i in given else (lora, w) for i, (lora, w) in enumerate(loaded)]
    fmt = output_format(to, loaded[0][0].source_format)
    torch_dtype = parse_dtype(dtype)
    blended, report = blend_loras(
        loaded, mode=mode, rule=chosen, metadata=metadata, dtype=torch_dtype, progress=progress
    )
    report.output, report.output_format = str(output), fmt
    for lora, _ in loaded:
        report.warnings += [f"{Path(lora.path or '').name}: {w}" for w in lora.warnings]
    report.warnings += write_lora(blended, output, fmt, dtype=torch_dtype, overwrite=overwrite)
    return report
