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
from ..families.configs import diffusers_configs, pipeline_index, scheduler_config
from ..families.detect import Detection, unreadable_changes
from ..families.keymap import KeyMap
from ..families.spec import DIFFUSERS_FOLDERS, TOKENIZER_FOLDERS, FamilySpec
from ..io.atomic import AtomicFolder
from ..io.checkpoint import WEIGHT_NAMES, Checkpoint
from ..io.safetensors import DTYPES, FLOAT_DTYPES, TensorInfo, dtype_name
from ..io.source import Source

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
    notes: list[str] = field(default_factory=list)  # what a new pipeline folder lacks or took from elsewhere


def output_dtype_name(info: TensorInfo, dtype: str | torch.dtype | None) -> str:
    """The dtype a tensor is written in: ``dtype`` (a torch dtype or safetensors name) for floats."""
    if dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return dtype if isinstance(dtype, str) else dtype_name(dtype)


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
    source: CanonicalSource, parts: list[str], layout: str, key: str, dtype: str | torch.dtype | None
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
    source: str | Path | Source,
    output: str | Path,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    tokenizers_from: str | Path | None = None,
) -> ConvertReport:
    """Copy a checkpoint to ``output``, optionally into another layout and/or float dtype.

    ``layout``: ``"single"`` (LDM/SGM single file) or ``"diffusers"`` (folder); default: the
    source's. ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype, applied to float
    tensors only. In the source's own layout every tensor keeps its name, spelling and order and
    a folder keeps every file; across layouts, what has no place is listed with the reason. A
    folder made from a single file gets the family's scheduler, and its tokenizers from
    ``tokenizers_from`` (docs/FORMATS.md §5.6). Returns a :class:`ConvertReport`; nothing is left at ``output`` on failure.
    """
    from .merge import rewrite  # the one executor: a conversion is a merge with no LoRAs

    done = rewrite(
        source,
        output,
        layout=layout,
        dtype=dtype,
        family=family,
        overwrite=overwrite,
        progress=progress,
        tokenizers_from=tokenizers_from,
    )
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
        notes=done.notes,
    )


def target_layout(found: Detection, layout: str | None) -> str:
    if layout is None:
        return found.layout
    if layout in ("single", "ldm", "sgm", "bfl"):
        return found.family.single_layout
    if layout == "diffusers":
        return "diffusers"
    raise InputError(f"unknown layout {layout!r} (use single or diffusers)")


@dataclass
class PipelineFiles:
    """The non-weight files of a diffusers folder made from a single file (docs/FORMATS.md §5.6)."""

    scheduler: dict[str, object] | None  # scheduler/scheduler_config.json, from the family data
    tokenizers: dict[str, Path] = field(default_factory=dict)  # subfolder → folder copied verbatim
    index: dict[str, list[str]] = field(default_factory=dict)  # their model_index.json entries
    notes: list[str] = field(default_factory=list)


