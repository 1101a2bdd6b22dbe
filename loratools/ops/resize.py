"""Resize a LoRA: the optimal rank-k truncation of every module, computed in factor space.

A plain LoRA module ``ΔW = s·up@down`` (``s = alpha/r``) is resized from the SVD of the raw
product ``up@down`` through its r×r core (:func:`~loratools.ops.lowrank.product_svd`): cost
O((out+in)·r²), no dense ``out × in`` matrix, and the truncation is exactly the one a full SVD of
the dense ΔW gives (Eckart–Young). As in kohya-ss/sd-scripts networks/resize_lora.py, the singular
values go into ``up``, ``down`` holds the right singular vectors and ``alpha = s·k`` keeps the
module's scale, so ``ss_network_alpha``/rank stays meaningful. LoHa and LoKr are resized from
their exact low-rank factorizations (Khatri–Rao, Kronecker), Tucker modules from the dense ΔW of
that one module; they come out as plain LoRA with ``alpha = k``. A module whose chosen rank equals
its rank is kept bit for bit.

A full-diff module (LyCORIS ``diff``/``diff_b``) is kept bit for bit, under its own keys, and the
report says so (:data:`FULL_KEPT`): it has no rank to cut, and the rank-k LoRA it could become has
no place for its bias difference that every loader applies (docs/FORMATS.md §4.4) — kohya's
resize_lora.py likewise copies every key that is not a ``lora_down``/``lora_up`` pair.

Rank rules (:class:`~loratools.ops.lowrank.RankRule`): ``rank`` (``conv_rank`` for k×k convs) or
kohya's dynamic ``sv_ratio``, ``sv_fro``, ``sv_cumulative`` with ``min_rank``/``max_rank``.

A kohya ``.safetensors`` file of plain LoRA/LoCon modules written back as kohya is resized without
torch (:mod:`.rank_numpy`: the file read once, bytes in and out); every other input, and every
in-memory :class:`LoraFile`, takes the torch path. Plain modules are resized by one function on
numpy on both paths (:func:`resize_plain`, :mod:`.lowrank_np`), each singular pair's sign fixed
by :mod:`.svd_sign`, so the two paths write the same bytes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import Adapter, Full, LoraFile, LowRank, lora_pair
from ..io.source import open_source
from .provenance import PendingRecord
from .rank_common import check_output, output_format, rank_rule, with_provenance, write_lora
from .rank_rule import RankRule, kept_fraction, rank_tally

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .rank_numpy import Blobs, KohyaSource

SCHEMA = "loratools.resize/1"
FULL_KEPT = "full modules kept as they are: the rank rule applies to low-rank modules (docs/FORMATS.md §4.4)"


@dataclass
class ModuleRetention:
    """One module's resize: ranks before and after and the share of ‖ΔW‖_F kept."""

    module: str
    kind: str  # lora, locon, tucker, loha, lokr, full
    old_rank: int | None  # None for a full diff (and LoKr with two full halves)
    new_rank: int | None  # None for a full diff: kept as it is (FULL_KEPT)
    fro_kept: float  # ‖ΔW_k‖_F / ‖ΔW‖_F (1.0 when nothing was lost)
    limited_by: str | None = None  # max-rank, min-rank, available (fewer singular values than asked), zero
    unchanged: bool = False  # the factors were kept bit for bit (chosen rank = rank)


@dataclass
class ResizeReport:
    """What a resize did, module by module (``to_dict()`` is the ``--json`` output)."""

    source: str | None
    output: str | None
    source_format: str
    output_format: str | None
    family: str
    rule: str
    modules: list[ModuleRetention] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def min_fro_kept(self) -> float:
        return min((m.fro_kept for m in self.modules), default=1.0)

    @property
    def mean_fro_kept(self) -> float:
        return sum(m.fro_kept for m in self.modules) / len(self.modules) if self.modules else 1.0

    def to_dict(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "source": self.source,
            "output": self.output,
            "source_format": self.source_format,
            "output_format": self.output_format,
            "family": self.family,
            "rule": self.rule,
            "module_count": len(self.modules),
            "ranks_before": rank_tally(m.old_rank for m in self.modules),
            "ranks_after": rank_tally(m.new_rank for m in self.modules),
            "unchanged": sum(m.unchanged for m in self.modules),
            "limited": dict(Counter(m.limited_by for m in self.modules if m.limited_by)),
            "fro_kept_min": self.min_fro_kept,
            "fro_kept_mean": self.mean_fro_kept,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "modules": [asdict(m) for m in self.modules],
            "warnings": self.warnings,
        }


