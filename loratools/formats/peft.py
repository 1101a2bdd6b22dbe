"""peft / diffusers LoRAs: current ``unet.….lora_A.weight`` files, peft adapter folders, and the
old diffusers spellings (attention processors, ``.lora.down``, ``lora_linear_layer``).

Scale: these files carry no alpha tensors. ``lora_adapter_metadata`` (diffusers ≥ 0.34) or
``adapter_config.json`` (peft) give ``lora_alpha``/``r`` with per-module ``alpha_pattern``/
``rank_pattern`` and ``use_rslora``; without either the scale is 1 (docs/FORMATS.md §2). We turn every
module's scale into the kohya convention ``alpha = scale · r``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..families.spec import DIFFUSERS_FOLDERS, FamilySpec
from .adapters import Adapter, LoraFile, LowRank
from .flux import _unit_scale as unit_scale  # one rule for both writers of a file's own keys
from .keys import PEFT_METADATA_KEY as METADATA_KEY
from .keys import UNET_ROOTS as _UNET_ROOTS
from .keys import check_config_rank, config_number, config_of, configs_from_metadata, is_peft_like  # noqa: F401
from .keys import normalize_peft_key as normalize_key
from .keys import pattern_value as _pattern_value
from .names import in_source_order
from .resolve import Unplaced, carry_note, refuse_unplaced, resolve, unplaced_names, verbatim_keys
from .verdict import ModelVerdict, config_verdict, needs_family_map

if TYPE_CHECKING:
    import torch

FORMAT = "diffusers"
PEFT_FORMAT = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FOLDER_OF = {v: k for k, v in DIFFUSERS_FOLDERS.items()}  # "text_encoder" → "te1"


def read_peft(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None = None,
    *,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    default_component: str | None = None,
    source_format: str = FORMAT,
    require_fit: bool = False,
    verdict: ModelVerdict | None = None,
) -> LoraFile:
    """Adapters of a peft/diffusers state dict (any spelling), with their scales from configs."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    file_keys: dict[str, dict[str, torch.Tensor]] = {}  # module → its tensors under the file's keys
    spellings: Counter[str] = Counter()
    for key, tensor in tensors.items():
        module, param, spelling = _normalized(key, default_component)
        spellings[spelling] += 1
        if param in groups.setdefault(module, {}):
            raise InputError(f"{module}.{param} is given twice (in two spellings)")
        groups[module][param] = tensor
        file_keys.setdefault(module, {})[key] = tensor
    kohya_style = {m: _as_kohya_params(m, p) for m, p in groups.items()}
    found = resolve(kohya_style, lambda t: t.peft, metadata, family, require_fit=require_fit)
    configs = configs if configs is not None else configs_from_metadata(metadata)
    for folder, config in configs.items():
        if not isinstance(config, Mapping):
            raise InputError(f"the LoraConfig of {folder} is a {type(config).__name__}, not an object")
    unmatched: dict[str, str] = dict(found.unmatched)
    if found.family is None:  # no family map: every module keeps its own path
        named = {m: m for m in groups}
        if verdict is not None and found.verdict is not None and found.verdict.kind == "unknown":
            found.verdict = verdict
    else:
        named = {}
        for module in groups:  # in file order, placed or not
            if module in found.matched:
                named[module] = found.matched[module]
            elif not require_fit:
                # a module the family does not place: surgery keeps it by its own path (issue 13)
                named[module] = module
    warnings = list(found.warnings)
    adapters: dict[str, Adapter] = {}
    no_config: set[str] = set()
    previous: str | None = None  # the key of the module before, where a verbatim one is written back
    for module, canonical in named.items():
        if module not in unmatched:
            adapters[canonical] = _adapter(module, groups[module], configs, no_config)
            previous = canonical
            continue
        previous_here, previous = previous, module
        try:
            adapter = _adapter(module, groups[module], configs, no_config)
        except InputError as exc:  # its factors make no adapter: copied verbatim
            why = exc.message.removeprefix(f"{module}: ")
            unmatched[module] = Unplaced(unmatched[module], file_keys[module], why, previous_here)
        else:
            if module in adapters:
                raise InputError(f"{module} is given twice (as a module of its own and a canonical one)")
            adapters[module] = adapter
            unmatched[module] = Unplaced(unmatched[module], file_keys[module])
    if no_config:
        warnings.append(
            f"no lora_alpha stored for {', '.join(sorted(no_config))}: assumed scale 1 (alpha = rank), "
            "as diffusers does"
        )
    for name, reason in list(unmatched.items())[:20]:
        warnings.append(carry_note(name, reason) if isinstance(reason, Unplaced) else f"{name}: not matched ({reason})")
    if len(unmatched) > 20:
        warnings.append(f"… and {len(unmatched) - 20} more modules not matched")
    fmt = source_format if spellings.most_common(1)[0][0] == "peft" else spellings.most_common(1)[0][0]
    return LoraFile(
        adapters,
        found.family,
        fmt,
        dict(metadata),
        warnings=warnings,
        unmatched=unmatched,
        model=found.verdict,
        source_names={canonical: module for module, canonical in named.items() if canonical in adapters},
        # kept by their own names: surgery writes the file's own keys back in its order (issue 13)
        source_keys=tuple(tensors) if found.family is None else (),
    )


