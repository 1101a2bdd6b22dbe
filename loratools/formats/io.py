"""``load_lora`` / ``save_lora``: every dialect in, the chosen dialect out.

The dialect is told from keys and shapes (never the file name or metadata alone); what a file
holds besides LoRA modules (textual-inversion embeddings) is carried and reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from ..io.atomic import AtomicFolder, check_destination
from ..io.files import regular_file
from ..io.measure import active, text_bytes
from ..io.pickle import split_tensors
from ..io.safetensors import SafetensorsFile, file_size, save_tensors, tensor_plan
from ..io.source import SAFETENSORS, Source, open_source
from . import cloneofsimo, flux, kohya, peft
from .adapters import LoraFile, is_finite
from .keys import EMBEDDING_KEYS, bundle_key, is_embedding_key, normalize_peft_key, token_key  # noqa: F401 (EMBEDDING_KEYS re-exported)
from .lookalike import check_not_lfs_pointer, flatten_embedding, not_a_lora
from .metadata import carried_metadata, describe_network, with_hashes
from .sidecar import IN_FILE, is_flux, placement, write_with_sidecar
from .verdict import is_flux_lora, needs_family_map

FORMATS = ("kohya", "diffusers", "peft", "cloneofsimo", "comfyui")  # comfyui: FLUX.1 only


def _read_tensors(source: Source) -> tuple[object, dict[str, str]]:
    if source.kind == SAFETENSORS:
        with SafetensorsFile(source.path) as handle:
            return handle.read_all(), dict(handle.metadata)
    obj, _ = source.unpickled()
    return flatten_embedding(obj), {}


def split_embeddings(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, textual-inversion embeddings): embeddings are 1-D/2-D tensors named like tokens."""
    embeddings = {k: v for k, v in tensors.items() if is_embedding_key(k, metadata)}
    lora = {k: v for k, v in tensors.items() if k not in embeddings}
    return lora, {token_key(k): v for k, v in embeddings.items()}


def load_lora(
    path: str | os.PathLike[str] | Source,
    family: str | FamilySpec | None = None,
    *,
    allow_nonfinite: bool = False,
    require_fit: bool = False,
) -> LoraFile:
    """Read a LoRA of any supported dialect into a :class:`LoraFile`.

    ``path``: a .safetensors file, a weights-only pickle (.pt/.bin/.ckpt), a cloneofsimo ``.pt``
    list (its ``.text_encoder.pt`` companion is read with it), or a peft adapter folder.
    ``family``: "sd1"/"sd2"/"sdxl" or a FamilySpec, when names and shapes should not decide.
    ``path`` may also be an ``hf://owner/repo/path[@revision]`` reference (:mod:`loratools.io.hub`)
    or a :class:`~.source.Source` already opened (its header and unpickled object are reused).
    A module with NaN or inf factors is refused (InputError) unless ``allow_nonfinite``: nothing
    sound can be made of it, and a caller that can leave it out (merge --skip-nonfinite) asks.
    The model it is for is a report (``lora.model``, :mod:`.verdict`), never a refusal, unless
    ``require_fit``: then no module fitting the family's shapes is an error (merge into a base).
    """
    source = open_source(path)
    path = source.path
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        lora = peft.read_peft_folder(path, family, require_fit=require_fit)
        lora.path = str(path)
        return _checked(lora, path, allow_nonfinite)
    if regular_file(path).st_size == 0:
        raise InputError(f"{path.name}: empty file")
    check_not_lfs_pointer(path)
    obj, metadata = _read_tensors(source)
    if isinstance(obj, list):
        lora = cloneofsimo.read_pt(path, obj, family)
    elif isinstance(obj, dict):
        tensors, dropped = split_tensors(obj, path.name)
        lora = _read_dict(path, tensors, metadata, family, require_fit)
        if dropped:
            lora.warnings.append(f"non-tensor entries ignored: {', '.join(dropped[:5])}")
    else:
        raise InputError(f"{path.name}: holds a {type(obj).__name__}, not LoRA tensors")
    lora.path = str(path)
    if lora.embeddings:
        lora.warnings.append(
            f"also holds {len(lora.embeddings)} textual-inversion embeddings: {', '.join(list(lora.embeddings)[:5])}"
        )
    return _checked(lora, path, allow_nonfinite)


