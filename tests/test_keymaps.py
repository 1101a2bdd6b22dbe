"""Key maps: rules reproduce the real key sets, and every layout round trip is the identity."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILY_NAMES, KEYSET_FILES, keyset_shapes, load_keyset

from loratools.families import FAMILIES, keymap
from loratools.synthetic import TINY, canonical_tensor

KEYSET_CASES = [(family, index) for family in FAMILY_NAMES for index in (0, 1)]


def _predicted(family: str, layout: str) -> dict[str, tuple[int, ...]]:
    km = keymap(FAMILIES[family])
    out = {}
    for w in km.weights:
        name = w.layout_name(layout)
        if name is not None:
            out[name] = tuple(w.layout_shape(layout))
    if layout != "diffusers":
        out.update({name: shape for name, (shape, _) in km.extras.items()})
    return out


def _apply_variant(real: dict, variant: dict) -> dict:
    """Apply a keyset variant's add/remove/rename (component-prefixed for folders)."""
    real = dict(real)
    for component, names in variant.get("remove", {}).items():
        if isinstance(names, list):
            for name in names:
                real.pop(f"{component}.{name}", None)
    for component, renames in variant.get("rename", {}).items():
        for old, new in renames.items():
            real[f"{component}.{new}"] = real.pop(f"{component}.{old}")
    return real


@pytest.mark.parametrize(("family", "index"), KEYSET_CASES)
def test_rules_reproduce_real_key_set(family: str, index: int) -> None:
    """Every tensor name and shape of the real files, derived from rules, nothing hand-typed."""
    name = KEYSET_FILES[family][index]
    data = load_keyset(name)
    layout = data["layout"]
    real = {k: shape for k, (shape, _) in keyset_shapes(name).items()}
    if name == "sd21-diffusers":  # the hub folder predates diffusers' VAE attention rename
        real = _apply_variant(real, data["variants"]["current_save"])
        real["text_encoder.text_model.embeddings.position_ids"] = (1, 77)
    predicted = _predicted(family, layout)
    assert sorted(set(real) - set(predicted)) == []
    assert sorted(set(predicted) - set(real)) == []
    assert {k: predicted[k] for k in real} == real


@pytest.mark.parametrize(("family", "index"), KEYSET_CASES)
def test_every_real_key_resolves_including_legacy_names(family: str, index: int) -> None:
    """Lookup (with legacy aliases) finds a canonical home for each real key, dtype included."""
    name = KEYSET_FILES[family][index]
    data = load_keyset(name)
    km = keymap(FAMILIES[family])
    for key, (shape, dtype) in keyset_shapes(name).items():
        weights = km.lookup(data["layout"], key)
        if not weights:
            assert key in km.extras, key
            continue
        assert tuple(weights[0].layout_shape(data["layout"])) == shape, key
        if weights[0].dtype is not None:
            assert weights[0].dtype == dtype, key


def test_sd15_legacy_and_ema_variants_resolve() -> None:
    km = keymap(FAMILIES["sd1"])
    data = load_keyset("sd15-diffusers")
    variant = data["variants"]["legacy_2022"]
    for component, renames in variant["rename"].items():
        for old in renames:
            assert km.lookup("diffusers", f"{component}.{old}"), old
    ema = load_keyset("sd15-ldm")["variants"]["with_ema"]["add"]["ema"]
    assert len(ema) == 686 and all(k.startswith("model_ema.") for k in ema)