def _adapter(
    module: str, params: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping[str, Any]], no_config: set[str]
) -> Adapter:
    """One module's LowRank (DoRA magnitude attached), its scale from the LoraConfig of its folder."""
    if "lora_A.weight" not in params or "lora_B.weight" not in params:
        raise InputError(f"{module}: lora_A/lora_B pair incomplete ({sorted(params)})")
    down, up = params["lora_A.weight"], params["lora_B.weight"]
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise InputError(f"{module}: rank mismatch: lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)}")
    if "lora_B.bias" in params:
        raise InputError(f"{module}: lora_B.bias (peft lora_bias=True) cannot be represented; not supported")
    folder, path, config = config_of(module, configs)
    alpha = float(rank)
    if config is None:
        no_config.add(folder or "the adapter")
    else:
        check_config_rank(config, folder or "the adapter", path, rank)
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
        lora_alpha = config.get("lora_alpha", rank) if lora_alpha is None else lora_alpha
        lora_alpha = config_number(lora_alpha, f"{folder or 'the adapter'} lora_alpha for {path}")
        scale = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        alpha = scale * rank
    adapter = LowRank(up, down, alpha)
    magnitude = params.get("lora_magnitude_vector")
    if magnitude is not None:
        # peft stores (out,); LyCORIS' output-axis dora_scale is (out, 1[, 1, 1]) — keep that one form
        ndim = down.dim()
        adapter.dora_scale, adapter.dora_axis = magnitude.reshape(-1, *[1] * (ndim - 1)), "out"
    return adapter


# normalize_key is a pure function of the key's text (three regexes each); key names repeat across
# files of one layout (every diffusers SDXL LoRA of a network shape has the same ~2,000), so a
# census of many files pays it once per distinct key. Errors are not cached (they raise again).
_normalized = lru_cache(maxsize=1 << 15)(normalize_key)


def clear_key_cache() -> None:
    """Forget the normalized keys (benchmarks measure a first-seen layout with it)."""
    _normalized.cache_clear()


