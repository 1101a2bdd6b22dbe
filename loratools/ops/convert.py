"""LoRA conversion between dialects, with exactness stated: refuse what a format cannot hold,
or re-factorize it by SVD in factor space when asked."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import LoraFile, LowRank, factor_dtype
from ..formats.io import FORMATS, load_lora, save_lora
from ..io.atomic import check_destination
from ..io.files import same_path
from .checkpoint import parse_dtype
from .lowrank import to_lowrank


@dataclass
class LoraConvertReport:
    """What a LoRA conversion did."""

    source: str
    output: str
    source_format: str
    output_format: str
    family: str
    modules: int
    kinds: dict[str, int]
    exact: bool  # factors written as read (no baking, no re-factorization, no dtype change)
    baked: int = 0
    refactorized: int = 0
    max_relative_error: float = 0.0  # of re-factorized modules (Frobenius)
    embeddings: int = 0
    warnings: list[str] = field(default_factory=list)


def _needs_plain(fmt: str) -> bool:
    return fmt in ("diffusers", "peft", "cloneofsimo")


def prepare(
    lora: LoraFile,
    fmt: str,
    *,
    bake_scale: bool = False,
    to_lora: bool = False,
    rank: int | None = None,
    error: float | None = None,
    report: LoraConvertReport | None = None,
) -> LoraFile:
    """The LoRA as ``fmt`` can hold it, or an InputError naming the way out."""
    if fmt not in FORMATS:
        raise InputError(f"unknown LoRA format {fmt!r} (choose from {', '.join(FORMATS)})")
    adapters = dict(lora.adapters)
    if to_lora:
        if rank is None and error is None:
            raise InputError("--to-lora needs --rank N or --error E")
        worst = 0.0
        for module, adapter in adapters.items():
            if isinstance(adapter, LowRank) and adapter.mid is None:
                continue  # already a plain LoRA (resizing those is `loratools resize`)
            adapters[module], err = to_lowrank(adapter, rank=rank, error=error, dtype=factor_dtype(adapter))
            worst = max(worst, err)
            if report is not None:
                report.refactorized += 1
        if report is not None:
            report.max_relative_error = worst
    if _needs_plain(fmt):
        odd = {}
        for module, adapter in adapters.items():
            if not isinstance(adapter, LowRank) or adapter.mid is not None:
                odd[module] = "tucker" if isinstance(adapter, LowRank) else adapter.kind
            elif adapter.dora_scale is not None and (fmt == "cloneofsimo" or adapter.dora_axis != "out"):
                odd[module] = "dora" + ("" if adapter.dora_axis == "out" else " (input axis)")
        if odd:
            kinds = sorted(set(odd.values()))
            raise InputError(
                f"{fmt} cannot hold {len(odd)} {'/'.join(kinds)} modules exactly (e.g. {next(iter(odd))})",
                hint="--to-lora --rank N (or --error E) re-factorizes them by SVD; --to kohya keeps them exactly",
            )
    if bake_scale or fmt == "cloneofsimo":
        unscaled = [m for m, a in adapters.items() if isinstance(a, LowRank) and a.alpha != a.rank]
        if unscaled and not bake_scale:
            raise InputError(
                f"cloneofsimo files have no alpha, and {len(unscaled)} modules have scale ≠ 1 (e.g. {unscaled[0]})",
                hint="--bake folds each scale into its up factor",
            )
        for module in unscaled:
            adapters[module] = adapters[module].baked()  # type: ignore[union-attr]
        if report is not None:
            report.baked = len(unscaled)
    return lora.with_adapters(adapters)


def convert_lora(
    source: str | Path,
    output: str | Path,
    to: str,
    *,
    family: str | FamilySpec | None = None,
    dtype: str | torch.dtype | None = None,
    bake_scale: bool = False,
    to_lora: bool = False,
    rank: int | None = None,
    error: float | None = None,
    overwrite: bool = False,
) -> LoraConvertReport:
    """Read a LoRA in any dialect and write it as ``to`` (kohya, diffusers, peft, cloneofsimo)."""
    if same_path(output, source):
        raise InputError(f"{output}: output is the input; write elsewhere")
    if error is not None and not 0 <= error < 1:
        raise InputError(f"--error must be in [0, 1), got {error}")
    lora = load_lora(source, family)
    report = LoraConvertReport(
        str(source),
        str(output),
        lora.source_format,
        to,
        lora.family_name,
        len(lora.adapters),
        lora.kinds,
        exact=False,
        embeddings=len(lora.embeddings),
        warnings=list(lora.warnings),
    )
    prepared = prepare(lora, to, bake_scale=bake_scale, to_lora=to_lora, rank=rank, error=error, report=report)
    out = Path(output)
    # diffusers/peft LoRA files have no place for tokens: they are kept beside, never dropped
    sidecar = out.with_name(f"{out.name.split('.')[0]}.embeddings.safetensors")
    with_sidecar = bool(lora.embeddings) and to in ("diffusers", "peft")
    if with_sidecar:
        check_destination(sidecar, overwrite=overwrite)  # refuse before writing anything, not half-way
    existed = out.exists()
    save_lora(prepared, output, to, dtype=parse_dtype(dtype), overwrite=overwrite)
    if with_sidecar:
        from ..io.safetensors import save_tensors

        try:
            save_tensors(sidecar, lora.embeddings, {"format": "pt"}, overwrite=overwrite)
        except BaseException:
            if existed:
                raise
            # the pair is one output: without its embeddings, the LoRA just written goes too
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
            raise
        report.warnings.append(
            f"{len(lora.embeddings)} textual-inversion embeddings "
            f"({', '.join(lora.embeddings)}) written to {sidecar.name}: {to} LoRA files cannot hold them"
        )
    report.exact = not (report.baked or report.refactorized or dtype is not None)
    if not math.isfinite(report.max_relative_error):
        report.warnings.append("re-factorization error is not finite: the LoRA holds NaN/inf")
    return report
