"""The key grammar of every LoRA dialect, torch-free.

What a key *says* (which dialect, which module, which parameter; whether it is a textual-inversion
token) is pure string work. It lives here, apart from the readers that build tensors, so that
header-only work — ``inspect`` without ``--norms``, the format scan in :mod:`.scan` — never pays
torch's import. The readers (:mod:`.kohya`, :mod:`.peft`, :mod:`.cloneofsimo`, :mod:`.lycoris`,
:mod:`.io`) import these names from here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..families.spec import DIFFUSERS_FOLDERS

# --- kohya / LyCORIS: ``<lora_name>.<param>``, lora_name without dots (docs/FORMATS.md §1.1) ------------

# lora_transformer_: OneTrainer/SimpleTuner FLUX.1 and SD3 LoRAs in kohya naming
KOHYA_KEY = re.compile(r"^(lora_(?:unet|te\d?|transformer)_[^.]+)\.(.+)$")


def is_kohya(keys: list[str]) -> bool:
    return bool(keys) and all(KOHYA_KEY.match(k) for k in keys)


# Parameter suffixes of each LyCORIS algorithm in kohya naming (docs/FORMATS.md §4).
LORA_PARAMS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
LOHA_PARAMS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_PARAMS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL_PARAMS = {"diff", "diff_b"}
COMMON_PARAMS = {"alpha", "dora_scale"}
KNOWN_PARAMS = LORA_PARAMS | LOHA_PARAMS | LOKR_PARAMS | FULL_PARAMS | COMMON_PARAMS
# Parameters of LyCORIS algorithms loratools does not read (lycoris/modules/*.py weight_list).
UNSUPPORTED = {
    "on_input": "IA3",
    "weight": "IA3",
    "w_norm": "norm",
    "b_norm": "norm",
    "oft_blocks": "OFT/BOFT",
    "rescale": "OFT/BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "bm.weight": "GLoRA",
    "q_layer.weight": "TLoRA",
    "p_layer.weight": "TLoRA",
    "lambda_layer": "TLoRA",
}


def adapter_kind_of(name: str, params: set[str]) -> str:
    """Which adapter family a kohya parameter group is ("lora", "loha", "lokr", "full").

    Raises :class:`InputError` for unknown or unsupported parameters and for mixed groups.
    """
    unknown = params - KNOWN_PARAMS
    if unknown:
        algo = {UNSUPPORTED[k] for k in unknown if k in UNSUPPORTED}
        what = (
            f"LyCORIS {'/'.join(sorted(algo))} modules are not supported ({', '.join(sorted(unknown))})"
            if algo
            else f"unknown parameters {sorted(unknown)}"
        )
        raise InputError(f"{name}: {what}")
    kinds = [
        k
        for k, group in (("lora", LORA_PARAMS), ("loha", LOHA_PARAMS), ("lokr", LOKR_PARAMS), ("full", FULL_PARAMS))
        if params & group
    ]
    if len(kinds) != 1:
        what = "mix adapter kinds " + "+".join(kinds) if kinds else "hold no adapter factors"
        raise InputError(f"{name}: parameters {sorted(params)} {what}")
    return kinds[0]


# --- peft / diffusers (docs/FORMATS.md §2) --------------------------------------------------------------

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py (LORA_ADAPTER_METADATA_KEY)
PEFT_PARAM = re.compile(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!weight$|bias$)[^.]+(\.weight|\.bias)?$")
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_LAYER = re.compile(r"\.(lora|lora_linear_layer)\.(down|up)\.weight$")
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_SIDE = {"down": "lora_A.weight", "up": "lora_B.weight"}


def is_peft_like(keys: list[str]) -> bool:
    return any(
        ".lora_A." in k
        or ".lora_B." in k
        or "lora_magnitude_vector" in k
        or "_lora.down." in k
        or ".lora.down." in k
        or ".lora_linear_layer." in k
        for k in keys
    )


def normalize_peft_key(key: str, default_component: str | None = None) -> tuple[str, str, str]:
    """(folder-prefixed module path, param, spelling) of any peft/diffusers LoRA key."""
    spelling = "peft"
    key = key.removeprefix("base_model.model.")
    key = _ADAPTER_NAME.sub(lambda m: f".{m.group(1)}{m.group(2) or ''}", key)
    if (m := _OLD_PROCESSOR.search(key)) is not None:
        target = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        key = key[: m.start()] + f".{target}.{_SIDE[m.group(2)]}"
        spelling = "diffusers-attn-processor"
    elif (m := _OLD_TEXT.search(key)) is not None:
        key = key[: m.start()] + f".self_attn.{_TEXT_NAMES[m.group(1)]}.{_SIDE[m.group(2)]}"
        spelling = "diffusers-old"
    elif (m := _OLD_LAYER.search(key)) is not None:
        key = key[: m.start()] + f".{_SIDE[m.group(2)]}"
        spelling = "diffusers-old"
    if key.startswith(UNET_ROOTS):
        key = "unet." + key
    elif not key.startswith(tuple(f"{f}." for f in DIFFUSERS_FOLDERS.values())) and default_component is not None:
        key = f"{DIFFUSERS_FOLDERS[default_component]}.{key}"
    # any other root (FLUX.1's "transformer.", a language model's "model.") is kept as it is: the
    # module path is the adapter's name when no family map applies (formats.verdict)
    match = PEFT_PARAM.match(key)
    if match is None:
        raise InputError(f"not a LoRA key: {key!r}")
    return match.group(1), match.group(2), spelling


def pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """peft's get_pattern_key: the first pattern matching the module path as a dotted suffix."""
    if not isinstance(patterns, Mapping):
        raise InputError(f"rank_pattern/alpha_pattern is a {type(patterns).__name__}, not an object")
    for pattern, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", path)
        except re.error as exc:
            raise InputError(
                f"rank_pattern/alpha_pattern key {pattern!r} is not a regular expression ({exc})"
            ) from None
        if found:
            return value
    return None


