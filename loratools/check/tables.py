"""What each target's LoRA loader does, as data: one table per target and version.

Every field was read in the target's own loader source (cited beside it; docs/CHECK.md §2 has
the long form). The engine (:mod:`.engine`) only interprets these tables, so a new target or a
new version of one is a new table, not new code.

Vocabulary. *Spellings* are how a file names a module (``kohya``: ``lora_unet_…``/``lora_te…``;
``peft``: ``unet.….lora_A.weight``; ``attn-processor``: ``….processor.to_q_lora.up.weight``;
``old-text``: ``text_encoder.….self_attn.to_q_lora…``; ``linear-layer``: ``….lora_linear_layer…``;
``lora-layer``: ``….lora.up.weight``; ``cloneofsimo``: ``unet:0:up`` / unnamed lists).
``maps`` says, per spelling and component, which canonical module paths the loader's key map
reaches (a regular expression over the path inside the component, ``None``: the spelling is
not read at all). Kinds are loratools' kind names (lora, locon, tucker, dora, loha, lokr, full).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

ALL = r".*"
NONE = r"(?!)"
# U-Net attention projections, diffusers spelling (``attn1.to_q`` … ``attn2.to_out.0``).
UNET_ATTENTION = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# The six Linear layers of each CLIP encoder layer (ComfyUI comfy/lora.py LORA_CLIP_MAP).
CLIP_LAYER = r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
ANY_KIND = frozenset({"lora", "locon", "tucker", "dora", "loha", "lokr", "full"})


@dataclass(frozen=True)
class Table:
    """One loader's behaviour (see the module doc for the vocabulary)."""

    target: str
    label: str  # as a verdict line starts: "ComfyUI", "diffusers 0.42"
    source: str  # repository:file (function) @commit the rules were read in
    maps: dict[str, dict[str, str | None] | None]
    # Per text component, the kohya lora_name prefixes the loader maps (None: every prefix).
    te_prefixes: dict[str, tuple[str, ...]] | None = None
    # kohya U-Net names it understands: "diffusers" (lora_unet_down_blocks_…), "sgm" (input_blocks_…)
    unet_names: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"*": ("diffusers", "sgm")})
    alpha_source: str = "tensor"  # tensor: per-module .alpha only | file: whatever loratools reads
    metadata_alphas: bool = False  # reads lora_adapter_metadata for peft-spelled files
    config_alphas: bool = False  # reads a peft folder's adapter_config.json
    orphan_alpha: str = "ignored"  # an .alpha with no factors: loaded (counted, no warning) | ignored | refuse
    up_without_down: str = "ignored"  # crash (whole load fails) | refuse | ignored
    down_without_up: str = "ignored"
    kinds: frozenset[str] = ANY_KIND
    other_kind: str = "ignored"  # what happens to a kind not in ``kinds``: ignored | refuse
    dora: str = "applied"  # applied | dropped (applied as plain LoRA) | ignored
    unmatched_limit: int | None = None  # refuses the whole file above this many unmatched keys
    lokr_rank: str = "w1_b"  # which half's inner width divides alpha when both are factored
    qkv_needs_out: tuple[str, ...] = ()  # components whose q/k/v are dropped without out_proj
    qkv_needs_out_spelling: str = "kohya"
    # diffusers' kohya alphas: per component, the modules whose alpha_pattern key never matches
    # (they get the component's most common alpha instead of their own).
    default_alpha_misses: dict[str, str] | None = None
    no_alpha_mixed_rank: str = "scale1"  # peft-spelled, no alphas, mixed ranks: scale1 | first_rank
    containers: tuple[str, ...] = ("safetensors", "pickle-dict")  # file kinds it opens
    # Spellings whose keys make the whole load fail (not just go unmatched), with the error.
    refuse_spellings: dict[str, str] = field(default_factory=dict)
    needs_prefix: bool = False  # peft-family keys without unet./text_encoder. are ignored
    # Per family, U-Net paths a diffusers-named kohya key of which the loader maps to no module.
    diffusers_name_unmapped: dict[str, str] = field(default_factory=dict)
    families: tuple[str, ...] = ("sd1", "sd2", "sdxl")
    notes: tuple[str, ...] = ()

    def regex(self, spelling: str, component: str) -> re.Pattern[str] | None:
        by_component = self.maps.get(spelling)
        if by_component is None:
            return None
        pattern = by_component.get("unet" if component == "unet" else "te", by_component.get(component))
        return None if pattern is None else re.compile(pattern)