def _as_kohya_params(module: str, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under kohya parameter names, so one resolver checks shapes for all dialects."""
    out: dict[str, torch.Tensor] = {}
    if "lora_A.weight" in params:
        out["lora_down.weight"] = params["lora_A.weight"]
    if "lora_B.weight" in params:
        out["lora_up.weight"] = params["lora_B.weight"]
    return out


def read_peft_folder(folder: Path, family: str | FamilySpec | None = None, *, require_fit: bool = False) -> LoraFile:
    """A peft ``save_pretrained`` folder, or a folder of them (``unet/``, ``text_encoder/``…)."""
    from ..io.checkpoint import open_checkpoint  # local: formats sit above io only here

    parts = (
        [folder]
        if (folder / CONFIG_NAME).exists()
        else [p for p in sorted(folder.iterdir()) if (p / CONFIG_NAME).exists()]
    )
    if not parts:
        raise InputError(f"{folder}: no {CONFIG_NAME} found")
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict[str, Any]] = {}
    metadata: dict[str, str] = {}  # the weight files' own (training metadata written beside the config)
    verdict: ModelVerdict | None = None
    for part in parts:
        try:
            config = json.loads((part / CONFIG_NAME).read_text())
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{part / CONFIG_NAME}: not valid JSON") from None
        if not isinstance(config, dict):
            raise InputError(f"{part / CONFIG_NAME}: holds a JSON {type(config).__name__}, not a LoraConfig object")
        weights = part / WEIGHTS_NAME
        if not weights.exists():
            weights = part / "adapter_model.bin"
        with open_checkpoint(weights) as ckpt:
            local = dict(ckpt.items())
            metadata.update({k: v for k, v in ckpt.metadata.items() if k not in metadata})
        folder_name = part.name if part.name in FOLDER_OF else _guess_folder(local)
        configs[folder_name] = config
        verdict = verdict or config_verdict(config)
        for key, tensor in local.items():
            bare = key.removeprefix("base_model.model.")
            if folder_name and not bare.startswith(f"{folder_name}."):
                bare = f"{folder_name}.{bare}"
            tensors[bare] = tensor
    return read_peft(
        tensors, metadata, family, configs=configs, source_format=PEFT_FORMAT, require_fit=require_fit, verdict=verdict
    )


def _guess_folder(tensors: Mapping[str, torch.Tensor]) -> str:
    """The component an adapter saved at the root of its folder is for: "" when it is no SD
    component's (a FLUX.1 transformer, a language model): its module paths are kept as they are."""
    sample = next(iter(tensors), "").removeprefix("base_model.model.")
    if sample.startswith(_UNET_ROOTS):
        return "unet"
    if sample.startswith("text_model."):
        return "text_encoder"
    return ""


# --- writing ------------------------------------------------------------------------------------


def _text_free(path: str) -> str:
    return path.removeprefix("text_model.")


# module roots a verbatim peft LoRA keeps as its own component folders (diffusers pipelines' names)
VERBATIM_FOLDERS = (*DIFFUSERS_FOLDERS.values(), "transformer", "text_encoder_3")


def split_folder(base: str) -> tuple[str, str]:
    """(folder, path) of a written module path: its first part when that names a pipeline
    component, else ("", the whole path) — an adapter saved at its folder's root."""
    folder, _, path = base.partition(".")
    return (folder, path) if folder in VERBATIM_FOLDERS and path else ("", base)


def peft_folder_of(lora: LoraFile, module: str) -> tuple[str, str]:
    """(component folder, path inside it) a peft writer gives a module; "" is the adapter root."""
    if lora.family is None:
        if lora.names != "peft":
            raise needs_family_map(
                lora.verdict, f"writing a {lora.names}-named {lora.family_title} LoRA in peft naming"
            )
        return split_folder(module)
    from .names import name_tables

    tables = name_tables(lora.family)
    if module in lora.unmatched:  # not placed in the family: its own (or mapped) path
        return split_folder(unplaced_names(lora, tables, PEFT_FORMAT, tables.peft_name)[module])
    m = tables.modules[module]
    return DIFFUSERS_FOLDERS[m.component], _text_free(m.path)


def peft_configs(lora: LoraFile) -> dict[str, dict[str, Any]]:
    """LoraConfig fields per folder: the most common r/alpha, exceptions as patterns."""
    per_folder: dict[str, list[tuple[str, LowRank]]] = {}
    for module, adapter in lora.adapters.items():
        if not isinstance(adapter, LowRank):
            raise InputError(f"{module}: a {adapter.kind} module has no peft form")
        folder, path = peft_folder_of(lora, module)
        per_folder.setdefault(folder, []).append((path, adapter))
    configs: dict[str, dict[str, Any]] = {}
    for folder, items in per_folder.items():
        rank = Counter(a.rank for _, a in items).most_common(1)[0][0]
        alpha = Counter(a.alpha for _, a in items).most_common(1)[0][0]
        configs[folder] = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {p: a.rank for p, a in items if a.rank != rank},
            "alpha_pattern": {p: a.alpha for p, a in items if a.alpha != alpha},
            "target_modules": sorted(p for p, _ in items),
            "use_dora": any(a.dora_scale is not None for _, a in items),
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
            "peft_type": "LORA",
        }
    return configs