def check_config_rank(config: Mapping[str, Any], folder: str, path: str, rank: int) -> None:
    """The config's r (rank_pattern first) must be the weights' rank: peft scales by the config's r,
    and peft and diffusers both refuse to load weights of another rank, so a mismatch has no scale."""
    claimed = pattern_value(config.get("rank_pattern") or {}, path)
    claimed = config.get("r") if claimed is None else claimed
    if claimed is None:
        return
    if isinstance(claimed, bool) or not isinstance(claimed, int | float) or claimed != rank:
        raise InputError(
            f"{folder}: the adapter config says r={claimed!r} for {path}, its weights have rank {rank}",
            hint="peft and diffusers refuse such an adapter too; fix r/rank_pattern in its config",
        )


def config_of(module: str, configs: Mapping[str, Any]) -> tuple[str, str, Any]:
    """(folder, path inside it, its LoraConfig or None) of a peft module path. A module of an
    adapter folder saved at the root (no component folder) belongs to the config keyed ""."""
    folder, _, path = module.partition(".")
    if folder in configs or "" not in configs:
        return folder, path, configs.get(folder)
    return "", module, configs[""]


def config_number(value: object, what: str) -> float:
    """A LoraConfig number (lora_alpha) as a float: a config is user data, and NaN, booleans or
    strings must not become a scale."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{what} is {value!r}, not a finite number")
    return float(value)


def configs_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per-folder LoraConfig fields from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise InputError(f"{PEFT_METADATA_KEY} metadata is not valid JSON") from None
    if not isinstance(flat, dict):
        raise InputError(f"{PEFT_METADATA_KEY} metadata is a JSON {type(flat).__name__}, not an object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        folder, _, field_name = key.partition(".")
        configs.setdefault(folder, {})[field_name] = value
    return configs


# --- FLUX.1 spellings no SD reader parses (docs/FORMATS.md §14) ----------------------------------

# XLabs ``double_blocks.0.processor.qkv_lora1.down.weight`` and SimpleTuner/LyCORIS
# ``lycoris_transformer_blocks_0_attn_to_q.diff``: neither kohya's ``lora_*_`` grammar nor any
# diffusers/peft one, so a FLUX.1 LoRA spelled so that fits no FLUX.1 spec (a tiny model, read
# without --family) is kept by its own names through formats/flux.py's verbatim reader.
FLUX_XLABS_KEY = re.compile(
    r"^((?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.\w+)\.(down|up)\.weight$"
)
LYCORIS_KEY = re.compile(r"^(lycoris_[^.]+)\.(.+)$")


def flux_own_spelling(key_or_stem: str) -> bool:
    """Whether a key (or a module stem read from one) is spelled in XLabs' or ``lycoris_``'s
    FLUX.1 dialect, which no SD verbatim reader or writer spells."""
    return bool(
        FLUX_XLABS_KEY.match(key_or_stem)
        or FLUX_XLABS_KEY.match(f"{key_or_stem}.down.weight")
        or key_or_stem.startswith("lycoris_")
    )


# --- cloneofsimo safeloras (docs/FORMATS.md §3) ----------------------------------------------------------

SAFELORAS_KEY = re.compile(r"^([^:]+):(\d+):(up|down)$")
EMBED_FLAG = "<embed>"  # lora_diffusion's metadata value for textual-inversion tensors


def is_safeloras(keys: list[str]) -> bool:
    return any(SAFELORAS_KEY.match(k) for k in keys)


# --- textual-inversion embeddings carried inside LoRA files --------------------------------------

# text_encoders_0/1: pivotal-tuning .pti files (replicate/cog-sdxl: CLIP-L and OpenCLIP bigG)
EMBEDDING_KEYS = ("string_to_param", "emb_params", "clip_l", "clip_g", "text_encoders_0", "text_encoders_1")
EMBEDDING_PREFIXES = ("string_to_param.", BUNDLE_PREFIX := "bundle_emb.")


def is_embedding_key(key: str, metadata: Mapping[str, str]) -> bool:
    """A token embedding rather than a LoRA factor: ``<token>`` names, safeloras' ``<embed>`` flag,
    A1111/kohya embedding keys (``emb_params``, A1111 ``string_to_param.*``, SDXL
    ``clip_l``/``clip_g``, pivotal-tuning ``text_encoders_0/1``) and A1111's bundled embeddings
    beside kohya keys (``bundle_emb.<token>.string_to_param.*``, ``bundle_emb.<token>.clip_l``:
    AUTOMATIC1111 extensions-builtin/Lora/networks.py (load_network, bundle_embeddings))."""
    return (
        (key.startswith("<") and key.endswith(">"))
        or metadata.get(key) == EMBED_FLAG
        or key in EMBEDDING_KEYS
        or key.startswith(EMBEDDING_PREFIXES)
    )


def token_key(key: str) -> str:
    """An A1111 bundled single-vector-set embedding under its token name (``<token>``), the name
    every other writer stores it by; other keys unchanged (:func:`bundle_key` inverts it)."""
    if key.startswith(BUNDLE_PREFIX) and key.endswith(".string_to_param.*"):
        return f"<{key[len(BUNDLE_PREFIX) : -len('.string_to_param.*')]}>"
    return key


_PTI_SIDES = {"text_encoders_0": "clip_l", "text_encoders_1": "clip_g"}


def bundle_key(key: str, token: str = "embedding") -> str:
    """The A1111 bundle name of an embedding tensor, as the kohya writer stores it beside the LoRA:
    ``bundle_emb.<token>.string_to_param.*`` (SD1/SD2), ``bundle_emb.<token>.clip_l``/``clip_g``
    (SDXL). ``token`` names a file's single embedding (``emb_params``, ``clip_l``…)."""
    if key.startswith(BUNDLE_PREFIX):
        return key
    if key.startswith("<") and key.endswith(">"):
        token, key = key[1:-1], "string_to_param.*"
    elif key in ("emb_params", "string_to_param"):
        key = "string_to_param.*"
    key = _PTI_SIDES.get(key, key)
    return f"{BUNDLE_PREFIX}{token.replace('.', '_') or 'embedding'}.{key}"