def _canonical_state(family: str) -> dict[str, torch.Tensor]:
    km = keymap(TINY[family])
    return {w.canonical: canonical_tensor(w, seed=3) for w in km.weights}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_diffusers_single_diffusers_is_identity(family: str) -> None:
    km = keymap(TINY[family])
    canonical = _canonical_state(family)
    diffusers = km.from_canonical("diffusers", canonical).tensors
    single = km.convert("diffusers", "single", diffusers)
    back = km.convert(km.spec.single_layout, "diffusers", single.tensors)
    assert back.unmapped == {}
    # Only a buffer OpenCLIP single files do not store (SD2's position_ids, an arange) may be lost.
    lost = set(diffusers) - set(back.tensors)
    assert all(km.lookup("diffusers", k)[0].optional for k in lost), lost
    assert set(back.tensors) <= set(diffusers)
    for key, tensor in back.tensors.items():
        assert torch.equal(tensor, diffusers[key]), key


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_diffusers_single_is_identity_where_diffusers_has_a_home(family: str) -> None:
    km = keymap(TINY[family])
    single = km.from_canonical("single", _canonical_state(family)).tensors
    diffusers = km.convert(km.spec.single_layout, "diffusers", single).tensors
    back = km.convert("diffusers", "single", diffusers).tensors
    lost = set(single) - set(back)
    # Only what diffusers has no place for: SD2's 24th OpenCLIP block, its projection and logit scales.
    assert all(".resblocks.23." in k or k.endswith(("text_projection", "logit_scale", "position_ids")) for k in lost), (
        lost
    )
    for key, tensor in back.items():
        assert torch.equal(tensor, single[key]), key


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fused_qkv_split_and_join_are_bit_exact(family: str) -> None:
    km = keymap(TINY[family])
    text = TINY[family].texts[-1]
    fused_key = f"{text.single_prefix}transformer.resblocks.5.attn.in_proj_weight"
    h = text.hidden
    fused = torch.randn(3 * h, h, dtype=torch.float16)
    parts = km.split("single", fused_key, fused)
    base = f"{text.component}.text_model.encoder.layers.5.self_attn"
    assert list(parts) == [f"{base}.q_proj.weight", f"{base}.k_proj.weight", f"{base}.v_proj.weight"]
    assert torch.equal(parts[f"{base}.q_proj.weight"], fused[:h])
    assert torch.equal(parts[f"{base}.k_proj.weight"], fused[h : 2 * h])
    assert torch.equal(parts[f"{base}.v_proj.weight"], fused[2 * h :])
    rejoined = km.join("single", fused_key, parts)
    assert rejoined.dtype == torch.float16 and torch.equal(rejoined, fused)
    bias_key = fused_key.replace("in_proj_weight", "in_proj_bias")
    bias = torch.randn(3 * h)
    assert torch.equal(km.join("single", bias_key, km.split("single", bias_key, bias)), bias)


def test_text_projection_is_transposed_between_layouts() -> None:
    km = keymap(TINY["sdxl"])
    projection = torch.randn(20, 20)
    single = km.split("single", "conditioner.embedders.1.model.text_projection", projection)
    assert torch.equal(single["te2.text_projection.weight"], projection.t())


def test_vae_attention_is_linear_in_diffusers_and_1x1_conv_in_ldm() -> None:
    km = keymap(TINY["sd1"])
    conv = torch.randn(32, 32, 1, 1)
    key = "first_stage_model.encoder.mid.attn_1.q.weight"
    canonical = km.split("single", key, conv)["vae.encoder.mid_block.attentions.0.to_q.weight"]
    assert canonical.shape == (32, 32)
    assert torch.equal(km.join("single", key, {"vae.encoder.mid_block.attentions.0.to_q.weight": canonical}), conv)


@pytest.mark.parametrize(
    ("family", "unet_modules", "text_modules"),
    [("sd1", 192, 72), ("sd2", 192, 144), ("sdxl", 722, 264)],
)
def test_lora_target_module_counts_match_kohya(family: str, unet_modules: int, text_modules: int) -> None:
    """kohya's default targets (docs/FORMATS.md §1.2): Transformer2D Linears and CLIP attention + MLP.

    SD2's single-file OpenCLIP has 24 blocks (144 modules); kohya's 23-layer HF encoder has 138.
    """
    km = keymap(FAMILIES[family])
    unet_targets = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    text_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    modules = {w.module for w in km.weights if w.canonical.endswith(".weight")}
    unet = [
        m
        for m in modules
        if (
            m.startswith("unet.")
            and ".attentions." in m
            and m.endswith(unet_targets)
            and not m.startswith("unet.mid_block.attentions.0.transformer_blocks.")
        )
        or (m.startswith("unet.mid_block.attentions.0") and m.endswith(unet_targets))
    ]
    text = [m for m in modules if m.startswith(("te1.", "te2.")) and m.endswith(text_targets)]
    assert len(set(unet)) == unet_modules
    assert len(text) == text_modules
