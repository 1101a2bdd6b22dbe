"""LoRA conversion between dialects, with exactness stated: refuse what a format cannot hold,
or re-factorize it by SVD in factor space when asked."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import Full, LoraFile, factor_dtype, low_rank
from ..formats.io import FORMATS, load_lora, save_lora
from ..io.files import same_path
from ..io.source import Source
from .checkpoint import parse_dtype
from .lowrank import to_lowrank
from .parallel import map_modules


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
    capped: int = 0  # re-factorized modules whose rank --max-rank cut
    estimated_bytes: int = 0  # tensor bytes of the output, known before writing (header not included)
    input_bytes: int = 0
    embeddings: int = 0
    warnings: list[str] = field(default_factory=list)


DEFAULT_MAX_RANK = 64  # what --to-lora keeps at most per module unless told (a LoKr can need hundreds)
SIZE_WARNING = 4  # warn when the output's tensors outweigh the input file this many times


def tensor_bytes(lora: LoraFile, dtype: torch.dtype | None = None) -> int:
    """Bytes of a LoRA's factor tensors as they would be written (``dtype`` overrides each factor's)."""
    total = 0
    for adapter in lora.adapters.values():
        size = torch.finfo(dtype or factor_dtype(adapter)).bits // 8
        total += adapter.parameters() * size
    return total


def _needs_plain(fmt: str) -> bool:
    return fmt in ("diffusers", "peft", "cloneofsimo")


SHOWN_MODULES = 5  # module names a warning lists before "and N more"
# what every refusal of a module a plain-LoRA format cannot hold points to; the same words from
# convert and from resize/blend/extract --to (which have no --to-lora of their own)
REFACTOR_HINT = (
    "`loratools convert … --to {fmt} --to-lora --rank N` (or --error E) re-factorizes them by SVD; "
    "--to kohya keeps them exactly"
)


def dropped_bias_warning(modules: list[str]) -> str | None:
    """The warning naming the full modules whose ``diff_b`` a re-factorization into LoRA drops
    (a LoRA pair has no bias term); None when there are none."""
    if not modules:
        return None
    shown = ", ".join(modules[:SHOWN_MODULES])
    more = f" and {len(modules) - SHOWN_MODULES} more" if len(modules) > SHOWN_MODULES else ""
    return (
        f"{len(modules)} full modules' diff_b (bias difference) dropped by --to-lora: a LoRA has no place "
        f"for it ({shown}{more}); --to kohya without --to-lora keeps them exactly"
    )


def prepare(
    lora: LoraFile,
    fmt: str,
    *,
    bake_scale: bool = False,
    to_lora: bool = False,
    rank: int | None = None,
    error: float | None = None,
    max_rank: int | None = None,
    report: LoraConvertReport | None = None,
    notes: list[str] | None = None,
) -> LoraFile:
    """The LoRA as ``fmt`` can hold it, or an InputError naming the way out.

    ``to_lora`` re-factorizes non-plain modules with one rule, ``rank`` or ``error``, never both,
    capped by ``max_rank`` (default: none with ``rank``, :data:`DEFAULT_MAX_RANK` with ``error``;
    a rank per module chosen from its spectrum is `loratools resize`). ``notes`` hears what that
    loses beyond the stated error: the ``diff_b`` of full modules (:func:`dropped_bias_warning`).
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown LoRA format {fmt!r} (choose from {', '.join(FORMATS)})")
    adapters = dict(lora.adapters)
    if to_lora:
        if rank is None and error is None:
            raise InputError("--to-lora needs --rank N or --error E")
        if rank is not None and error is not None:
            raise InputError(
                "--rank and --error are two rules for one choice: give one",
                hint="--error E with --max-rank N caps the rank; for dynamic ranks per module use `loratools resize`",
            )
        cap = max_rank if max_rank is not None else (None if rank is not None else DEFAULT_MAX_RANK)
        worst = 0.0
        # plain LoRAs are kept (resizing those is `loratools resize`); the rest are SVD'd on every
        # core, one thread each (loratools/threads.py)
        todo = [(m, a) for m, a in adapters.items() if not a.is_pair]
        done = map_modules(
            lambda item: to_lowrank(item[1], rank=rank, error=error, dtype=factor_dtype(item[1]), max_rank=cap), todo
        )
        for (module, _), (new, err) in zip(todo, done, strict=True):
            adapters[module] = new
            worst = max(worst, err)
            if report is not None and cap is not None and adapters[module].rank == cap:
                report.capped += 1
            if report is not None:
                report.refactorized += 1
        if report is not None:
            report.max_relative_error = worst
        dropped = dropped_bias_warning([m for m, a in todo if isinstance(a, Full) and a.diff_b is not None])
        if dropped is not None and notes is not None:
            notes.append(dropped)
    if _needs_plain(fmt):
        odd = {}
        for module, adapter in adapters.items():
            if not adapter.is_pair:
                odd[module] = adapter.form  # tucker, loha, lokr, full
            elif adapter.dora_scale is not None and (fmt == "cloneofsimo" or adapter.dora_axis != "out"):
                odd[module] = "dora" + ("" if adapter.dora_axis == "out" else " (input axis)")
        if odd:
            kinds = sorted(set(odd.values()))
            # --to-lora re-factorizes what is not a pair; a DoRA pair needs its base weight
            way_out = REFACTOR_HINT.format(fmt=fmt) if any(not k.startswith("dora") for k in kinds) else None
            raise InputError(
                f"{fmt} cannot hold {len(odd)} {'/'.join(kinds)} modules exactly (e.g. {next(iter(odd))})",
                hint=way_out or "--to kohya keeps them exactly",
            )
    if bake_scale or fmt == "cloneofsimo":
        unscaled = [m for m, a in adapters.items() if low_rank(a) and a.alpha != a.rank]
        if unscaled and not bake_scale:
            raise InputError(
                f"cloneofsimo files have no alpha, and {len(unscaled)} modules have scale ≠ 1 (e.g. {unscaled[0]})",
                hint="--bake folds each scale into its up factor",
            )
        for module in unscaled:
            baked = adapters[module]
            assert low_rank(baked)  # chosen above
            adapters[module] = baked.baked()
        if report is not None:
            report.baked = len(unscaled)
    return lora.with_adapters(adapters)


