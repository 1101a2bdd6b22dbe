"""Where a LoRA's textual-inversion embeddings go when it is written as format F: the one rule.

In the file where a loader reads them there (docs/FORMATS.md §15): SD kohya files hold them in
A1111's bundle form (``bundle_emb.<token>.string_to_param.*``, written by formats/io.py's kohya
branch through :func:`~.keys.bundle_key`), cloneofsimo safeloras files with lora_diffusion's
``<embed>`` flag (formats/cloneofsimo.py). Everywhere else — SD diffusers/peft, and every FLUX.1
dialect, whose loaders refuse or skip a file with keys beside its modules — they go beside it, in
``<stem>.embeddings.safetensors``, and the writer says so. Nothing is dropped.

The LoRA and its sidecar are one output: the sidecar's destination is checked before anything is
written, and the LoRA just written is removed again if its sidecar cannot be (one that replaced an
existing file with ``overwrite`` stays: the old file is gone by then, and the error is raised).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.atomic import check_destination

if TYPE_CHECKING:
    from .adapters import LoraFile

IN_FILE = "in-file"
BESIDE = "sidecar"
SUFFIX = ".embeddings.safetensors"


def is_flux(lora: LoraFile) -> bool:
    """A FLUX.1 LoRA: placed by a FLUX.1 spec, or one no spec fits that its module names say is
    FLUX.1 (kept by its own names, formats/verdict.py)."""
    if lora.family is not None:
        return lora.family.transformer is not None
    return lora.verdict.family == "flux1"


def placement(lora: LoraFile, fmt: str) -> str | None:
    """Where ``lora``'s embeddings go written as ``fmt``: :data:`IN_FILE`, :data:`BESIDE`, or None
    when it has none."""
    if not lora.embeddings:
        return None
    if fmt in ("kohya", "cloneofsimo") and not is_flux(lora):
        return IN_FILE
    return BESIDE


def sidecar_path(output: str | Path) -> Path:
    """``<stem>.embeddings.safetensors`` beside ``output`` (a file or a peft folder)."""
    out = Path(output)
    return out.with_name(f"{out.name.split('.')[0]}{SUFFIX}")


def _why(lora: LoraFile, fmt: str) -> str:
    if is_flux(lora):
        return "FLUX.1 loaders refuse or skip LoRA files with other keys (docs/FORMATS.md §15)"
    return f"{fmt} LoRA files cannot hold them"


def write_with_sidecar(
    lora: LoraFile,
    output: str | Path,
    fmt: str,
    write: Callable[[], None],
    *,
    overwrite: bool = False,
    notes: list[str] | None = None,
) -> None:
    """Run ``write`` (the LoRA file itself), then write the embeddings beside it if
    :func:`placement` says so; one output: pre-checked, and rolled back on failure.

    ``notes`` hears where the embeddings went (a warning for the caller's report).
    """
    if placement(lora, fmt) != BESIDE:
        write()
        return
    from ..io.safetensors import save_tensors

    out, side = Path(output), sidecar_path(output)
    check_destination(side, overwrite=overwrite)  # refuse before writing anything, not half-way
    existed = out.exists()
    write()
    try:
        save_tensors(side, lora.embeddings, {"format": "pt"}, overwrite=overwrite)
    except BaseException:
        if not existed:  # the pair is one output: without its embeddings, the LoRA just written goes too
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
        raise
    if notes is not None:
        tokens = list(lora.embeddings)
        shown = ", ".join(tokens[:5]) + (f", … ({len(tokens) - 5} more)" if len(tokens) > 5 else "")
        notes.append(f"{len(tokens)} textual-inversion embeddings ({shown}) written to {side.name}: {_why(lora, fmt)}")
