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
from functools import cache

ALL = r".*"
NONE = r"(?!)"
# U-Net attention projections, diffusers spelling (``attn1.to_q`` … ``attn2.to_out.0``).
UNET_ATTENTION = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# The six Linear layers of each CLIP encoder layer (ComfyUI comfy/lora.py LORA_CLIP_MAP).
CLIP_LAYER = r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
ANY_KIND = frozenset({"lora", "locon", "tucker", "dora", "loha", "lokr", "full"})


@cache
def compiled(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, kept: the engine asks for the same few table patterns once per
    module and target (6,000 times for an SDXL LoRA), and ``re``'s own cache lookup is not free."""
    return re.compile(pattern)


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
    # The target loads no model of these families at all (a verdict, not a key-map finding).
    unsupported: str | None = None
    # Parameters the loader reads but then applies nowhere (ComfyUI's diff_b on a fused slice).
    dropped: tuple[Dropped, ...] = ()
    # Spellings whose fate the loader's source does not settle (reported as unknown, never clean).
    unknown_spellings: dict[str, str] = field(default_factory=dict)
    # Per component, why its modules are not mapped when the key map has none of them.
    unmapped_reasons: dict[str, str] = field(default_factory=dict)
    # Modules a spelling's format detector needs present, else the file is refused (InvokeAI).
    required: dict[str, tuple[str, ...]] = field(default_factory=dict)
    required_reason: str = ""
    # Groups of modules loaded together: one present without the others refuses the file.
    siblings: tuple[Siblings, ...] = ()

    def regex(self, spelling: str, component: str) -> re.Pattern[str] | None:
        by_component = self.maps.get(spelling)
        if by_component is None:
            return None
        pattern = by_component.get(component, by_component.get("unet" if component == "unet" else "te"))
        return None if pattern is None else compiled(pattern)


@dataclass(frozen=True)
class Siblings:
    """Modules a loader converts as one (InvokeAI's fused q/k/v): all present or the load fails."""

    spellings: tuple[str, ...]
    pattern: str  # regular expression with groups "base" and "member" over the module path
    members: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Dropped:
    """One parameter of mapped modules that a loader reads but applies nowhere."""

    param: str  # kohya vocabulary: diff_b, dora_scale…
    spellings: tuple[str, ...]
    path: str  # regular expression over the module's path inside its component
    short: str
    reason: str


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

# FLUX.1 ------------------------------------------------------------------------------------------
# Paths are inside the component, in the name space the file writes (flux_view.py): BFL paths
# (fused double_blocks.N.img_attn.qkv, single_blocks.N.linear1) or diffusers paths.
BFL = r"^(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(\.|$)"
DIFFUSERS_PATH = rf"^(?!{BFL[1:]}).*"
# diffusers modules that are a row slice of a fused BFL weight (or its swapped halves).
FLUX_SLICED = (
    r"^(transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)"
    r"|single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)|norm_out\.linear)$"
)
# The 13 BFL module kinds diffusers' sd-scripts converter renames (_convert_sd_scripts_to_ai_toolkit).
FLUX_KOHYA_DIFFUSERS = (
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
    r"|single_blocks\.\d+\.(linear[12]|modulation\.lin))$"
)
FLUX_SPELLINGS = ("kohya", "onetrainer", "lycoris", "peft", "bfl-peft", "bfl-kohya", "xlabs")


def _flux_maps(**given: dict[str, str | None] | None) -> dict[str, dict[str, str | None] | None]:
    """A FLUX.1 key map: every spelling not given is not read at all."""
    return {s: given.get(s.replace("-", "_")) for s in FLUX_SPELLINGS}


# comfyanonymous/ComfyUI:comfy/lora.py @41444b5 model_lora_keys_unet: every "diffusion_model.<k>"
# weight as "lora_unet_<k with _>" and as "diffusion_model.<k>" (generic); for comfy.model_base.Flux,
# comfy/utils.py flux_to_diffusers' names as "transformer.<d>", "lycoris_<d with _>" and
# "lora_transformer_<d with _>" — to_q/k/v, add_*_proj, proj_mlp map to (qkv key, (dim, offset,
# size)) tuples and norm_out.linear to (key, None, swap_scale_shift). model_lora_keys_clip: CLIP-L
# as lora_te_/lora_te1_/text_encoder.…; T5 ("t5xxl.transformer.") as lora_te2_ (OneTrainer Flux)
# and lora_te3_ when clip_l is present. load_lora: "diff_b" is patched at "{}.bias".format(to_load[x]
# [:-len(".weight")]) — for a tuple target that names no weight, and comfy/sd.py
# load_lora_for_models logs "NOT LOADED". (flux_to_diffusers was read in a stored copy of it — the
# stored comfy/utils.py, @2ba5cc8, predates Flux; the tuple targets also show in ComfyUI's
# calculate_weight offset/function handling.) comfy/lora_convert.py (convert_lora) renames XLabs keys only
# for USO files (both single_blocks.37.processor.qkv_lora and double_blocks.18.processor.qkv_lora2).
COMFYUI_FLUX = replace(
    COMFYUI,
    source="comfyanonymous/ComfyUI:comfy/lora.py (model_lora_keys_unet, model_lora_keys_clip, load_lora) @41444b5, "
    "comfy/utils.py (flux_to_diffusers), comfy/lora_convert.py (convert_lora)",
    maps=_flux_maps(
        kohya={"transformer": BFL, "te1": CLIP_LAYER, "te2": ALL},
        onetrainer={"transformer": DIFFUSERS_PATH},
        lycoris={"transformer": DIFFUSERS_PATH},
        peft={"transformer": DIFFUSERS_PATH, "te1": CLIP_LAYER, "te2": None},
        bfl_peft={"transformer": BFL},
        bfl_kohya={"transformer": BFL},
    ),
    te_prefixes={"te1": ("lora_te", "lora_te1"), "te2": ("lora_te2", "lora_te3")},
    dropped=(
        Dropped(
            "diff_b",
            ("peft", "onetrainer", "lycoris"),
            FLUX_SLICED,
            "diff_b keys ignored",
            "the module is a slice of a fused weight (flux_to_diffusers tuple): its diff_b is patched "
            "at a key naming no weight ('NOT LOADED')",
        ),
    ),
    families=("flux1",),
)

# lllyasviel/stable-diffusion-webui-forge:packages_3rdparty/comfyui_lora_collection/lora.py @5e1dcd3
# (model_lora_keys_unet: the same Flux branch as ComfyUI — "transformer.", "lycoris_",
# "lora_transformer_"; model_lora_keys_clip: T5 as lora_te3_ and lora_te2_; load_lora: the same
# diff_b code), backend/patcher/lora.py (model_lora_keys_clip adds T5 as lora_te1_/te2_/te3_); the
# "more than 12 unmatched keys" refusal as for SD (load_lora_for_models). No lora_convert: XLabs keys
# are not read.
FORGE_FLUX = replace(
    COMFYUI_FLUX,
    target="forge",
    label="Forge",
    source="lllyasviel/stable-diffusion-webui-forge:packages_3rdparty/comfyui_lora_collection/lora.py "
    "(model_lora_keys_unet, model_lora_keys_clip), backend/patcher/lora.py (model_lora_keys_clip)",
    te_prefixes={"te1": ("lora_te", "lora_te1"), "te2": ("lora_te1", "lora_te2", "lora_te3")},
    unmatched_limit=12,
)

# AUTOMATIC1111/stable-diffusion-webui:modules/sd_models_config.py (guess_model_config_from_state_dict:
# SD1/SD2/SDXL/alt-diffusion configs only; anything else gets the SD1 config): no FLUX.1 model
# loads, so no FLUX.1 LoRA applies.
A1111_FLUX = replace(
    A1111,
    source="AUTOMATIC1111/stable-diffusion-webui:modules/sd_models_config.py (guess_model_config_from_state_dict)",
    unsupported="refuses FLUX.1: A1111 loads no FLUX.1 model (its configs are SD1/SD2/SDXL only), "
    "so no FLUX.1 LoRA applies — use Forge or ComfyUI",
    families=("flux1",),
)

# huggingface/diffusers@v0.42.1:src/diffusers/loaders/lora_pipeline.py (FluxLoraLoaderMixin.
# lora_state_dict, load_lora_into_transformer: keys kept only under "transformer."/"text_encoder.",
# the transformer and CLIP-L — T5 is not a LoRA-loadable module), lora_conversion_utils.py
# (_convert_kohya_flux_lora_to_diffusers: "diffusion_model." → "lora_unet_" for lora_down files; the
# sd-scripts converter renames FLUX_KOHYA_DIFFUSERS modules and lora_te_/lora_te1_ CLIP keys, drops
# every other key with "Unsupported keys for ai-toolkit", T5 keys and diff_b first; the OneTrainer
# "mixture" converter renames only attention and top-level modules: proj_mlp/proj_out/ff/norm*
# become the block itself, which peft refuses ("Target module FluxTransformerBlock(…) is not
# supported", ValueError); _convert_xlabs_flux_lora_to_diffusers: every processor.*_lora* key).
# Checked against diffusers itself in tests/test_check_flux.py.
DIFFUSERS_FLUX = replace(
    DIFFUSERS,
    source="huggingface/diffusers@v0.42.1:src/diffusers/loaders/lora_pipeline.py (FluxLoraLoaderMixin."
    "lora_state_dict), lora_conversion_utils.py (_convert_kohya_flux_lora_to_diffusers, "
    "_convert_xlabs_flux_lora_to_diffusers)",
    maps=_flux_maps(
        kohya={"transformer": FLUX_KOHYA_DIFFUSERS, "te1": ALL, "te2": NONE},
        bfl_kohya={"transformer": FLUX_KOHYA_DIFFUSERS},
        onetrainer={
            "transformer": r"^(transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
            r"|single_transformer_blocks\.\d+\.attn\.to_[qkv]|context_embedder|norm_out\.linear|proj_out"
            r"|x_embedder|time_text_embed\..*)$",
            "te1": ALL,
        },
        peft={"transformer": ALL, "te1": ALL, "te2": None},
        xlabs={"transformer": ALL},
    ),
    refuse_spellings={
        "onetrainer": "diffusers renames this OneTrainer module to its block: peft 'Target module … is not "
        "supported' (ValueError)",
    },
    unmapped_reasons={
        "te2": "T5 is not a LoRA-loadable module of FluxPipeline (transformer and text_encoder only); "
        "the sd-scripts converter keeps lora_te_/lora_te1_ keys only",
    },
    default_alpha_misses=None,
    needs_prefix=False,
    kinds=frozenset({"lora", "locon", "dora"}),
    families=("flux1",),
)

# invoke-ai/InvokeAI:invokeai/backend/patches/lora_conversions/formats.py (flux_format_from_state_dict:
# the first format whose detector accepts the whole file; None ⇒ not a FLUX LoRA), flux_kohya_lora_
# conversion_utils.py (every key must match FLUX_KOHYA_TRANSFORMER/LAST_LAYER/CLIP (lora_te1_)/T5
# (lora_te2_) regexes), flux_onetrainer_lora_conversion_utils.py (lora_transformer_(single_)
# transformer_blocks_N_… only), flux_xlabs_lora_conversion_utils.py (double_blocks.N.processor.
# (qkv|proj)_lora[12] only), flux_aitoolkit/_bfl_peft (diffusion_model. + BFL names, lora_A/lora_B),
# flux_diffusers (transformer. + lora_A/lora_B, block 0 to_q and add_q_proj present). Alpha from the
# ".alpha" tensor, None ⇒ scale 1 (layers/lora_layer_base.py).
_INVOKE_NO_FORMAT = "a key outside every FLUX LoRA format: flux_format_from_state_dict finds none"
INVOKEAI_FLUX = replace(
    INVOKEAI,
    source="invoke-ai/InvokeAI:invokeai/backend/patches/lora_conversions/formats.py (flux_format_from_state_dict), "
    "flux_kohya_lora_conversion_utils.py, flux_onetrainer_lora_conversion_utils.py, flux_xlabs_lora_conversion_utils.py",
    maps=_flux_maps(
        kohya={
            "transformer": r"^((double|single)_blocks\.\d+\.(img_attn|img_mlp|img_mod|txt_attn|txt_mlp|txt_mod"
            r"|linear1|linear2|modulation)(\..*)?|final_layer\.linear)$",
            "te1": r"^text_model\.encoder\.layers\.\d+\.(mlp|self_attn)\..+$",
            "te2": r"^encoder\.block\.\d+\.layer\.\d+\.(DenseReluDense|SelfAttention)\..+$",
        },
        onetrainer={"transformer": r"^(single_transformer_blocks|transformer_blocks)\.\d+\..+$"},
        # flux_diffusers_lora_conversion_utils.py: norm_out.linear is never consumed ("assert
        # len(grouped_state_dict) == 0")
        peft={"transformer": r"^(?!norm_out\.linear$).*"},
        bfl_peft={"transformer": BFL},
        xlabs={"transformer": r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$"},
    ),
    required={
        "peft": (
            "transformer.single_transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.0.attn.add_q_proj",
        )
    },
    required_reason="is_state_dict_likely_in_flux_diffusers_format needs LoRA keys on these modules; "
    "without them no FLUX LoRA format matches",
    siblings=tuple(
        Siblings(
            ("peft", "onetrainer"),
            r"^(?P<base>transformer_blocks\.\d+\.attn)\.(?P<member>\w+)$",
            members,
            "lora_layers_from_flux_diffusers_grouped_state_dict: 'Missing LoRA layer' (ValueError) — a double "
            "block's q/k/v are converted together",
        )
        for members in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
    ),
    te_prefixes={"te1": ("lora_te1",), "te2": ("lora_te2",)},
    refuse_spellings={
        **{s: _INVOKE_NO_FORMAT for s in FLUX_SPELLINGS},
        "peft": "the diffusers-format converter never consumes it: 'assert len(grouped_state_dict) == 0' "
        "(AssertionError)",
    },
    unknown_spellings={
        "bfl-kohya": "flux_aitoolkit's detector accepts diffusion_model. keys without metadata; whether its "
        "converter reads lora_down/lora_up was not settled in the source",
    },
    families=("flux1",),
)

# kohya-ss/sd-scripts:networks/flux_merge_lora.py @48d368f (merge_to_flux_model: only keys with
# "lora_down"; "lora_unet_<BFL key with _>" from the FLUX.1 file's own keys, lora_te1_ from CLIP-L's,
# lora_te3_ from T5's (networks/lora_flux.py LORA_PREFIX_TEXT_ENCODER_T5); else "no module found for
# LoRA weight … Skipping"; alpha = the ".alpha" tensor, default dim). The --diffusers mode
# (merge_to_flux_model_diffusers) is not modelled here.
KOHYA_FLUX = replace(
    KOHYA,
    source="kohya-ss/sd-scripts:networks/flux_merge_lora.py (merge_to_flux_model) @48d368f",
    maps=_flux_maps(kohya={"transformer": BFL, "te1": ALL, "te2": ALL}),
    te_prefixes={"te1": ("lora_te1",), "te2": ("lora_te3",)},
    families=("flux1",),
    notes=("flux_merge_lora.py --diffusers (merge_to_flux_model_diffusers) is not modelled",),
)

# Per target, the table a FLUX.1 file is checked against (docs/FORMATS.md §14).
FAMILY_TABLES: dict[tuple[str, str], Table] = {
    ("comfyui", "flux1"): COMFYUI_FLUX,
    ("forge", "flux1"): FORGE_FLUX,
    ("a1111", "flux1"): A1111_FLUX,
    ("diffusers", "flux1"): DIFFUSERS_FLUX,
    ("invokeai", "flux1"): INVOKEAI_FLUX,
    ("kohya", "flux1"): KOHYA_FLUX,
}


def for_family(table: Table, family: str | None) -> Table:
    """The table of ``table``'s target for a family (FLUX.1 rules differ); ``table`` itself otherwise."""
    if family is None or family in table.families:
        return table
    found = FAMILY_TABLES.get((table.target, family))
    if found is None:
        return table
    if table.label != found.label and table.target in TABLES and table is not TABLES[table.target]:
        # a version table (diffusers@0.39): its FLUX.1 rules were read for the current one only
        return replace(found, label=f"{table.label} (FLUX.1 rules of {found.label})")
    return found


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
