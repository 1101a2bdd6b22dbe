"""What rescale, resize, blend and extract share: the rank rule from options, the output format,
and writing the result (atomic, embeddings never dropped)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import InputError
from ..io.files import same_path
from .provenance import KEY as PROVENANCE_KEY
from .provenance import PendingRecord, dumps
from .rank_rule import RankRule

if TYPE_CHECKING:  # torch loads only where a torch path runs (the numpy path never does)
    import torch

    from ..formats.adapters import LoraFile


def rank_rule(
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    rule: RankRule | None = None,
) -> RankRule:
    """A :class:`RankRule` from keyword options, or the one given (not both)."""
    options = (rank, conv_rank, sv_ratio, sv_fro, sv_cumulative, min_rank, max_rank)
    if rule is not None:
        if any(o is not None for o in options):
            raise InputError("give a RankRule or rank options, not both")
        return rule
    return RankRule(
        rank=rank,
        conv_rank=conv_rank,
        sv_ratio=sv_ratio,
        sv_fro=sv_fro,
        sv_cumulative=sv_cumulative,
        min_rank=min_rank,
        max_rank=max_rank,
    )


def output_format(requested: str | None, source_format: str | None) -> str:
    """The writer to use: the one asked for, else the source's own dialect if writable, else kohya."""
    from ..formats.io import FORMATS

    if requested is not None:
        if requested not in FORMATS:
            raise InputError(f"unknown LoRA format {requested!r} (choose from {', '.join(FORMATS)})")
        return requested
    return source_format if source_format in FORMATS else "kohya"


def check_output(output: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> None:
    """Refuse to write over an input (paths compared with symlinks followed; a symlink loop is the
    readers' to report, not a crash here)."""
    for source in inputs:
        if same_path(source, output):
            raise InputError(f"{output}: output is an input; write elsewhere")


def with_provenance(lora: LoraFile, provenance: PendingRecord | None) -> LoraFile:
    """``lora`` with its provenance record (``loratools.provenance``) in its metadata; as is without one."""
    if provenance is None:
        return lora
    return replace(lora, metadata={**lora.metadata, PROVENANCE_KEY: dumps(provenance.result())})


def write_lora(
    lora: LoraFile,
    output: str | os.PathLike[str],
    fmt: str,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    provenance: PendingRecord | None = None,
) -> list[str]:
    """Write through :func:`save_lora` (atomic) in ``fmt``; returns warnings about what went beside it.

    cloneofsimo files have no alpha, so every module's scale is folded into ``up`` there (exactly
    what the format means). Embeddings go where formats/sidecar.py says (in the file or beside it).
    ``provenance``: what the file was made from, recorded under ``loratools.provenance``.
    """
    from ..formats.io import save_lora
    from .convert import prepare

    lora = with_provenance(lora, provenance)
    prepared = prepare(lora, fmt, bake_scale=fmt == "cloneofsimo")
    warnings: list[str] = []
    save_lora(prepared, output, fmt, dtype=dtype, overwrite=overwrite, notes=warnings)
    return warnings
