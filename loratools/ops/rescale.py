"""Rescale a LoRA's strength: ``ΔW' = S·ΔW`` for every module, exactly and sign-safe.

Representation: the magnitude ``|S|`` goes into ``alpha`` and the sign of a negative ``S`` into
the ``up`` factor (LoHa: ``w1a``; LoKr: ``w1``/``w1a``). The factors are therefore kept bit for bit
(a sign flip is exact in every float format) and no square root is ever taken — kohya's
``merge_lora.py`` spreads a ratio over both factors as ``sqrt(ratio)``, which is undefined for a
negative strength and squares the ratio when factors are summed (docs/FORMATS.md §1.5). Where there is
no alpha to carry the magnitude — full diffs and LoKr with two full halves (scale fixed at 1) —
``S`` multiplies the first factor instead, and the report says so.

Exactness: in memory, and in diffusers/peft files (alphas are JSON numbers), ``ΔW' = S·ΔW`` to the
last bit of float64. kohya files store ``alpha`` in the factors' dtype (as sd-scripts does), so in
an fp16/bf16 file the new alpha is rounded once, to ``2⁻¹¹``/``2⁻⁸`` relative; the report gives
that rounding (``alpha_rounding``), and ``--dtype fp32`` or a power-of-two ``S`` avoids it.
cloneofsimo files have no alpha: the scale is folded into ``up`` there; so is it for FLUX.1 file
modules written back in their own keys that have no alpha (XLabs, ai-toolkit without a LoraConfig),
and the report says "factor" for them.
DoRA modules are refused: their output is renormalised against the base weight, so a strength is
not a scale of ΔW (docs/FORMATS.md §4.7).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import Adapter, LoraFile, factor_dtype
from ..formats.flux import scale_in_factors
from ..formats.io import load_lora
from ..io.source import open_source
from .checkpoint import parse_dtype
from .provenance import PendingRecord
from .rank_common import check_output, output_format, write_lora

SCHEMA = "loratools.rescale/1"


@dataclass
class RescaleReport:
    """What a rescale did (``to_dict()`` is the ``--json`` output)."""

    source: str | None
    output: str | None
    source_format: str
    output_format: str | None
    family: str
    by: float
    modules: int = 0
    representation: dict[str, int] = field(default_factory=dict)  # "alpha" / "alpha+sign" / "factor" → count
    alpha_rounding: float = 0.0  # largest relative change of a stored alpha from rounding to its dtype
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"schema": SCHEMA, **self.__dict__}


def rescale_adapter(adapter: Adapter, by: float) -> tuple[Adapter, str]:
    """``S·ΔW`` for one module, and how it is carried: "alpha", "alpha+sign" or "factor"
    (each kind's :meth:`~loratools.formats.adapters.AdapterKind.rescaled`)."""
    if adapter.dora_scale is not None:
        raise InputError(
            "a DoRA module's strength is not a scale of ΔW (its magnitude renormalises W + ΔW)",
            hint="merge it into its checkpoint at strength 1 instead",
        )
    return adapter.rescaled(by)


def rescale_lora(lora: LoraFile, by: float, *, folded: set[str] | None = None) -> tuple[LoraFile, RescaleReport]:
    """Every module of ``lora`` at strength ``by`` (``ΔW' = by·ΔW``); embeddings are left as they are.

    ``folded``: modules whose writer has no alpha to carry the scale and folds it into the up
    factor (formats/flux.py scale_in_factors): reported as "factor", what the file really holds.
    """
    if not math.isfinite(by):
        raise InputError(f"--by must be a finite number, got {by}")
    if by == 0:
        # alpha 0 is read as alpha = rank (full strength) by sd-scripts and LyCORIS (docs/FORMATS.md §1.3)
        raise InputError("--by 0 would write alpha 0, which sd-scripts and LyCORIS read as full strength")
    report = RescaleReport(None, None, lora.source_format, None, lora.family_name, by, modules=len(lora.adapters))
    adapters: dict[str, Adapter] = {}
    counts: Counter[str] = Counter()
    for module, adapter in lora.adapters.items():
        try:
            adapters[module], how = rescale_adapter(adapter, by)
        except InputError as exc:
            raise InputError(f"{module}: {exc.message}", hint=exc.hint) from None
        counts["factor" if folded and module in folded else how] += 1
    report.representation = dict(counts)
    return lora.with_adapters(adapters), report


def _alpha_rounding(lora: LoraFile, dtype: torch.dtype | None) -> float:
    """The largest relative change an alpha undergoes when stored in its file dtype (kohya files)."""
    worst = 0.0
    for adapter in lora.adapters.values():
        if adapter.stores_alpha and adapter.alpha:
            stored = float(torch.tensor(adapter.alpha, dtype=dtype or factor_dtype(adapter)))
            if stored == 0.0 or not math.isfinite(stored):
                raise InputError(
                    f"alpha {adapter.alpha:g} cannot be stored in {dtype or factor_dtype(adapter)} (it becomes {stored:g})",
                    hint="write with --dtype fp32, or choose a strength nearer 1",
                )
            worst = max(worst, abs(stored - adapter.alpha) / abs(adapter.alpha))
    return worst


def rescale(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    by: float,
    *,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | FamilySpec | None = None,
    overwrite: bool = False,
) -> RescaleReport:
    """Write the LoRA at ``source`` with every module's ΔW multiplied by ``by`` (negative allowed).

    ``to``: output dialect (default: the source's; kohya for read-only dialects).
    """
    check_output(output, source)
    opened = open_source(source)
    lora = load_lora(opened, family)
    made_from = PendingRecord("rescale", [("input", opened.path)], {"by": by}, lora.metadata)
    fmt = output_format(to, lora.source_format)
    torch_dtype = parse_dtype(dtype)
    scaled, report = rescale_lora(lora, by, folded=scale_in_factors(lora, fmt))
    report.source, report.output, report.output_format = str(source), str(output), fmt
    if fmt == "kohya":
        report.alpha_rounding = _alpha_rounding(scaled, torch_dtype)
    if fmt == "cloneofsimo":
        report.representation = {"factor": report.modules}  # no alpha in the format: folded into up
    report.warnings = list(lora.warnings) + report.warnings
    report.warnings += write_lora(scaled, output, fmt, dtype=torch_dtype, overwrite=overwrite, provenance=made_from)
    return report
