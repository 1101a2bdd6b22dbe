"""FLUX.1 key maps: rules reproduce every real key set, detection, exact layout conversions, diffusers' converter."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import load_keyset
from helpers_flux import real_flat, write_flux_fixtures
from safetensors.torch import load_file

from loratools.errors import UnknownModelError
from loratools.families import FLUX1, keymap
from loratools.families.detect import detect
from loratools.families.keymap import single_prefixes, swap_halves
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.checkpoint import convert_checkpoint
from loratools.synthetic import TINY_FLUX, canonical_tensor

SCHNELL = replace(FLUX1, transformer=replace(FLUX1.transformer, guidance_embed=False))  # type: ignore[arg-type]
PREFIX = {c: p for c, p in zip(("te1", "vae", "transformer", "te2"), single_prefixes(FLUX1), strict=True)}


def predicted(spec, layout: str, components: tuple[str, ...], dtypes: dict[str, str], bare: bool = False) -> dict:
    """Key → (shape, dtype) of a layout as the rules predict it."""
    out = {}
    for w in keymap(spec).weights:
        name = w.layout_name(layout)
        if name is None or w.component not in components:
            continue
        if bare:
            name = name.removeprefix(PREFIX[w.component])
        out[name] = (tuple(w.layout_shape(layout)), dtypes[w.component])
    return out


BF16 = dict.fromkeys(("transformer", "te1", "te2", "vae"), "BF16")
COMFY = {"transformer": "BF16", "te1": "F16", "te2": "F16", "vae": "F32"}
CASES = {
    "dev bfl": (("flux1-dev-bfl",), lambda: predicted(FLUX1, "bfl", ("transformer",), BF16, bare=True)),
    "schnell bfl": (("flux1-dev-bfl", "schnell"), lambda: predicted(SCHNELL, "bfl", ("transformer",), BF16, True)),
    "dev comfyui_prefix": (
        ("flux1-dev-bfl", "comfyui_prefix"),
        lambda: predicted(FLUX1, "bfl", ("transformer",), BF16),
    ),
    "schnell comfyui_prefix": (
        ("flux1-dev-bfl", "schnell", "comfyui_prefix"),
        lambda: predicted(SCHNELL, "bfl", ("transformer",), BF16),
    ),
    "comfyui_checkpoint": (
        ("flux1-dev-bfl", "comfyui_checkpoint"),
        lambda: predicted(FLUX1, "bfl", ("transformer", "te1", "te2", "vae"), COMFY),
    ),
    "dev diffusers": (("flux1-dev-diffusers",), lambda: predicted(FLUX1, "diffusers", tuple(BF16), BF16)),
    "schnell diffusers": (("flux1-schnell-diffusers",), lambda: predicted(SCHNELL, "diffusers", tuple(BF16), BF16)),
    "ae": (("flux1-ae",), lambda: predicted(FLUX1, "bfl", ("vae",), {"vae": "F32"}, bare=True)),
    "ae comfyui_prefix": (("flux1-ae", "comfyui_prefix"), lambda: predicted(FLUX1, "bfl", ("vae",), {"vae": "F32"})),
    "clip-l": (("flux1-clip-l",), lambda: predicted(FLUX1, "bfl", ("te1",), {"te1": "F16"}, bare=True)),
    "t5xxl_fp16 (tied embedding)": (
        ("flux1-t5xxl-fp16",),
        lambda: predicted(replace(FLUX1, t5=replace(FLUX1.t5, tied_embedding=True)), "bfl", ("te2",), COMFY, True),  # type: ignore[arg-type]
    ),
    "t5 comfyui_prefix": (
        ("flux1-t5xxl-fp16", "no_tied_embedding", "comfyui_prefix"),
        lambda: predicted(FLUX1, "bfl", ("te2",), COMFY),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rules_reproduce_every_real_flux_key_set(case: str) -> None:
    """Names, shapes and dtypes of every real FLUX.1 file and variant, derived from the numbers."""
    (name, *variants), rules = CASES[case]
    assert rules() == real_flat(name, *variants)


@pytest.mark.parametrize("name", ["flux1-dev-diffusers", "flux1-schnell-diffusers"])
def test_hub_sharding_facts_match_the_rules(name: str) -> None:
    """The hub's shards partition exactly our diffusers keys, and total_size is their BF16 bytes."""
    data = load_keyset(name)
    spec = FLUX1 if "dev" in name else SCHNELL
    km = keymap(spec)
    for folder, shards in data["shards"].items():
        ours = {
            w.diffusers.split(".", 1)[1]: w.shape
            for w in km.weights
            if w.diffusers and w.diffusers.startswith(folder + ".")
        }
        listed = [k for keys in shards["files"].values() for k in keys]
        assert sorted(listed) == sorted(ours)
        assert shards["total_size"] == sum(2 * torch.Size(s).numel() for s in ours.values())


def _shapes(flat: dict) -> dict[str, tuple[int, ...]]:
    return {k: s for k, (s, _) in flat.items()}