def _checked(lora: LoraFile, path: Path, allow_nonfinite: bool) -> LoraFile:
    if not allow_nonfinite:
        bad = [module for module, adapter in lora.adapters.items() if not is_finite(adapter)]
        if bad:
            raise InputError(
                f"{path.name}: {len(bad)} of its modules have NaN or inf factors (e.g. {bad[0]})",
                hint="a damaged or diverged LoRA; merge --skip-nonfinite can leave such modules out",
            )
    return lora


def _read_dict(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    family: str | FamilySpec | None,
    require_fit: bool = False,
) -> LoraFile:
    lora_tensors, embeddings = split_embeddings(tensors, metadata)
    if not lora_tensors:
        if embeddings:
            raise InputError(
                f"{path.name}: a textual-inversion embedding ({', '.join(list(embeddings)[:3])}), not a LoRA",
                hint="embeddings are loaded by the pipeline's textual-inversion loader, not merged",
            )
        raise InputError(f"{path.name}: holds no tensors")
    keys = list(lora_tensors)
    kohya_keys = [k for k in keys if kohya.KEY.match(k)]
    if kohya_keys and len(kohya_keys) != len(keys) and not is_flux_lora(keys):
        others = [k for k in keys if not kohya.KEY.match(k)]
        if peft.is_peft_like(others):
            raise InputError(
                f"{path.name}: mixes kohya and diffusers/peft keys (e.g. {kohya_keys[0]} and {others[0]}); "
                "conflicting duplicates are not guessed at"
            )
        raise InputError(f"{path.name}: unknown keys beside kohya ones: {', '.join(others[:5])}")
    # BFL or FLUX.1 module names, any dialect (docs/FLUX.md §2); None: widths fit no FLUX.1
    flux_lora = flux.read_flux_lora(lora_tensors, metadata, family) if is_flux_lora(keys) else None
    if flux_lora is not None:
        lora = flux_lora
    elif is_flux_lora(keys) and flux.needs_verbatim(keys):
        # XLabs / lycoris_ spellings of a FLUX.1 LoRA no spec fits: kept by their own names
        lora = flux.read_flux_verbatim(lora_tensors, metadata)
    elif kohya_keys:
        lora = kohya.read_kohya(lora_tensors, metadata, family, require_fit=require_fit)
    elif cloneofsimo.is_safeloras(keys):
        lora = cloneofsimo.read_safeloras(lora_tensors, metadata, family)
    elif peft.is_peft_like(keys):
        lora = peft.read_peft(lora_tensors, metadata, family, require_fit=require_fit)
    else:
        verdict = not_a_lora(path.name, keys)
        if verdict is not None:
            raise verdict
        raise InputError(f"{path.name}: unknown LoRA key layout; first keys: {', '.join(keys[:5])}")
    lora.embeddings.update(embeddings)
    return lora


