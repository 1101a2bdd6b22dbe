"""Oracles nobody here wrote: diffusers' and transformers' own models and single-file converters.

What the key maps claim, checked against third-party code (diffusers 0.42.1, transformers 5.23.0):

* models built from the REAL hub configs (shared/keysets/*-diffusers.json ``configs``) have exactly
  our diffusers-layout names and shapes — at tiny widths (real block/layer counts) and at full size,
  both on the meta device; our own configs build the same models, and our tiny diffusers folders load
  into them (``from_pretrained``) with nothing missing, nothing unexpected and every value intact;
* diffusers' single-file converters (``diffusers.loaders.single_file_utils``) turn our tiny
  single files into exactly our diffusers tensors (bit for bit), and turn what ``KeyMap.convert``
  makes of our diffusers tensors back into the same tensors — U-Net, VAE, CLIP-L, OpenCLIP-H (24
  single-file blocks, 23 in diffusers) and OpenCLIP-bigG (``text_projection`` transposed);
* the same converters, run on meta tensors with the real full-size single-file key sets, give the
  real diffusers key sets — and ``KeyMap.convert`` gives the same names and shapes;
* the config.json files we write say what the hub's say (``test_our_configs_keep_the_real_sample_sizes``
  fails: loratools writes no VAE sample_size and a U-Net sample_size of 64 for every family).

Nothing here touches the network: HF_HUB_OFFLINE is set and sockets refuse to connect.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_NAMES, KEYSET_FILES, KEYSETS, keyset_shapes, load_keyset

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from loratools.families import FAMILIES, FamilySpec, keymap  # noqa: E402
from loratools.families.configs import diffusers_configs  # noqa: E402
from loratools.families.spec import DIFFUSERS_FOLDERS  # noqa: E402
from loratools.synthetic import TINY  # noqa: E402

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(not KEYSETS.is_dir(), reason="shared/keysets not present"),
]

FOLDERS = ("unet", "text_encoder", "text_encoder_2", "vae")
FOLDER_OF = {folder: component for component, folder in DIFFUSERS_FOLDERS.items()}
# position_ids is a non-persistent buffer since transformers 4.31: real files carry it or not
# (SD1.5 single file: yes, its diffusers folder: no; SD2.1 the other way round) — docs/FORMATS.md §5.2.
POSITION_IDS = "embeddings.position_ids"
# The prefixes diffusers itself hands to convert_open_clip_checkpoint
# (single_file_utils.create_diffusers_clip_model_from_ldm).
DIFFUSERS_OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
DIFFUSERS_MODEL_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}


# -- configs --------------------------------------------------------------------------------------
def real_configs(family: str) -> dict[str, dict]:
    """The real hub config.json contents of a family (unet, text_encoder[_2], vae)."""
    configs = load_keyset(KEYSET_FILES[family][1])["configs"]
    return {folder: copy.deepcopy(configs[folder]) for folder in FOLDERS if folder in configs}


def tiny_real_configs(family: str) -> dict[str, dict]:
    """The real configs with only the widths changed to the tiny spec's (every count stays real)."""
    spec = TINY[family]
    configs = real_configs(family)
    u = spec.unet
    unet = configs["unet"]
    unet.update(
        block_out_channels=[u.channels(level) for level in range(len(u.channel_mult))],
        cross_attention_dim=u.context_dim,
        attention_head_dim=list(u.attention_heads),
        norm_num_groups=u.norm_groups,
    )
    if unet.get("addition_embed_type") == "text_time":
        # add_embedding input = pooled text_encoder_2 embedding + 6 size/crop ids × addition_time_embed_dim
        # (diffusers UNet2DConditionModel.get_aug_embed).
        pooled = spec.texts[-1].projection
        assert pooled is not None and (u.adm_in_channels - pooled) % 6 == 0
        unet.update(
            addition_time_embed_dim=(u.adm_in_channels - pooled) // 6,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    for text in spec.texts:
        configs[DIFFUSERS_FOLDERS[text.component]].update(
            hidden_size=text.hidden,
            intermediate_size=text.intermediate,
            vocab_size=text.vocab,
            num_attention_heads=text.heads,
            projection_dim=text.projection or text.hidden,
            bos_token_id=text.vocab - 2,  # the real ids (49406/49407) lie outside a tiny vocabulary
            eos_token_id=text.vocab - 1,
        )
    configs["vae"].update(block_out_channels=list(spec.vae.channels), norm_num_groups=spec.vae.norm_groups)
    return configs


def spec_of(family: str, size: str) -> FamilySpec:
    return TINY[family] if size == "tiny" else FAMILIES[family]


def configs_for(family: str, size: str, source: str) -> dict[str, dict]:
    if source == "ours":
        ours = diffusers_configs(spec_of(family, size))
        return {folder: dict(ours[folder]) for folder in FOLDERS if folder in ours}
    return tiny_real_configs(family) if size == "tiny" else real_configs(family)


def text_class(config: Mapping) -> type:
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    return CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel


def build_models(configs: Mapping[str, Mapping], device: str = "meta") -> dict[str, torch.nn.Module]:
    """diffusers / transformers modules for each folder present, built from config dicts."""
    models: dict[str, torch.nn.Module] = {}
    with torch.device(device):
        for folder, config in configs.items():
            if folder == "unet":
                models[folder] = UNet2DConditionModel.from_config(dict(config))
            elif folder == "vae":
                models[folder] = AutoencoderKL.from_config(dict(config))
            else:
                models[folder] = text_class(config)(CLIPTextConfig(**config))
    return models


def hf_text_key(key: str) -> str:
    """transformers ≥ 5 keeps CLIPTextModel weights without ``text_model.`` (docs/FORMATS.md §5.5)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def model_shapes(models: Mapping[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Folder-prefixed state-dict names (text_model. restored) → shapes."""
    out = {}
    for folder, model in models.items():
        for key, tensor in model.state_dict().items():
            key = hf_text_key(key) if folder.startswith("text_encoder") else key
            out[f"{folder}.{key}"] = tuple(tensor.shape)
    return out


def keymap_diffusers_shapes(spec: FamilySpec) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Our diffusers names → shapes, and the names of optional buffers (position_ids) apart."""
    shapes, optional = {}, set()
    for w in keymap(spec).weights:
        if w.diffusers is not None:
            shapes[w.diffusers] = tuple(w.shape)
            if w.optional:
                optional.add(w.diffusers)
    return shapes, optional


def diff_shapes(got: Mapping[str, tuple], want: Mapping[str, tuple], allowed_missing: set[str] = frozenset()) -> str:
    missing = sorted(set(want) - set(got) - allowed_missing)
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing, e.g. {missing[:5]}")
    if extra:
        lines.append(f"{len(extra)} unexpected, e.g. {extra[:5]}")
    if wrong:
        lines.append(f"{len(wrong)} shape mismatches, e.g. {[(k, got[k], want[k]) for k in wrong[:5]]}")
    return "; ".join(lines)


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    """Same names (position_ids may be on one side only) and bit-identical tensors."""
    missing = sorted(k for k in set(want) - set(got) if not k.endswith(POSITION_IDS))
    extra = sorted(k for k in set(got) - set(want) if not k.endswith(POSITION_IDS))
    assert not missing and not extra, (
        f"{what}: missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"
    )
    bad = [
        k
        for k in sorted(set(got) & set(want))
        if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape or not torch.equal(got[k], want[k])
    ]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. " + ", ".join(
        f"{k} {tuple(got[k].shape)}/{got[k].dtype} vs {tuple(want[k].shape)}/{want[k].dtype}" for k in bad[:5]
    )


# -- diffusers' single-file converters ------------------------------------------------------------
def diffusers_convert(
    family: str, folder: str, checkpoint: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping]
) -> dict[str, torch.Tensor]:
    """One diffusers folder's tensors made from a whole single-file state dict by diffusers' code."""
    checkpoint = dict(checkpoint)  # the converters index and rewrite; never hand them ours
    if folder == "unet":
        out = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(configs["unet"]))
    elif folder == "vae":
        out = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(configs["vae"]))
    elif folder == "text_encoder" and family != "sd2":
        # CLIP-L: diffusers only strips the LDM/SGM prefix (cond_stage_model.transformer. /
        # conditioner.embedders.0.transformer.).
        out = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        # OpenCLIP-H (SD2 text_encoder) and OpenCLIP-bigG (SDXL text_encoder_2): fused in_proj split,
        # renames, text_projection transposed; the model is only asked for its hidden size.
        model = build_models({folder: configs[folder]})[folder]
        out = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=DIFFUSERS_OPEN_CLIP_PREFIX[family])
    return {f"{folder}.{key}": tensor for key, tensor in out.items()}


def read_folder(path: Path, folder: str) -> dict[str, torch.Tensor]:
    """One subfolder of a diffusers folder, read with safetensors' own loader, names folder-prefixed."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted((path / folder).glob("*.safetensors")):
        out.update({f"{folder}.{key}": tensor for key, tensor in safetensors_torch.load_file(file).items()})
    assert out, f"{path / folder}: no weights"
    return out


def apply_variant(shapes: dict[str, tuple], variant: Mapping) -> dict[str, tuple]:
    """A keyset variant's remove/rename applied to folder-prefixed names."""
    shapes = dict(shapes)
    for folder, names in variant.get("remove", {}).items():
        for name in names:
            shapes.pop(f"{folder}.{name}")
    for folder, renames in variant.get("rename", {}).items():
        for old, new in renames.items():
            shapes[f"{folder}.{new}"] = shapes.pop(f"{folder}.{old}")
    return shapes


def folders_of(spec: FamilySpec) -> tuple[str, ...]:
    return ("unet", *(DIFFUSERS_FOLDERS[t.component] for t in spec.texts), "vae")


SIZES_AND_SOURCES = [("tiny", "real"), ("full", "real"), ("tiny", "ours"), ("full", "ours")]
CONVERTER_CASES = [(family, folder) for family in FAMILY_NAMES for folder in folders_of(TINY[family])]


# -- 1. models built from configs have our diffusers key set --------------------------------------
@pytest.mark.parametrize(("size", "source"), SIZES_AND_SOURCES)
def test_models_built_from_configs_have_our_diffusers_key_set(family: str, size: str, source: str) -> None:
    """UNet2DConditionModel / CLIPTextModel[WithProjection] / AutoencoderKL state dicts = our names+shapes.

    ``real``: the hub config.json files (tiny: widths set to the tiny spec's, every count real);
    ``ours``: loratools.families.configs.diffusers_configs. Built on the meta device: no memory, fast.
    """
    models = build_models(configs_for(family, size, source))
    got = model_shapes(models)
    want, optional = keymap_diffusers_shapes(spec_of(family, size))
    problems = diff_shapes(got, want, allowed_missing=optional)
    assert not problems, f"{family} {size} ({source} configs) vs our diffusers layout: {problems}"


def test_transformers_spelling_without_text_model_prefix_resolves(family: str) -> None:
    """What transformers 5 keeps in memory for CLIPTextModel (no ``text_model.``) maps to the same weights."""
    spec = TINY[family]
    km = keymap(spec)
    models = build_models({k: v for k, v in tiny_real_configs(family).items() if k.startswith("text_encoder")})
    for folder, model in models.items():
        for key, tensor in model.state_dict().items():
            for name in (f"{folder}.{key}", f"{folder}.{hf_text_key(key)}"):
                weights = km.lookup("diffusers", name)
                assert [w.canonical for w in weights] == [f"{FOLDER_OF[folder]}.{hf_text_key(key)}"], name
                assert weights[0].shape == tuple(tensor.shape), name


def test_tiny_diffusers_folder_loads_into_real_models(tiny_checkpoints: dict, family: str) -> None:
    """from_pretrained on our tiny folder: nothing missing, unexpected or mismatched; values intact."""
    path = tiny_checkpoints[(family, "diffusers")]
    for folder in folders_of(TINY[family]):
        if folder == "unet":
            cls = UNet2DConditionModel
        elif folder == "vae":
            cls = AutoencoderKL
        else:
            cls = text_class(json.loads((path / folder / "config.json").read_text()))
        model, info = cls.from_pretrained(path, subfolder=folder, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
            f"{family}/{folder}: {info}"
        )
        text = folder.startswith("text_encoder")
        state = {f"{folder}.{hf_text_key(k) if text else k}": v for k, v in model.state_dict().items()}
        assert_same_tensors(state, read_folder(path, folder), f"{family}/{folder} loaded by {cls.__name__}")


# -- 2. diffusers' single-file converters agree with KeyMap, value for value ----------------------
@pytest.mark.parametrize(("family", "folder"), CONVERTER_CASES)
def test_diffusers_converter_single_to_diffusers_matches_ours(tiny_checkpoints: dict, family: str, folder: str) -> None:
    """Our tiny single file → diffusers' converter == our tiny diffusers folder == KeyMap.convert."""
    spec = TINY[family]
    single = safetensors_torch.load_file(tiny_checkpoints[(family, "single")])
    reference = read_folder(tiny_checkpoints[(family, "diffusers")], folder)
    theirs = diffusers_convert(family, folder, single, tiny_real_configs(family))
    assert_same_tensors(theirs, reference, f"{family}/{folder}: diffusers' converter vs our diffusers folder")

    converted = keymap(spec).convert(spec.single_layout, "diffusers", single)
    ours = {k: v for k, v in converted.tensors.items() if k.startswith(folder + ".")}
    assert_same_tensors(ours, theirs, f"{family}/{folder}: KeyMap.convert vs diffusers' converter")


@pytest.mark.parametrize(("family", "folder"), CONVERTER_CASES)
def test_diffusers_converter_inverts_our_diffusers_to_single(tiny_checkpoints: dict, family: str, folder: str) -> None:
    """Our diffusers tensors → KeyMap.convert(diffusers → single) → diffusers' converter == the originals."""
    spec = TINY[family]
    reference = read_folder(tiny_checkpoints[(family, "diffusers")], folder)
    result = keymap(spec).convert("diffusers", spec.single_layout, reference)
    # only buffers the single file does not carry may stay behind (SD2: position_ids)
    assert all(k.endswith(POSITION_IDS) for k in result.unmapped), sorted(result.unmapped)[:5]
    single = {k: v.contiguous() for k, v in result.tensors.items()}
    theirs = diffusers_convert(family, folder, single, tiny_real_configs(family))
    assert_same_tensors(theirs, reference, f"{family}/{folder}: diffusers' converter of our single-file tensors")


def test_openclip_cases_are_really_exercised(tiny_checkpoints: dict) -> None:
    """The converter tests above would miss nothing: SD2 really has a 24th block diffusers drops, and
    SDXL's bigG projection is not symmetric (a missing transpose would show)."""
    sd2 = safetensors_torch.load_file(tiny_checkpoints[("sd2", "single")])
    sd2_folder = read_folder(tiny_checkpoints[("sd2", "diffusers")], "text_encoder")
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in sd2
    assert "text_encoder.text_model.encoder.layers.22.self_attn.q_proj.weight" in sd2_folder
    assert not any(".layers.23." in k for k in sd2_folder)

    sdxl = safetensors_torch.load_file(tiny_checkpoints[("sdxl", "single")])
    projection = sdxl["conditioner.embedders.1.model.text_projection"]
    assert projection.shape[0] == projection.shape[1] and not torch.equal(projection, projection.T)
    folder = read_folder(tiny_checkpoints[("sdxl", "diffusers")], "text_encoder_2")
    assert torch.equal(folder["text_encoder_2.text_projection.weight"], projection.T)
    # fused in_proj really is cat(q, k, v) by rows in the file diffusers splits
    q = folder["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    fused = sdxl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(fused[: q.shape[0]], q)


# -- 3. the converters on the full-size real key sets (meta tensors) -------------------------------
def meta_checkpoint(shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    return {
        key: torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
        for key, (shape, dtype) in shapes.items()
    }


def test_diffusers_converters_turn_real_single_key_sets_into_real_diffusers_key_sets(family: str) -> None:
    """Real full-size single-file names/shapes → diffusers' converters → the real diffusers key set;
    KeyMap.convert gives the same names and shapes, and diffusers recognises our own full-size names."""
    single_name, diffusers_name = KEYSET_FILES[family]
    checkpoint = meta_checkpoint(keyset_shapes(single_name))
    assert sfu.infer_diffusers_model_type(checkpoint) == DIFFUSERS_MODEL_TYPE[family]

    configs = real_configs(family)
    theirs: dict[str, tuple[int, ...]] = {}
    for folder in configs:
        theirs.update({k: tuple(v.shape) for k, v in diffusers_convert(family, folder, checkpoint, configs).items()})

    # the real folder as current diffusers/transformers save it (SD2.1's hub folder is a 2022 save)
    real = {k: shape for k, (shape, _) in keyset_shapes(diffusers_name).items()}
    variant = load_keyset(diffusers_name)["variants"].get("current_save")
    if variant:
        real = apply_variant(real, variant)
    drop = {k for k in (*real, *theirs) if k.endswith(POSITION_IDS)}
    problems = diff_shapes(
        {k: v for k, v in theirs.items() if k not in drop}, {k: v for k, v in real.items() if k not in drop}
    )
    assert not problems, (
        f"{family}: diffusers' converters on the real single-file key set vs real diffusers: {problems}"
    )

    spec = FAMILIES[family]
    km = keymap(spec)
    result = km.convert(spec.single_layout, "diffusers", checkpoint)
    # left behind: schedule/EMA buffers and what diffusers has no home for (SD2's 24th block and
    # text_projection, OpenCLIP logit_scale, SD1's position_ids)
    homeless = set(km.extras) | {w.canonical for w in km.weights if w.diffusers is None}
    assert set(result.unmapped) <= homeless, sorted(set(result.unmapped) - homeless)[:5]
    ours = {k: tuple(v.shape) for k, v in result.tensors.items() if k not in drop}
    problems = diff_shapes(ours, {k: v for k, v in theirs.items() if k not in drop})
    assert not problems, f"{family}: KeyMap.convert vs diffusers' converters on the real key set: {problems}"

    # a single file written with our full-size names is recognised by diffusers as the same model
    our_single = {w.single: w.layout_shape(spec.single_layout) for w in km.weights if w.single}
    our_checkpoint = {k: torch.empty(shape, device="meta") for k, shape in our_single.items()}
    assert sfu.infer_diffusers_model_type(our_checkpoint) == DIFFUSERS_MODEL_TYPE[family]
    clip_checks = {
        "sd1": (sfu.is_clip_model,),
        "sd2": (sfu.is_open_clip_model,),
        "sdxl": (sfu.is_clip_sdxl_model, sfu.is_open_clip_sdxl_model),
    }[family]
    assert all(check(our_checkpoint) for check in clip_checks)


# -- configs: what else a diffusers folder we write must say ---------------------------------------
def resolved_configs(configs: Mapping[str, Mapping]) -> dict[str, dict]:
    """Every config field as the library resolves it (defaults filled in) for each folder."""
    out = {}
    for folder, model in build_models(configs).items():
        config = dict(model.config) if folder in ("unet", "vae") else model.config.to_dict()
        out[folder] = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return out


def same_value(a: object, b: object) -> bool:
    """Equal, treating tuples as lists and a scalar as the same value at every level."""
    a = list(a) if isinstance(a, tuple) else a
    b = list(b) if isinstance(b, tuple) else b
    if isinstance(a, list) and not isinstance(b, list):
        return all(x == b for x in a)
    if isinstance(b, list) and not isinstance(a, list):
        return all(x == a for x in b)
    return a == b


# Fields that change no weight: sample sizes (checked on their own below) and SD2's text_encoder
# projection_dim (512 on the hub; a CLIPTextModel has no projection layer to size).
STRUCTURE_EXEMPT = {("unet", "sample_size"), ("vae", "sample_size")}
STRUCTURE_EXEMPT_FAMILY = {("sd2", "text_encoder", "projection_dim")}


def test_our_configs_resolve_to_the_real_configs(family: str) -> None:
    """diffusers_configs(FAMILIES[...]) says, field for field, what the hub configs say (defaults included)."""
    ours = resolved_configs(configs_for(family, "full", "ours"))
    real = resolved_configs(real_configs(family))
    assert set(ours) == set(real)
    diffs = [
        (folder, key, ours[folder].get(key), value)
        for folder in real
        for key, value in real[folder].items()
        if (folder, key) not in STRUCTURE_EXEMPT
        and (family, folder, key) not in STRUCTURE_EXEMPT_FAMILY
        and not same_value(ours[folder].get(key), value)
    ]
    assert not diffs, f"{family}: (folder, field, ours, real): {diffs}"


def test_our_configs_keep_the_real_sample_sizes(family: str) -> None:
    """unet/vae sample_size of the folders we write = the hub's = what diffusers' own single-file loader
    writes (create_unet/vae_diffusers_config_from_ldm: image size from DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP,
    U-Net sample_size = image size // 8). Pipelines default to unet.sample_size × 8 pixels; AutoencoderKL
    tiles at vae.sample_size. SD2: keys cannot tell 2.1-768-v from 2.1-base (512 px), but the hub's 2.1
    folder and diffusers' "v2" default both say 768 — and no SD2 says a 32-pixel VAE."""
    image_size = sfu.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP[DIFFUSERS_MODEL_TYPE[family]]
    real = resolved_configs(real_configs(family))
    assert (real["unet"]["sample_size"], real["vae"]["sample_size"]) == (image_size // 8, image_size)
    ours = resolved_configs(configs_for(family, "full", "ours"))
    got = {"unet": ours["unet"]["sample_size"], "vae": ours["vae"]["sample_size"]}
    want = {"unet": image_size // 8, "vae": image_size}
    assert got == want, f"{family}: sample_size ours {got}, real and diffusers' single-file loader {want}"