def kind_of(adapter: Adapter) -> str:
    """lora / locon (k×k conv) / tucker / loha / lokr / full, as the report names modules."""
    return adapter.form


def is_conv_kxk(shape: tuple[int, ...]) -> bool:
    """A k×k convolution (k > 1): the modules kohya's ``conv_rank`` applies to."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def resize_plain(
    module: str, kind: str, up: np.ndarray, down: np.ndarray, shape: tuple[int, ...], rule: RankRule
) -> tuple[tuple[np.ndarray, np.ndarray] | None, ModuleRetention]:
    """A plain LoRA/LoCon module resized on numpy, whichever path read it: the new ``(up, down)``
    in float64 (2-D; None when the chosen rank is the module's own: keep it bit for bit) and its row.

    ``up`` (out, r), ``down`` (r, in·kh·kw) are the raw stored factors in float64. Both paths run
    this one function (numpy's OpenBLAS, one thread per worker), so they store the same bytes; a
    torch-MKL twin agreed only to float64 rounding, a 1-ulp float32 difference in about one value
    in 10⁵ of a real LoRA. Each pair's sign is fixed by :func:`~.svd_sign.canonical_pairs`.
    """
    from .lowrank_np import matrix_svd
    from .svd_sign import canonical_pairs

    rank = up.shape[1]
    try:
        svd = matrix_svd(up, down)
    except InputError as exc:
        raise InputError(f"{module}: {exc.message}", hint=exc.hint) from None
    choice = rule.choose(svd.singular_values, conv=is_conv_kxk(shape))
    k = choice.rank
    row = ModuleRetention(module, kind, rank, k, kept_fraction(svd.singular_values, k), choice.limited_by)
    if k == rank:
        row.unchanged, row.fro_kept = True, 1.0
        return None, row
    return canonical_pairs(*svd.truncated(k), svd.singular_values), row


def resized_shapes(shape: tuple[int, ...], k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The stored shapes of a rank-k plain module of ΔW shape ``shape`` (LoCon for 4-D)."""
    up_shape: tuple[int, ...] = (shape[0], k, 1, 1) if len(shape) == 4 else (shape[0], k)
    return up_shape, (k, *shape[1:])


def resize_module(
    module: str, adapter: Adapter, rule: RankRule, *, dtype: torch.dtype | None = None
) -> tuple[Adapter, ModuleRetention]:
    """One module resized by ``rule``; see the module docstring for the representation."""
    import torch

    from ..formats.adapters import factor_dtype
    from .lowrank import adapter_svd, lowrank_from

    if adapter.dora_scale is not None:
        raise InputError(
            f"{module}: a DoRA module cannot be resized without its base weight "
            "(the magnitude renormalises W + ΔW, so ΔW alone does not define it)",
            hint="merge the LoRA into its checkpoint, or extract a plain LoRA from the merged model",
        )
    if isinstance(adapter, Full):  # no rank to cut, and a LoRA would have no place for diff_b
        return adapter, ModuleRetention(module, kind_of(adapter), None, None, 1.0, unchanged=True)
    out_dtype = dtype or factor_dtype(adapter)
    if lora_pair(adapter):  # DoRA was refused above: a plain pair
        shape = adapter.delta_shape()
        rank = adapter.rank
        up = adapter.up.detach().cpu().to(torch.float64).reshape(shape[0], rank).numpy()
        down = adapter.down.detach().cpu().to(torch.float64).reshape(rank, -1).numpy()
        factors, row = resize_plain(module, kind_of(adapter), up, down, shape, rule)
        if factors is None:
            return adapter, row
        assert row.new_rank is not None  # resize_plain always chooses a rank
        up_shape, down_shape = resized_shapes(shape, row.new_rank)
        new_up = torch.from_numpy(factors[0]).reshape(up_shape).to(out_dtype)
        new_down = torch.from_numpy(factors[1]).reshape(down_shape).to(out_dtype)
        return LowRank(new_up, new_down, float(adapter.scale * row.new_rank)), row  # alpha/r kept, as kohya does
    try:
        svd, shape = adapter_svd(adapter)
    except InputError as exc:
        raise InputError(f"{module}: {exc.message}", hint=exc.hint) from None
    choice = rule.choose(svd.singular_values, conv=is_conv_kxk(shape))
    k = choice.rank
    row = ModuleRetention(
        module, kind_of(adapter), adapter.rank, k, kept_fraction(svd.singular_values, k), choice.limited_by
    )
    return lowrank_from(svd, k, shape, dtype=out_dtype, canonical=True), row


def resize_lora(
    lora: LoraFile,
    rule: RankRule,
    *,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[LoraFile, ResizeReport]:
    """Every module of ``lora`` resized by ``rule``; returns the new LoraFile and the report.

    Modules are resized on every core (:func:`~loratools.ops.parallel.map_modules`).
    """
    from ..threads import numpy_blas_threads
    from .parallel import map_modules

    items = list(lora.adapters.items())
    with numpy_blas_threads(1):  # plain modules run on numpy (resize_plain): one BLAS thread per worker
        results = map_modules(lambda item: resize_module(*item, rule, dtype=dtype), items, progress=progress)
    return _resized(lora, rule, items, results)


def _resized(
    lora: LoraFile,
    rule: RankRule,
    items: list[tuple[str, Adapter]],
    results: list[tuple[Adapter, ModuleRetention]],
) -> tuple[LoraFile, ResizeReport]:
    """The resized LoraFile and its report from each module's result (both paths)."""
    report = ResizeReport(None, None, lora.source_format, None, lora.family_name, rule.describe())
    adapters: dict[str, Adapter] = {}
    for (module, adapter), (resized, row) in zip(items, results, strict=True):
        adapters[module] = resized
        report.modules.append(row)
        report.parameters_before += adapter.parameters()
        report.parameters_after += resized.parameters()
    kept_full = sum(row.kind == "full" for row in report.modules)
    if kept_full:
        report.warnings.append(f"{kept_full} {FULL_KEPT}")
    metadata = dict(lora.metadata)
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"resized by loratools ({rule.describe()})" + (f"; {comment}" if comment else "")
    return replace(
        lora,
        adapters=adapters,
        metadata=metadata,
        embeddings=dict(lora.embeddings),
        warnings=list(lora.warnings),
        unmatched=dict(lora.unmatched),
    ), report


def is_plain(adapter: Adapter) -> bool:
    """A plain LoRA/LoCon module (no Tucker mid, no DoRA): what the numpy path resizes and blends."""
    return adapter.is_plain


def resize_module_numpy(
    source: KohyaSource, blobs: Blobs, module: str, adapter: LowRank, rule: RankRule, dtype: str | None
) -> tuple[Adapter, ModuleRetention]:
    """:func:`resize_module` of a plain module on numpy (``adapter`` over the file's ParamRefs);
    new factors go into ``blobs``."""
    from .rank_numpy import array_ref, factor_dtype

    shape = adapter.delta_shape()
    rank = adapter.rank
    # the adapter's ParamRefs stand for its tensors here
    up = source.values(adapter.up, wide=True).reshape(shape[0], rank)  # type: ignore[arg-type]
    down = source.values(adapter.down, wide=True).reshape(rank, -1)  # type: ignore[arg-type]
    factors, row = resize_plain(module, kind_of(adapter), up, down, shape, rule)
    if factors is None:
        return adapter, row
    out_dtype = dtype or factor_dtype(adapter)
    assert row.new_rank is not None  # resize_plain always chooses a rank
    up_shape, down_shape = resized_shapes(shape, row.new_rank)
    return LowRank(
        array_ref(blobs, "lora_up.weight", factors[0], up_shape, out_dtype),  # type: ignore[arg-type]
        array_ref(blobs, "lora_down.weight", factors[1], down_shape, out_dtype),  # type: ignore[arg-type]
        float(adapter.scale * row.new_rank),
    ), row


def resize_numpy(
    source: KohyaSource, rule: RankRule, *, dtype: str | None = None, progress: Callable[[int], None] | None = None
) -> tuple[LoraFile, ResizeReport, Blobs]:
    """:func:`resize_lora` on the numpy path: the resized LoraFile (over ParamRefs), its report, and
    the new tensors' bytes for :func:`~loratools.ops.rank_numpy.write_kohya`."""
    from .rank_numpy import Blobs, map_numpy

    blobs = Blobs()
    items = list(source.lora.adapters.items())

    def one(item: tuple[str, Adapter]) -> tuple[Adapter, ModuleRetention]:
        result = resize_module_numpy(source, blobs, item[0], item[1], rule, dtype)  # type: ignore[arg-type]
        if progress:
            progress(1)
        return result

    set_total = getattr(progress, "set_total", None)
    if callable(set_total):
        set_total(len(items))
    resized, report = _resized(source.lora, rule, items, map_numpy(one, items))
    return resized, report, blobs


def resize(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    rule: RankRule | None = None,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | FamilySpec | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ResizeReport:
    """Resize the LoRA at ``source`` and write it to ``output``.

    Give ``rank`` (and optionally ``conv_rank`` for 3×3 LoCon modules), or one of ``sv_ratio``,
    ``sv_fro``, ``sv_cumulative`` (kohya's meanings, see :class:`RankRule`) with optional
    ``min_rank``/``max_rank`` — or a ready ``rule``. ``to``: output dialect (default: the source's,
    kohya for read-only dialects); ``dtype``: fp16/bf16/fp32 (default: each module's own).
    """
    chosen = rank_rule(
        rank=rank,
        conv_rank=conv_rank,
        sv_ratio=sv_ratio,
        sv_fro=sv_fro,
        sv_cumulative=sv_cumulative,
        min_rank=min_rank,
        max_rank=max_rank,
        rule=rule,
    )
    check_output(output, source)
    if to in (None, "kohya"):
        from .rank_numpy import numpy_dtype, open_kohya, write_kohya

        try:
            np_dtype = numpy_dtype(dtype)
        except ValueError:
            pass  # a torch dtype or an unknown name: the torch path takes or refuses it
        else:
            plain = open_kohya(source, family, is_plain, check_finite=False)
            try:
                if plain is not None:
                    made_from = _made_from(source, chosen, plain.lora.metadata)
                    resized_np, report, blobs = resize_numpy(plain, chosen, dtype=np_dtype, progress=progress)
                    report.source, report.output, report.output_format = str(source), str(output), "kohya"
                    resized_np = with_provenance(resized_np, made_from)
                    write_kohya(resized_np, plain, blobs, output, dtype=np_dtype, overwrite=overwrite)
                    report.warnings = list(plain.lora.warnings) + report.warnings
                    return report
            except InputError as exc:
                if "NaN or inf" not in exc.message:
                    raise
                # load_lora's own refusal names the file and the modules: the torch path gives it
    from ..formats.io import load_lora
    from .checkpoint import parse_dtype

    lora = load_lora(source, family)
    made_from = _made_from(source, chosen, lora.metadata)
    fmt = output_format(to, lora.source_format)
    torch_dtype = parse_dtype(dtype)
    resized, report = resize_lora(lora, chosen, dtype=torch_dtype, progress=progress)
    report.source, report.output, report.output_format = str(source), str(output), fmt
    written = write_lora(resized, output, fmt, dtype=torch_dtype, overwrite=overwrite, provenance=made_from)
    report.warnings = list(lora.warnings) + report.warnings + written
    return report


def _made_from(source: str | os.PathLike[str], rule: RankRule, metadata: Mapping[str, str]) -> PendingRecord:
    """The provenance record of a resize, its input hashed while the modules are resized."""
    return PendingRecord("resize", [("input", open_source(source).path)], {"rule": rule.describe()}, metadata)