# ComfyUI -----------------------------------------------------------------------------------------
# comfyanonymous/ComfyUI:comfy/lora.py @41444b5 (model_lora_keys_unet: lora_unet_<diffusers|LDM>,
# "<path with .to_ → .processor.to_>" with and without "unet."; model_lora_keys_clip: the six
# LORA_CLIP_MAP layers as lora_te_/lora_te1_/lora_te2_ and text_encoder(_2).text_model.…; load_lora:
# alpha only from "<x>.alpha", added to loaded_keys before any factor is looked at; unmatched keys
# logged one line each). comfy/weight_adapter/lora.py (LoRAAdapter.load: lora[B_name] with only
# lora_up present raises KeyError; spellings lora_up/_lora.up/lora_B/lora.up/lora_linear_layer;
# calculate_weight: alpha None ⇒ scale 1.0). comfy/weight_adapter/lokr.py (calculate_weight: dim =
# w1_b rank, then overwritten by w2_b's when w2 is factored; no dim ⇒ scale 1.0).
COMFYUI = Table(
    target="comfyui",
    label="ComfyUI",
    source="comfyanonymous/ComfyUI:comfy/lora.py (model_lora_keys_unet, model_lora_keys_clip, load_lora) @41444b5",
    maps={
        "kohya": {"unet": ALL, "te": CLIP_LAYER},
        # peft keys: only "<x>.lora_B.weight" for x in the key map — attention x is "….processor.to_q"
        "peft": {"unet": rf"^(?!{UNET_ATTENTION}).*", "te": CLIP_LAYER},
        "attn-processor": {"unet": UNET_ATTENTION, "te": None},
        "lora-layer": {"unet": rf"^(?!{UNET_ATTENTION}).*", "te": CLIP_LAYER},
        "linear-layer": {"unet": rf"^(?!{UNET_ATTENTION}).*", "te": CLIP_LAYER},
        "old-text": {"unet": None, "te": None},
        "cloneofsimo": None,
    },
    te_prefixes={"te1": ("lora_te", "lora_te1"), "te2": ("lora_te2",)},
    orphan_alpha="loaded",
    up_without_down="crash",
    down_without_up="ignored",
    lokr_rank="w2_b",
    containers=("safetensors", "pickle-dict"),
)

# Forge -------------------------------------------------------------------------------------------
# lllyasviel/stable-diffusion-webui-forge:backend/patcher/lora.py (load_lora_for_models): ComfyUI's
# key maps and load_lora, then "if len(lora_unmatch) > 12: print('[LORA] LoRA version mismatch');
# return model, clip" — the whole LoRA is skipped.
FORGE = replace(
    COMFYUI,
    target="forge",
    label="Forge",
    source="lllyasviel/stable-diffusion-webui-forge:backend/patcher/lora.py (load_lora_for_models)",
    unmatched_limit=12,
)

# AUTOMATIC1111 -----------------------------------------------------------------------------------
# AUTOMATIC1111/stable-diffusion-webui:extensions-builtin/Lora/networks.py (load_network: the key is
# split at its first "." — "unet.down_blocks…" becomes "unet", matched to nothing; convert_diffusers_
# name_to_compvis for lora_unet_<diffusers>, "lora_unet"→"diffusion_model" for SGM names, lora_te1_
# text_model→0_transformer_text_model; a matched module no module type accepts (an alpha alone, a
# lora_up alone) raises AssertionError and the LoRA fails to load; network_apply_weights: an OpenCLIP
# MultiheadAttention (SD2 TE, SDXL TE2) is patched only when q, k, v and out_proj are all present).
# network.py (NetworkModule.calc_scale: alpha/dim from the ".alpha" tensor, else 1.0).
A1111 = Table(
    target="a1111",
    label="A1111",
    source="AUTOMATIC1111/stable-diffusion-webui:extensions-builtin/Lora/networks.py (load_network, "
    "convert_diffusers_name_to_compvis, network_apply_weights)",
    maps={
        "kohya": {"unet": ALL, "te": r"^text_model\.encoder\.layers\.\d+\..+$"},
        "peft": None,
        "attn-processor": None,
        "lora-layer": None,
        "linear-layer": None,
        "old-text": None,
        "cloneofsimo": None,
    },
    te_prefixes={"te1": ("lora_te", "lora_te1"), "te2": ("lora_te2",)},
    orphan_alpha="refuse",
    up_without_down="refuse",
    down_without_up="refuse",
    refuse_spellings={"cloneofsimo": "key_network.split('.', 1) fails on 'unet:0:up' keys (ValueError)"},
    # network_lokr.py (NetworkModuleLokr.__init__): self.dim = w1b's rank, then w2b's when present.
    lokr_rank="w2_b",
    qkv_needs_out=("sd2:te1", "sdxl:te2"),
    # convert_diffusers_name_to_compvis: up_blocks.N.upsamplers → output_blocks.{2+3N}.{2 if N>0 else 1}
    # (the SD1 layout: SDXL's up_blocks.0 has attentions, so its upsampler is output_blocks.2.2);
    # add_embedding has no rule and "diffusion_model_add_embedding_…" names nothing.
    diffusers_name_unmapped={"sdxl": r"^(up_blocks\.0\.upsamplers\.0\.conv|add_embedding\..*)$"},
    containers=("safetensors", "pickle-dict"),
)

