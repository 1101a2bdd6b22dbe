"""Move a whole checkpoint between layouts and dtypes, streamed tensor by tensor.

Same layout and dtype: every tensor is copied as raw bytes (the file-copy floor). A dtype change
decodes, casts and writes one tensor at a time. A layout change goes through canonical names: a
fused OpenCLIP ``in_proj`` is built from (or split into) q, k and v, ``text_projection`` is turned
around, and keys with no home in the target layout are listed in the report rather than dropped
silently. Peak memory is the largest single tensor (three, for a fused q/k/v).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..families.configs import diffusers_configs
from ..families.detect import Detection
from ..families.keymap import KeyMap
from ..families.spec import DIFFUSERS_FOLDERS
from ..io.atomic import AtomicFolder
from ..io.checkpoint import WEIGHT_NAMES, Checkpoint
from ..io.safetensors import DTYPES, FLOAT_DTYPES, TensorInfo, dtype_name

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]  # called with bytes done since the last call


@dataclass
class ConvertReport:
    """What a checkpoint conversion did."""

    source: str
    output: str
    family: str
    source_layout: str
    output_layout: str
    tensors_written: int = 0
    bytes_written: int = 0
    raw_copied: int = 0  # tensors copied byte for byte
    dropped: dict[str, str] = field(default_factory=dict)  # source keys with no home in the output layout → why
    missing: dict[str, str] = field(default_factory=dict)  # output keys the source could not supply → why
    not_carried: dict[str, str] = field(default_factory=dict)  # source folder files not carried as they were
    files_carried: int = 0  # non-weight files of a source folder copied verbatim


def output_dtype_name(info: TensorInfo, dtype: torch.dtype | None) -> str:
    if dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return dtype_name(dtype)


class CanonicalSource:
    """Reads canonical tensors of a checkpoint, keeping at most one fused tensor decoded."""

    def __init__(self, ckpt: Checkpoint, km: KeyMap, layout: str) -> None:
        self.ckpt, self.km, self.layout = ckpt, km, layout
        self.home: dict[str, str] = {}  # canonical → source key
        for key in ckpt:
            for w in km.lookup(layout, key):
                self.home[w.canonical] = key
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def canonical(self, name: str) -> torch.Tensor:
        key = self.home[name]
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.km.split(self.layout, key, self.ckpt.read(key)))
        return self._cached[1][name]


def plan_layout(source: CanonicalSource, layout: str, keys: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Target key → canonical parts, for target keys whose every part the source has."""
    plan: dict[str, list[str]] = {}
    missing: list[str] = []
    for key in keys:
        parts = [w.canonical for w in source.km.lookup(layout, key)]
        if all(p in source.home for p in parts):
            plan[key] = parts
        elif any(p in source.home for p in parts) or not all(source.km.by_canonical[p].optional for p in parts):
            missing.append(key)
    return plan, missing


def planned_info(
    source: CanonicalSource, parts: list[str], layout: str, key: str, dtype: torch.dtype | None
) -> TensorInfo:
    import torch

    first = source.ckpt.info(source.home[parts[0]])
    tensors = {
        p: torch.empty(
            source.km.split(
                source.layout, source.home[p], torch.empty(source.ckpt.info(source.home[p]).shape, device="meta")
            )[p].shape,
            device="meta",
        )
        for p in parts
    }
    shape = tuple(source.km.join(layout, key, tensors).shape)
    return TensorInfo(output_dtype_name(first, dtype), shape)


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Copy a checkpoint to ``output``, optionally into another layout and/or float dtype.

    ``layout``: ``"single"`` (LDM/SGM single file) or ``"diffusers"`` (folder); default: the
    source's. ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype, applied to float
    tensors only. In the source's own layout every tensor keeps its name, spelling and order and
    a folder keeps every file; across layouts, what has no place is listed with the reason.
    Returns a :class:`ConvertReport`; nothing is left at ``output`` on failure.
    """
    from .merge import rewrite  # the one executor: a conversion is a merge with no LoRAs

    done = rewrite(source, output, layout=layout, dtype=dtype, family=family, overwrite=overwrite, progress=progress)
    return ConvertReport(
        done.base,
        str(output),
        done.family,
        done.layout,
        done.output_layout,
        tensors_written=done.tensors,
        bytes_written=done.tensor_bytes,
        raw_copied=done.raw_copied,
        dropped=done.dropped,
        missing=done.missing,
        not_carried=done.not_carried,
        files_carried=done.files_carried,
    )


def target_layout(found: Detection, layout: str | None) -> str:
    if layout is None:
        return found.layout
    if layout in ("single", "ldm", "sgm", "bfl"):
        return found.family.single_layout
    if layout == "diffusers":
        return "diffusers"
    raise InputError(f"unknown layout {layout!r} (use single or diffusers)")


WriteFile = Callable[[Path, dict[str, list[str]], str], None]  # (file, key → canonical parts, key prefix)


def write_folder(
    src: CanonicalSource,
    output: Path,
    found: Detection,
    write_file: WriteFile,
    *,
    overwrite: bool,
    check: Callable[[Path], None] | None = None,
) -> list[str]:
    """A diffusers folder at ``output``: one weight file per component written by ``write_file``,
    configs (and, from a folder source, tokenizer/scheduler/…) beside them. Returns the diffusers
    keys the source could not fill. ``check(temporary_folder)`` runs before the folder is renamed
    into place."""
    km = src.km
    configs = diffusers_configs(found.family)
    source_folder = src.ckpt.path if src.ckpt.container == "diffusers" else None
    with AtomicFolder(output, overwrite=overwrite) as tmp:
        if source_folder is not None:
            for item in source_folder.iterdir():  # tokenizer, scheduler, configs: carried over as they are
                if item.name not in DIFFUSERS_FOLDERS.values():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        else:
            (tmp / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
        plan, missing = plan_layout(src, "diffusers", km.layout_keys("diffusers"))
        for component, folder in DIFFUSERS_FOLDERS.items():
            prefix = f"{folder}."
            keys = {k: v for k, v in plan.items() if k.startswith(prefix)}
            if not keys:
                continue
            (tmp / folder).mkdir(exist_ok=True)
            config_src = source_folder / folder / "config.json" if source_folder else None
            if config_src is not None and config_src.exists():
                shutil.copy2(config_src, tmp / folder / "config.json")
            else:
                (tmp / folder / "config.json").write_text(json.dumps(configs[folder], indent=2))
            stem = WEIGHT_NAMES[0] if component in ("unet", "transformer", "vae") else WEIGHT_NAMES[1]
            inner = {k[len(prefix) :]: v for k, v in keys.items()}
            write_file(tmp / folder / f"{stem}.safetensors", inner, prefix)
        if check is not None:
            check(tmp)
    return missing


DTYPE_ALIASES = {
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "f16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
    "f32": "F32",
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or a torch dtype) → torch dtype; None stays None."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if name not in ("F16", "BF16", "F32"):
        raise InputError(f"unsupported dtype {dtype!r} (use fp16, bf16 or fp32)")
    return DTYPES[name]