def _tokenizer_class(root: Path, name: str, clip: bool) -> list[str]:
    """``[library, class]`` for a copied tokenizer: as the folder's model_index.json or the
    tokenizer's own tokenizer_config.json names it, else the CLIP/T5 tokenizer the encoder pairs with."""
    for path, read in (
        (root / "model_index.json", lambda d: d.get(name)),
        (root / name / "tokenizer_config.json", lambda d: ["transformers", d.get("tokenizer_class")]),
    ):
        try:
            entry = read(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
            return entry
    return ["transformers", "CLIPTokenizer" if clip else "T5TokenizerFast"]


def pipeline_files(found: Detection, tokenizers_from: str | Path | None = None) -> PipelineFiles:
    """What a folder made from a single file of ``found`` gets beside its weights: the family's
    scheduler config, and the tokenizers of ``tokenizers_from`` (a diffusers folder, or a folder
    holding tokenizer/ [tokenizer_2/]); tokenizers cannot be made from weights, so without it the
    notes say so. Raises InputError when ``tokenizers_from`` lacks one the family needs."""
    spec: FamilySpec = found.family
    scheduler = scheduler_config(spec, found.prediction)
    files = PipelineFiles(scheduler)
    if scheduler is None:
        files.notes.append(f"no scheduler is known for {spec.title}; scheduler/ is not written")
    chosen = unreadable_changes(spec)
    if chosen:
        files.notes.append("weights do not show group or head counts; the configs use " + ", ".join(chosen))
    clip = {t.component for t in spec.texts}
    needed = {TOKENIZER_FOLDERS[c]: c in clip for c in spec.text_components}
    names = " and ".join(f"{n}/" for n in needed)
    if tokenizers_from is None:
        files.notes.append(f"{names} cannot be made from weights; pass --tokenizers-from FOLDER")
        return files
    root = Path(tokenizers_from)
    if not root.is_dir():
        raise InputError(f"--tokenizers-from {root}: not a folder (give a diffusers folder or one holding {names})")
    absent = [n for n in needed if not (root / n).is_dir()]
    if absent:
        raise InputError(
            f"--tokenizers-from {root}: no {' or '.join(f'{n}/' for n in absent)} in it ({spec.title} needs {names})"
        )
    for name, is_clip in needed.items():
        files.tokenizers[name] = root / name
        files.index[name] = _tokenizer_class(root, name, is_clip)
    files.notes.append(f"{names} copied from {root}")
    return files


WriteFile = Callable[[Path, dict[str, list[str]], str], None]  # (file, key → canonical parts, key prefix)


def write_folder(
    src: CanonicalSource,
    output: Path,
    found: Detection,
    write_file: WriteFile,
    *,
    overwrite: bool,
    check: Callable[[Path], None] | None = None,
    extras: PipelineFiles | None = None,
) -> list[str]:
    """A diffusers folder at ``output``: one weight file per component written by ``write_file``,
    configs beside them, and from a folder source its tokenizer/scheduler/… as they are; from a
    single file, the scheduler and tokenizers of ``extras`` (default: :func:`pipeline_files`).
    Returns the diffusers keys the source could not fill. ``check(temporary_folder)`` runs before
    the folder is renamed into place."""
    km = src.km
    configs = diffusers_configs(found.family)
    source_folder = src.ckpt.path if src.ckpt.container == "diffusers" else None
    with AtomicFolder(output, overwrite=overwrite) as tmp:
        if source_folder is not None:
            for item in source_folder.iterdir():  # tokenizer, scheduler, configs: carried over as they are
                if item.name not in DIFFUSERS_FOLDERS.values():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        else:
            _write_pipeline_files(tmp, found.family, extras if extras is not None else pipeline_files(found))
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
                (tmp / folder / "config.json").write_text(config_text(configs[folder]))
            stem = WEIGHT_NAMES[0] if component in ("unet", "transformer", "vae") else WEIGHT_NAMES[1]
            inner = {k[len(prefix) :]: v for k, v in keys.items()}
            write_file(tmp / folder / f"{stem}.safetensors", inner, prefix)
        if check is not None:
            check(tmp)
    return missing


def config_text(config: dict[str, object]) -> str:
    """A component's ``config.json`` as :func:`write_folder` writes it (made, not copied)."""
    return json.dumps(config, indent=2)


def pipeline_texts(spec: FamilySpec, extras: PipelineFiles) -> dict[str, str]:
    """The pipeline files a folder made from a single file gets (relative path → text); the
    tokenizer folders of ``extras`` are copied beside them."""
    texts = {"model_index.json": json.dumps(pipeline_index(spec, extras.scheduler, extras.index), indent=2) + "\n"}
    if extras.scheduler is not None:
        texts["scheduler/scheduler_config.json"] = json.dumps(extras.scheduler, indent=2) + "\n"
    return texts


def _write_pipeline_files(tmp: Path, spec: FamilySpec, extras: PipelineFiles) -> None:
    for rel, text in pipeline_texts(spec, extras).items():
        (tmp / rel).parent.mkdir(exist_ok=True)
        (tmp / rel).write_text(text)
    for name, folder in extras.tokenizers.items():
        shutil.copytree(folder, tmp / name)  # verbatim: follows links (a hub cache's blobs)


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
    name = parse_dtype_name(dtype)
    assert name is not None  # a string always names one (or is refused)
    return DTYPES[name]


def parse_dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """What :func:`parse_dtype` gives, as its safetensors name (``"F16"``), without importing torch
    for a string; None stays None."""
    if dtype is None:
        return None
    if not isinstance(dtype, str):
        return dtype_name(dtype)
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if name not in ("F16", "BF16", "F32"):
        raise InputError(f"unsupported dtype {dtype!r} (use fp16, bf16 or fp32)")
    return name