# InvokeAI ----------------------------------------------------------------------------------------
# invoke-ai/InvokeAI:invokeai/backend/patches/lora_conversions/sd_lora_conversion_utils.py
# (lora_model_from_sd_state_dict, _group_state: layers grouped by the key's first "." — a peft key
# "unet.down_blocks…" makes one "unet" layer); layers/utils.py (any_lora_layer_from_state_dict:
# dora_scale → DoRA, lora_up → LoRA, hada/lokr/diff/ia3/norm; anything else raises "Unsupported lora
# format", which fails the load); layers/lora_layer_base.py (scale: alpha/rank from the ".alpha"
# tensor, None ⇒ 1.0); sdxl_lora_conversion_utils.py (SGM names converted to diffusers).
INVOKEAI = Table(
    target="invokeai",
    label="InvokeAI",
    source="invoke-ai/InvokeAI:invokeai/backend/patches/lora_conversions/sd_lora_conversion_utils.py "
    "(lora_model_from_sd_state_dict), layers/utils.py (any_lora_layer_from_state_dict)",
    maps={
        "kohya": {"unet": ALL, "te": ALL},
        "peft": None,
        "attn-processor": None,
        "lora-layer": None,
        "linear-layer": None,
        "old-text": None,
        "cloneofsimo": None,
    },
    unet_names={"sdxl": ("diffusers", "sgm"), "*": ("diffusers",)},
    refuse_spellings={
        s: "grouped under its first '.' as one layer: 'Unsupported lora format' (ValueError)"
        for s in ("peft", "attn-processor", "old-text", "linear-layer", "lora-layer", "cloneofsimo")
    },
    orphan_alpha="refuse",
    up_without_down="refuse",
    down_without_up="refuse",
    other_kind="refuse",
)

# kohya sd-scripts --------------------------------------------------------------------------------
# kohya-ss/sd-scripts:networks/merge_lora.py (merge_to_sd_model), networks/sdxl_merge_lora.py,
# networks/resize_lora.py: only keys containing "lora_down" are read, with key.replace("lora_down",
# "lora_up") and "<name>.alpha" (default dim); a name not in the model's LoRA module names is skipped
# ("no module found for LoRA weight"); the U-Net is diffusers-named for SD1/SD2 (model_util converts
# the checkpoint), SGM-named for SDXL (sdxl_original_unet). LoHa/LoKr/full/dora_scale/lora_mid keys
# are never looked at.
KOHYA = Table(
    target="kohya",
    label="kohya sd-scripts",
    source="kohya-ss/sd-scripts:networks/merge_lora.py (merge_to_sd_model), networks/sdxl_merge_lora.py",
    maps={
        "kohya": {"unet": ALL, "te": ALL},
        "peft": None,
        "attn-processor": None,
        "lora-layer": None,
        "linear-layer": None,
        "old-text": None,
        "cloneofsimo": None,
    },
    te_prefixes=None,
    unet_names={"sdxl": ("sgm",), "*": ("diffusers",)},
    orphan_alpha="ignored",
    up_without_down="ignored",
    down_without_up="crash",
    kinds=frozenset({"lora", "locon"}),
    dora="ignored",
)

