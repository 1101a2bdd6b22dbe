"""A FLUX.1 LoRA as loaders see it: its keys grouped per stored module, by dialect *spelling*.

FLUX.1 loaders decide from the key spelling alone (``lora_unet_double_blocks_0_img_attn_qkv``,
``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, ``double_blocks.0.processor.
qkv_lora1.down.weight``…), so each stored module keeps the name space it is written in: a BFL path
(``double_blocks.0.img_attn.qkv``, fused q/k/v) or a diffusers path (``transformer_blocks.0.attn.to_q``),
and the canonical (diffusers) modules it feeds (``parts``). Spellings (docs/FORMATS.md §14):

- ``kohya``: ``lora_unet_<BFL path>`` and ``lora_te1_``/``lora_te2_``/``lora_te3_`` text encoders;
- ``onetrainer``: ``lora_transformer_<diffusers path>``; ``lycoris``: ``lycoris_<diffusers path>``;
- ``peft``: ``transformer.<diffusers path>.lora_A.weight`` (ai-toolkit, diffusers), ``text_encoder.…``;
- ``bfl-peft``: ``diffusion_model.<BFL path>.lora_A.weight``; ``bfl-kohya``: the same with
  ``lora_down``/``lora_up``/``alpha`` (ComfyUI's own save node);
- ``xlabs``: ``double_blocks.N.processor.qkv_lora1.down.weight``.

Built from the safetensors header alone; the names come from the family spec (formats/flux.py
``flux_names``), so a tiny FLUX.1 spec reads tiny files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..families.spec import DIFFUSERS_FOLDERS, FamilySpec
from ..formats.flux import FluxNames, flux_names
from ..formats.keys import configs_from_metadata, pattern_value
from .view import StoredModule

# Dotted parameter suffixes → the kohya vocabulary the engine speaks; the value's tag says which
# family of spellings uses it ("peft": lora_A/lora_B, "kohya": lora_down/lora_up/alpha/…).
_DOTTED = {
    "lora_A.weight": ("lora_down.weight", "peft"),
    "lora_B.weight": ("lora_up.weight", "peft"),
    "lora_B.bias": ("lora_B.bias", "peft"),
    "lora_down.weight": ("lora_down.weight", "kohya"),
    "lora_up.weight": ("lora_up.weight", "kohya"),
    "lora_mid.weight": ("lora_mid.weight", "kohya"),
    "alpha": ("alpha", "kohya"),
    "dora_scale": ("dora_scale", "kohya"),
    "diff": ("diff", "kohya"),
    "diff_b": ("diff_b", "kohya"),
}
_LYCORIS_PARAMS: tuple[str, ...] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LYCORIS_PARAMS += ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_DOTTED |= {p: (p, "kohya") for p in _LYCORIS_PARAMS}
_UNDERSCORE = re.compile(r"^(lora_unet|lora_transformer|lycoris|lora_te\d?)_([^.]+)\.(.+)$")
_XLABS = re.compile(r"^(?:diffusion_model\.)?((?:double|single)_blocks\.\d+)\.processor\.(\w+)\.(down|up)\.weight$")
_XLABS_CHILD = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv"}
_XLABS_CHILD |= {"proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}
_FOLDER_OF = {folder: component for component, folder in DIFFUSERS_FOLDERS.items()}


def _split_param(key: str) -> tuple[str, str, str] | None:
    """(stem, kohya parameter, spelling family) of a dotted key, or None."""
    for suffix, (param, style) in _DOTTED.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], param, style
    return None


def _parse(key: str, names: FluxNames) -> tuple[str, str, str, str, tuple[str, ...]] | None:
    """(spelling, stem, module as stored, parameter, canonical parts) of one key, or None."""
    m = _UNDERSCORE.match(key)
    if m is not None:
        prefix, body, param = m.groups()
        param = _DOTTED.get(param, (param, ""))[0]
        stem = f"{prefix}_{body}"
        if prefix == "lora_unet" and body in names.bfl_underscore:
            path = names.bfl_underscore[body]
            return "kohya", stem, f"transformer.{path}", param, tuple(p.module for p in names.bfl[path])
        module = names.underscore.get(body)
        if module is None:
            return None
        if prefix.startswith("lora_te"):
            return ("kohya", stem, module, param, (module,)) if not module.startswith("transformer.") else None
        if not module.startswith("transformer."):
            return None
        spelling = {"lora_unet": "kohya", "lora_transformer": "onetrainer", "lycoris": "lycoris"}[prefix]
        return spelling, stem, module, param, (module,)
    x = _XLABS.match(key)
    if x is not None and x.group(2) in _XLABS_CHILD:
        path = f"{x.group(1)}.{_XLABS_CHILD[x.group(2)]}"
        if path not in names.bfl:
            return None
        param = "lora_down.weight" if x.group(3) == "down" else "lora_up.weight"
        stem = key.rsplit(".", 2)[0]
        return "xlabs", stem, f"transformer.{path}", param, tuple(p.module for p in names.bfl[path])
    split = _split_param(key)
    if split is None:
        return None
    stem, param, style = split
    inner = stem
    for strip in ("model.diffusion_model.", "diffusion_model."):
        if inner.startswith(strip):
            inner = inner[len(strip) :]
            if inner not in names.bfl:
                return None
            spelling = "bfl-peft" if style == "peft" else "bfl-kohya"
            return spelling, stem, f"transformer.{inner}", param, tuple(p.module for p in names.bfl[inner])
    folder, _, rest = inner.partition(".")
    component = _FOLDER_OF.get(folder)
    if component is None:
        return None
    module = f"{component}.{rest}"
    return ("peft", stem, module, param, (module,)) if module in names.shapes else None


def _kind(params: set[str]) -> str:
    if any(p.startswith("hada_") for p in params):
        return "loha"
    if any(p.startswith("lokr_") for p in params):
        return "lokr"
    if "lora_down.weight" in params or "lora_up.weight" in params:
        return "dora" if "dora_scale" in params else "lora"
    return "full" if "diff" in params or "diff_b" in params else "lora"


def flux_groups(
    shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], spec: FamilySpec
) -> tuple[list[StoredModule], list[str]]:
    """The stored modules of a FLUX.1 LoRA (rank, kind, the file's own scale) and the keys in none.

    Alphas are filled in by the caller (they need the file); a module without one has the scale
    its readers give it: ``lora_adapter_metadata``'s alpha, else alpha = rank (scale 1).
    """
    names = flux_names(spec)
    groups: dict[tuple[str, str], StoredModule] = {}
    parts: dict[tuple[str, str], tuple[str, ...]] = {}
    other: list[str] = []
    for key in shapes:
        parsed = _parse(key, names)
        if parsed is None:
            other.append(key)
            continue
        spelling, stem, module, param, feeds = parsed
        group = groups.setdefault((spelling, stem), StoredModule(stem, {}, spelling, module))
        group.keys[param] = key
        parts[(spelling, stem)] = feeds
    configs = configs_from_metadata(metadata)
    for ident, g in groups.items():
        g.parts = parts[ident]
        g.kind = _kind(set(g.keys))
        down = shapes.get(g.keys.get("lora_down.weight", ""))
        if g.kind == "full":
            g.rank, g.scale = None, 1.0
            continue
        g.rank = int(down[0]) if down else None
        if g.rank:
            component, path = (g.module or ".").split(".", 1)
            config = configs.get(DIFFUSERS_FOLDERS.get(component, ""), {}) if g.spelling == "peft" else {}
            alpha = pattern_value(config.get("alpha_pattern") or {}, path) if config else None
            alpha = config.get("lora_alpha") if alpha is None else alpha
            g.scale = float(alpha) / g.rank if alpha is not None else 1.0
    return list(groups.values()), other