def peft_state_dict(lora: LoraFile, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<folder>.<module path>.lora_A.weight`` … tensors (diffusers' current layout). A source
    module the family does not place keeps its own path (or, read from kohya, the path its
    lora_name maps to), a malformed one is copied verbatim; one with no peft name is refused by
    name, never left out (:func:`~.resolve.unplaced_names`)."""
    from .names import name_tables

    refuse_unplaced(lora.unmatched, lora.family_title, "it in peft naming")
    tables = name_tables(lora.family) if lora.family is not None else None
    # modules the family did not place keep (or map) their own paths; those with none refuse
    own = unplaced_names(lora, tables, PEFT_FORMAT, tables.peft_name) if tables is not None else {}
    if tables is None and lora.names != "peft":
        raise needs_family_map(lora.verdict, f"writing a {lora.names}-named {lora.family_title} LoRA in peft naming")
    chunks: dict[str, dict[str, torch.Tensor]] = {}  # adapter key → its keys
    writes_own = writes_own_keys(lora)
    for module, adapter in lora.adapters.items():
        if not isinstance(adapter, LowRank):
            raise InputError(f"{module}: a {adapter.kind} module has no peft form")
        if writes_own and not has_config(lora):
            # no LoraConfig to carry the scale (ComfyUI, A1111 read none): it goes into lora_B
            folded = unit_scale(adapter)
            assert isinstance(folded, LowRank)  # a plain LoRA stays one
            adapter = folded
        if adapter.mid is not None:
            raise InputError(f"{module}: a Tucker (lora_mid) module has no peft form")
        if adapter.dora_scale is not None and adapter.dora_axis != "out":
            raise InputError(f"{module}: input-axis DoRA (old LyCORIS) has no peft equivalent")
        base = own[module] if module in own else tables.peft_name(module) if tables is not None else module

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None else t

        out = chunks[module] = {f"{base}.lora_A.weight": cast(adapter.down), f"{base}.lora_B.weight": cast(adapter.up)}
        if adapter.dora_scale is not None:
            out[f"{base}.lora_magnitude_vector"] = cast(adapter.dora_scale.reshape(-1))
    # malformed modules of the source, copied as the file held them (they are no factors) in place
    out = verbatim_keys(lora, PEFT_FORMAT, chunks)
    return in_source_order(out, lora.source_keys) if writes_own else out


def writes_own_keys(lora: LoraFile) -> bool:
    """Whether a diffusers write gives back the source file's own keys and order: a LoRA kept by
    its own names (no family map) read from a diffusers-layout file (surgery, issue 13)."""
    return lora.family is None and bool(lora.source_keys) and lora.source_format == FORMAT


def has_config(lora: LoraFile) -> bool:
    """Whether the source carried diffusers' ``lora_adapter_metadata`` LoraConfig."""
    return METADATA_KEY in lora.metadata


def diffusers_metadata(lora: LoraFile) -> dict[str, str]:
    """diffusers' own keys (``format``, the LoraConfig per folder) beside the source's training
    metadata, carried whole with its network keys describing this file (formats/metadata.py)."""
    from .metadata import carried_metadata, describe_network

    if writes_own_keys(lora) and not has_config(lora):  # the scales are in lora_B: no LoraConfig
        meta = carried_metadata(lora)
        if any(k.startswith("ss_") for k in meta):
            describe_network(meta, lora)
        return meta
    flat: dict[str, Any] = {}
    for folder, config in peft_configs(lora).items():
        for key, value in config.items():
            flat[f"{folder}.{key}"] = value
    meta = carried_metadata(lora)
    if any(k.startswith("ss_") for k in meta):
        describe_network(meta, lora)
    return {"format": "pt", **meta, METADATA_KEY: json.dumps(flat, sort_keys=True)}


def folder_metadata(lora: LoraFile) -> dict[str, str]:
    """The ``__metadata__`` of each adapter_model.safetensors of a peft folder: ``format`` and the
    source's training metadata (peft itself writes only ``format``; extra keys do not disturb it)."""
    from .metadata import carried_metadata, describe_network

    meta = carried_metadata(lora)
    if any(k.startswith("ss_") for k in meta):
        describe_network(meta, lora)
    return {"format": "pt", **meta}