# diffusers ---------------------------------------------------------------------------------------
# huggingface/diffusers@v0.42.1:src/diffusers/loaders/lora_pipeline.py (lora_state_dict: every
# "dora_scale" key filtered out with a warning; kohya files → lora_conversion_utils.py
# _convert_non_diffusers_lora_to_diffusers, which raises "The following keys have not been correctly
# renamed" for any key it does not consume: hada/lokr/diff/lora_mid); loaders/peft.py
# (load_lora_adapter: keys filtered by "unet."/"text_encoder." prefix — an un-prefixed file loads
# nothing); utils/peft_utils.py (get_peft_kwargs: lora_alpha = most common network alpha per
# component, alpha_pattern keyed by names that never match U-Net attention projections (legacy
# "processor.to_k_lora" spelling) nor text self_attn (key cut to "…self_attn"), nor — transformers ≥ 5
# builds CLIPTextModel without "text_model" — any module of a CLIPTextModel; no alphas ⇒ scale 1
# since v0.40, PR #14409); utils/state_dict_utils.py (convert_state_dict_to_diffusers: the TE's old
# "to_q_lora" spelling is only recognised when some key has "to_out_lora", so a kohya TE without
# out_proj loses q/k/v). peft's scale: lora_alpha/r (peft tuners/lora/layer.py update_layer).
# Measured with diffusers 0.42.1, peft 0.21.2, transformers 5 (tests/test_check_diffusers_oracle.py).
DIFFUSERS = Table(
    target="diffusers",
    label="diffusers 0.42",
    source="huggingface/diffusers@v0.42.1:src/diffusers/loaders/lora_pipeline.py (lora_state_dict), "
    "lora_conversion_utils.py (_convert_non_diffusers_lora_to_diffusers), utils/peft_utils.py (get_peft_kwargs)",
    maps={
        "kohya": {"unet": ALL, "te": ALL},
        "peft": {"unet": ALL, "te": ALL},
        "attn-processor": {"unet": ALL, "te": ALL},
        "lora-layer": {"unet": ALL, "te": ALL},
        "linear-layer": {"unet": ALL, "te": ALL},
        "old-text": {"unet": None, "te": ALL},
        "cloneofsimo": None,
    },
    alpha_source="file",
    metadata_alphas=True,
    orphan_alpha="refuse",
    up_without_down="refuse",
    down_without_up="refuse",
    kinds=frozenset({"lora", "locon", "dora"}),
    other_kind="refuse",
    dora="dropped",
    qkv_needs_out=("*:te1", "*:te2"),
    refuse_spellings={"cloneofsimo": "'Invalid LoRA checkpoint' (keys without 'lora')"},
    default_alpha_misses={"unet": UNET_ATTENTION, "te1": ALL, "te2": r".*\.self_attn\..*"},
    needs_prefix=True,
    containers=("safetensors", "pickle-dict"),
)
# transformers 4.x still builds CLIPTextModel with "text_model": only self_attn misses there.
DIFFUSERS_TF4 = replace(
    DIFFUSERS,
    label="diffusers 0.42 (transformers 4)",
    default_alpha_misses={"unet": UNET_ATTENTION, "te1": r".*\.self_attn\..*", "te2": r".*\.self_attn\..*"},
)
# Up to v0.39 a peft-spelled file without alphas and with mixed ranks got lora_alpha = the first
# module's rank for every module: scale r_first/r_i (utils/peft_utils.py get_peft_kwargs before #14409).
DIFFUSERS_039 = replace(DIFFUSERS, label="diffusers ≤ 0.39", no_alpha_mixed_rank="first_rank")

TABLES: dict[str, Table] = {
    "comfyui": COMFYUI,
    "a1111": A1111,
    "forge": FORGE,
    "diffusers": DIFFUSERS,
    "invokeai": INVOKEAI,
    "kohya": KOHYA,
}
VERSIONS: dict[str, Table] = {
    "diffusers@0.42": DIFFUSERS,
    "diffusers@0.42+transformers4": DIFFUSERS_TF4,
    "diffusers@0.39": DIFFUSERS_039,
}
# What ``--for a1111`` means: A1111 and Forge (Forge's loader is ComfyUI's with a refusal rule).
GROUPS: dict[str, tuple[str, ...]] = {
    "a1111": ("a1111", "forge"),
    "all": ("comfyui", "a1111", "forge", "diffusers", "invokeai", "kohya"),
}
TARGET_NAMES = ("comfyui", "a1111", "forge", "diffusers", "invokeai", "kohya", "all")


def tables_for(target: str) -> list[Table]:
    """The tables ``--for TARGET`` checks against (``all``, ``a1111`` ⇒ several; ``diffusers@0.39``)."""
    from ..errors import InputError

    key = target.lower()
    if key in VERSIONS:
        return [VERSIONS[key]]
    if key in GROUPS:
        return [TABLES[t] for t in GROUPS[key]]
    if key in TABLES:
        return [TABLES[key]]
    valid = ", ".join([*TARGET_NAMES, *VERSIONS])
    raise InputError(f"unknown target {target!r}; valid targets: {valid}")