def save_lora(
    lora: LoraFile,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    t5_prefix: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write a LoRA in ``fmt`` (kohya, diffusers, peft, cloneofsimo, comfyui for FLUX.1); atomic, never half-written.

    ``t5_prefix``: a FLUX.1 LoRA's T5 modules in kohya naming (``lora_te2`` unless given:
    ``convert --for kohya`` asks for sd-scripts' ``lora_te3``).
    Textual-inversion embeddings go where :mod:`.sidecar` says (in the file, or beside it in
    ``<stem>.embeddings.safetensors``); ``notes`` hears where when they went beside.

    Raises :class:`InputError` when the format cannot hold the LoRA exactly (LoHa/LoKr/DoRA into
    plain-LoRA formats, per-module alphas into cloneofsimo): use ``bake`` or ``to_lowrank`` first.
    """
    path = Path(path)
    write_with_sidecar(
        lora,
        path,
        fmt,
        lambda: _write(lora, path, fmt, dtype, overwrite, t5_prefix),
        overwrite=overwrite,
        notes=notes,
    )
    return path


def _write(
    lora: LoraFile, path: Path, fmt: str, dtype: torch.dtype | None, overwrite: bool, t5_prefix: str | None
) -> None:
    """The LoRA file itself in ``fmt`` (embeddings in it only where :func:`~.sidecar.placement` says)."""
    # FLUX.1 LoRAs have spellings of their own (formats/flux.py)
    flux_family = lora.family is not None and lora.family.transformer is not None
    if fmt == "comfyui" and not flux_family:
        if is_flux(lora):  # FLUX.1 by its module names alone: ComfyUI's names come from the family map
            raise needs_family_map(
                lora.verdict, f"writing a {lora.names}-named {lora.family_title} LoRA in ComfyUI naming (--to comfyui)"
            )
        raise InputError("--to comfyui writes FLUX.1 LoRAs; ComfyUI reads SD LoRAs as kohya (use --to kohya)")
    if flux.writes_verbatim(lora) and fmt == "kohya" and not (fmt == lora.source_format and lora.source_keys):
        # XLabs / lycoris_ stems have kohya names by a pure rename (formats/flux.py): exact, no family map
        renamed = flux.verbatim_as_kohya(lora)
        tensors = kohya.kohya_state_dict(renamed, dtype=dtype)
        save_tensors(path, tensors, with_hashes(kohya.kohya_metadata(renamed), tensors), overwrite=overwrite)
    elif flux.writes_verbatim(lora):
        if fmt != lora.source_format or not lora.source_keys:
            raise needs_family_map(
                lora.verdict,
                f"writing an XLabs/lycoris_-spelled {lora.family_title} LoRA as {fmt} (its file modules, "
                f"e.g. {next(iter(lora.adapters))}, have {fmt} names only through the FLUX.1 name tables; "
                "--to kohya renames them exactly)",
            )
        tensors = flux.flux_verbatim_state_dict(lora, dtype=dtype)
        meta = kohya.kohya_metadata(lora) if fmt == "kohya" else carried_metadata(lora)
        if fmt != "kohya" and any(k.startswith("ss_") for k in meta):
            describe_network(meta, lora)
        save_tensors(path, tensors, meta, overwrite=overwrite)
    elif flux_family and fmt in ("kohya", "diffusers", "comfyui"):
        tensors, meta = flux.flux_state_dict(lora, fmt, dtype=dtype, t5_prefix=t5_prefix)
        save_tensors(path, tensors, meta, overwrite=overwrite)
    elif fmt == "kohya":
        tensors = kohya.kohya_state_dict(lora, dtype=dtype)
        if placement(lora, fmt) == IN_FILE:  # A1111's bundle form, the one loader reading them there
            tensors.update({bundle_key(k): v for k, v in lora.embeddings.items()})
        save_tensors(path, tensors, with_hashes(kohya.kohya_metadata(lora), tensors), overwrite=overwrite)
    elif fmt == "diffusers":
        tensors = peft.peft_state_dict(lora, dtype=dtype)
        save_tensors(path, tensors, with_hashes(peft.diffusers_metadata(lora), tensors), overwrite=overwrite)
    elif fmt == "peft":
        _save_peft_folder(lora, path, dtype, overwrite)
    elif fmt == "cloneofsimo":
        tensors, metadata = cloneofsimo.safeloras_state_dict(lora, dtype=dtype)
        save_tensors(path, tensors, with_hashes(metadata, tensors), overwrite=overwrite)
    else:
        raise InputError(f"unknown LoRA format {fmt!r} (choose from {', '.join(FORMATS)})")


def _save_peft_folder(lora: LoraFile, path: Path, dtype: torch.dtype | None, overwrite: bool) -> None:
    configs = peft.peft_configs(lora)
    tensors = peft.peft_state_dict(lora, dtype=dtype)
    by_folder: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, param, _ = normalize_peft_key(key)
        folder, inner = peft.split_folder(module)
        by_folder.setdefault(folder, {})[f"base_model.model.{inner}.{param}"] = tensor
    weights: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    texts: dict[str, str] = {}
    for folder, config in configs.items():
        # folder "": a LoRA with no family map whose modules sit at the adapter's root
        where = f"{folder}/" if folder else ""
        local = by_folder.get(folder, {})
        weights[where + peft.WEIGHTS_NAME] = local, with_hashes(peft.folder_metadata(lora), local)
        texts[where + peft.CONFIG_NAME] = json.dumps(config, indent=2, sort_keys=True)
    dry = active()
    if dry is not None:  # a dry run: the same files, measured (io/measure.py), no folder made
        check_destination(path, overwrite=overwrite)
        for rel, (local, meta) in weights.items():
            dry.add(path / rel, file_size(tensor_plan(local), meta))
        for rel, text in texts.items():
            dry.add(path / rel, text_bytes(text))
        return
    with AtomicFolder(path, overwrite=overwrite) as tmp:
        for rel, (local, meta) in weights.items():
            (tmp / rel).parent.mkdir(exist_ok=True)
            save_tensors(tmp / rel, local, meta)
        for rel, text in texts.items():
            (tmp / rel).write_text(text)