def _input_bytes(source: str | Path | Source) -> int:
    """Size of a local input (file or folder); 0 for hub references (not resolved twice)."""
    path = Path(source)
    if str(source).startswith("hf://") or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def convert_lora(
    source: str | Path | Source,
    output: str | Path,
    to: str,
    *,
    family: str | FamilySpec | None = None,
    dtype: str | torch.dtype | None = None,
    bake_scale: bool = False,
    to_lora: bool = False,
    rank: int | None = None,
    error: float | None = None,
    max_rank: int | None = None,
    overwrite: bool = False,
    notify: Callable[[str], None] | None = None,
) -> LoraConvertReport:
    """Read a LoRA in any dialect and write it as ``to`` (kohya, diffusers, peft, cloneofsimo).

    ``notify`` hears, before anything is written, the size the output will have and a warning
    when that is more than 4× the input (re-factorizing LoKr/LoHa at a high rank can be).
    """
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
    prepared = prepare(lora, to, bake_scale=bake_scale, to_lora=to_lora, rank=rank, error=error,
                       max_rank=max_rank, report=report, notes=report.warnings)  # fmt: skip
    prepared = replace(prepared, source_keys=())  # a named format's own spelling, never the source's keys
    report.estimated_bytes = tensor_bytes(prepared, parse_dtype(dtype))
    report.input_bytes = _input_bytes(source)
    if report.capped:
        cap = max_rank or DEFAULT_MAX_RANK
        report.warnings.append(
            f"{report.capped} re-factorized modules at the --max-rank cap ({cap}; max relative error "
            f"{report.max_relative_error:.2e}): raise --max-rank for a closer fit"
        )
    if report.input_bytes and report.estimated_bytes > SIZE_WARNING * report.input_bytes:
        report.warnings.append(
            f"the output (~{report.estimated_bytes / 2**20:.1f} MiB of tensors) is "
            f"{report.estimated_bytes / report.input_bytes:.1f}× the input ({report.input_bytes / 2**20:.1f} MiB): "
            "a lower --rank/--max-rank or a larger --error makes it smaller"
        )
    if notify is not None:
        notify(f"output: ~{report.estimated_bytes / 2**20:.1f} MiB of tensors ({len(prepared.adapters)} modules)")
        if report.input_bytes and report.estimated_bytes > SIZE_WARNING * report.input_bytes:
            notify(f"warning: {report.warnings[-1]}")
    # embeddings ride in the file or beside it (formats/sidecar.py), never dropped
    save_lora(prepared, output, to, dtype=parse_dtype(dtype), overwrite=overwrite, notes=report.warnings)
    report.exact = not (report.baked or report.refactorized or dtype is not None)
    if not math.isfinite(report.max_relative_error):
        report.warnings.append("re-factorization error is not finite: the LoRA holds NaN/inf")
    return report