@pytest.mark.parametrize(
    ("variants", "layout", "variant"),
    [
        (("flux1-dev-bfl",), "bfl", "dev"),
        (("flux1-dev-bfl", "schnell"), "bfl", "schnell"),
        (("flux1-dev-bfl", "comfyui_checkpoint"), "bfl", "dev"),
        (("flux1-dev-diffusers",), "diffusers", "dev"),
        (("flux1-schnell-diffusers",), "diffusers", "schnell"),
    ],
)
def test_detects_full_size_flux_dev_and_schnell(variants: tuple[str, ...], layout: str, variant: str) -> None:
    found = detect(_shapes(real_flat(*variants)))
    assert (found.family.name, found.layout, found.variant) == ("flux1", layout, variant)
    assert found.is_complete and not found.unknown
    assert found.family.transformer == replace(FLUX1.transformer, guidance_embed=variant == "dev")


def test_flux_diffusers_folder_is_not_sdxl_and_sdxl_is_not_flux() -> None:
    flux = detect(_shapes(real_flat("flux1-dev-diffusers")))
    assert flux.family.name == "flux1" and flux.component_counts == {
        "transformer": 1160,
        "te1": 196,
        "te2": 219,
        "vae": 244,
    }
    sdxl = {k: tuple(s) for k, (s, _) in real_flat("sdxl-diffusers").items()}
    assert detect(sdxl).family.name == "sdxl"


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 1)}, "SD3.*not supported yet"),
        (
            {
                "transformer.transformer_blocks.0.attn.add_q_proj.weight": (1, 1),
                "transformer.pos_embed.proj.weight": (1,),
            },
            "SD3.*not supported yet",
        ),
        (
            {"double_blocks.0.img_attn.qkv.weight": (3, 1), "double_stream_modulation_img.lin.weight": (1, 1)},
            "FLUX.2.*not supported yet",
        ),
    ],
)
def test_sd3_and_flux2_are_named_and_refused(keys: dict, match: str) -> None:
    with pytest.raises(UnknownModelError, match=match):
        detect(keys)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    return {**write_flux_fixtures(root), **{f"schnell {k}": v for k, v in write_flux_fixtures(root, "schnell").items()}}


@pytest.mark.parametrize(
    "name", ["bfl", "comfyui_prefix", "comfyui_checkpoint", "diffusers", "schnell bfl", "schnell diffusers"]
)
def test_tiny_fixtures_keep_every_block_count_and_are_detected(fixtures: dict[str, Path], name: str) -> None:
    with open_checkpoint(fixtures[name]) as ckpt:
        found = detect(ckpt.shapes(), ckpt.metadata)
    spec = TINY_FLUX["schnell" if name.startswith("schnell") else "dev"]
    assert found.family.name == "flux1" and found.is_complete and not found.unknown
    assert found.family.transformer == spec.transformer  # 19 double, 38 single blocks, widths read back
    assert found.variant == ("schnell" if name.startswith("schnell") else "dev")
    if name in ("comfyui_checkpoint", "diffusers"):
        assert found.family.t5 == spec.t5  # heads read from the relative-attention bias
        assert [(t.hidden, t.intermediate) for t in found.family.texts] == [(12, 24)]


@pytest.mark.parametrize("source", ["bfl", "comfyui_prefix", "comfyui_checkpoint"])
def test_single_to_diffusers_is_exact_and_back(fixtures: dict[str, Path], source: str, tmp_path: Path) -> None:
    """Fused qkv / linear1 split and re-joined bit for bit, the adaLN halves swapped both ways."""
    convert_checkpoint(fixtures[source], tmp_path / "d", layout="diffusers")
    ref = load_file(fixtures["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors")
    got = load_file(tmp_path / "d" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    convert_checkpoint(tmp_path / "d", tmp_path / "back.safetensors", layout="single")
    back, orig = load_file(tmp_path / "back.safetensors"), load_file(fixtures[source])
    strip = ("model.diffusion_model.",) if source == "bfl" else ()
    back = {next((k[len(p) :] for p in strip if k.startswith(p)), k): v for k, v in back.items()}
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)


def test_adaln_halves_are_swapped_not_renamed(fixtures: dict[str, Path]) -> None:
    bfl = load_file(fixtures["bfl"])["final_layer.adaLN_modulation.1.weight"]
    w = keymap(TINY_FLUX["dev"]).by_canonical["transformer.norm_out.linear.weight"]
    canonical = canonical_tensor(w, 0, torch.bfloat16)
    shift, scale = bfl.chunk(2)
    assert torch.equal(torch.cat([scale, shift]), canonical) and not torch.equal(bfl, canonical)
    assert torch.equal(swap_halves(swap_halves(canonical)), canonical)


def _diffusers_converter(hidden: int):  # type: ignore[no-untyped-def]
    """diffusers' own BFL → diffusers converter, with its hard-coded inner_dim = 3072 set to ``hidden``.

    The function is diffusers' code unchanged except that one literal, so that it runs on tiny widths.
    """
    import diffusers.loaders.single_file_utils as sfu

    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("source", ["bfl", "comfyui_prefix", "schnell bfl"])
def test_diffusers_converter_agrees_with_our_key_map(fixtures: dict[str, Path], source: str) -> None:
    spec = TINY_FLUX["schnell" if "schnell" in source else "dev"]
    convert = _diffusers_converter(spec.transformer.hidden)  # type: ignore[union-attr]
    theirs = convert(dict(load_file(fixtures[source])))
    folder = fixtures["schnell diffusers" if "schnell" in source else "diffusers"]
    ours = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_tiny_diffusers_folder_loads_into_the_real_model(fixtures: dict[str, Path]) -> None:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(fixtures["diffusers"] / "transformer")
    ours = load_file(fixtures["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
