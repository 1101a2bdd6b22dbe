"""What a LoRA can patch in a family, and every name each dialect gives those modules.

Underscore names are not invertible by string rules (``to_q``, ``ff_net_0_proj``…), so, as
sd-scripts and ComfyUI do, we enumerate the family's modules and build ``name → module`` tables
(docs/FORMATS.md §1.6). U-Net modules answer to both spellings — diffusers (``down_blocks_0_…``) and
LDM/SGM (``input_blocks_1_1_…``) — for every family; writers use each ecosystem's native one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from ..families import keymap
from ..families.spec import DIFFUSERS_FOLDERS, FamilySpec
from ..families.unet import SINGLE_PREFIX as UNET_SINGLE_PREFIX

KOHYA_UNET = "lora_unet"
FOLDER_COMPONENTS = {folder: component for component, folder in DIFFUSERS_FOLDERS.items()}  # "text_encoder" → "te1"

T = TypeVar("T")


@dataclass(frozen=True)
class Module:
    """A patchable module: canonical name, weight shape, and its names in other spellings."""

    name: str  # canonical, e.g. "unet.down_blocks.0.attentions.0.proj_in"
    shape: tuple[int, ...]
    ldm_path: str | None  # U-Net only: "input_blocks.1.1.proj_in"

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def path(self) -> str:
        """The module path inside its component (diffusers / HF spelling)."""
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class NameTables:
    """Lookup tables for one family."""

    modules: dict[str, Module]
    kohya: dict[str, str]  # kohya lora_name → canonical module
    peft: dict[str, str]  # "<folder>.<module path>" (and the un-prefixed text spelling) → canonical

    def kohya_name(self, module: str, *, sgm_unet: bool, text_prefixes: dict[str, str]) -> str:
        """The kohya lora_name a writer gives a module."""
        m = self.modules[module]
        if m.component == "unet":
            path = m.ldm_path if sgm_unet and m.ldm_path else m.path
            return f"{KOHYA_UNET}_{path.replace('.', '_')}"
        return f"{text_prefixes[m.component]}_{m.path.replace('.', '_')}"

    def peft_name(self, module: str) -> str:
        m = self.modules[module]
        return f"{DIFFUSERS_FOLDERS[m.component]}.{m.path}"


def kohya_text_prefixes(spec: FamilySpec) -> dict[str, str]:
    """Writer prefixes: ``lora_te`` for a single text encoder, ``lora_te1``/``lora_te2`` for SDXL."""
    if len(spec.texts) == 1:
        return {"te1": "lora_te"}
    return {"te1": "lora_te1", "te2": "lora_te2"}


TABLE_COMPONENTS = ("unet", "transformer", "te1", "te2")
# "transformer": a DiT (FLUX.1) under OneTrainer's prefix; formats/flux.py reads its other dialects
TEXT_ALIASES = {"te1": ("lora_te", "lora_te1"), "te2": ("lora_te2",), "transformer": ("lora_transformer",)}
_new_module = object.__new__


@cache
def name_tables(spec: FamilySpec) -> NameTables:
    """Every Linear/Conv weight of the U-Net and text encoders, with its dialect names."""
    # Built on every header-only inspect (~1,000 modules for SDXL): each name is split once here
    # rather than through the Weight/Module properties, which split it again on every access.
    modules: dict[str, Module] = {}
    for w in keymap(spec).weights:
        canonical = w.canonical
        component = canonical.partition(".")[0]
        if component not in TABLE_COMPONENTS or not canonical.endswith(".weight") or len(w.shape) not in (2, 4):
            continue
        if "embeddings" in canonical:  # token/position tables are not Linear layers
            continue
        ldm = None
        if component == "unet" and w.single:
            ldm = w.single[len(UNET_SINGLE_PREFIX) : -len(".weight")]
        name = canonical[: -len(".weight")]
        # Module's frozen __init__ is three object.__setattr__ calls; its fields set straight
        # into a new instance's __dict__ make the same, equal object
        module = _new_module(Module)
        module.__dict__.update(name=name, shape=w.shape, ldm_path=ldm)
        modules[name] = module

    kohya: dict[str, str] = {}
    peft: dict[str, str] = {}
    for m in modules.values():
        name = m.name
        component, _, path = name.partition(".")
        underscored = path.replace(".", "_")
        if component == "unet":
            kohya[f"{KOHYA_UNET}_{underscored}"] = name
            if m.ldm_path:
                kohya.setdefault(f"{KOHYA_UNET}_{m.ldm_path.replace('.', '_')}", name)
        else:
            for prefix in TEXT_ALIASES[component]:
                kohya[f"{prefix}_{underscored}"] = name
        folder = DIFFUSERS_FOLDERS[component]
        peft[f"{folder}.{path}"] = name
        if path.startswith("text_model."):
            peft.setdefault(f"{folder}.{path[len('text_model.') :]}", name)
    return NameTables(modules, kohya, peft)


def kohya_name_by_rule(path: str, text_prefixes: Mapping[str, str]) -> str | None:
    """The kohya lora_name of a peft module path by string rule alone (``unet.a.b`` →
    ``lora_unet_a_b``, ``text_encoder.x`` → ``lora_te_x``): sd-scripts' own rule, which needs no
    family table in this direction (kohya-ss/sd-scripts:networks/lora.py (LoRANetwork.create_modules): the
    module's dotted name with "." → "_"). None when the path's first part names no SD component."""
    folder, _, rest = path.partition(".")
    component = FOLDER_COMPONENTS.get(folder)
    if component is None or not rest:
        return None
    prefix = KOHYA_UNET if component == "unet" else text_prefixes.get(component)
    return None if prefix is None else f"{prefix}_{rest.replace('.', '_')}"


def in_source_order(written: Mapping[str, T], source_keys: Iterable[str]) -> dict[str, T]:
    """``written`` with the keys the source file held first, in its order, then the new ones in
    the writer's order: surgery on a LoRA kept by its own names gives back the file's own layout
    (``LoraFile.source_keys``, the mechanism the FLUX.1 writer uses)."""
    held = [key for key in source_keys if key in written]
    seen = set(held)
    return {key: written[key] for key in held} | {k: v for k, v in written.items() if k not in seen}
