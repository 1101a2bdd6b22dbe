"""FLUX.1 LoRA dialects: each read to canonical modules with the exact ΔW, written back exactly, merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect

from loratools.families import keymap
from loratools.formats.adapters import Full
from loratools.formats.flux import FORMAT_KOHYA, flux_names
from loratools.formats.io import load_lora, save_lora
from loratools.io.safetensors import save_tensors
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]
BFL_DIALECTS = ("kohya", "kohya-split-qkv", "ai-toolkit-bfl", "xlabs")
CANONICAL_DIALECTS = ("ai-toolkit", "onetrainer", "lycoris-full", "kohya-te", "kohya-te3")


def truth(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per file module computed straight from the file's factors (scale alpha/rank, or 1)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix in (
            "lora_down.weight",
            "lora_up.weight",
            "lora_A.weight",
            "lora_B.weight",
            "down.weight",
            "up.weight",
            "alpha",
            "diff_b",
            "diff",
        ):
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[
                    suffix.replace("lora_A", "lora_down")
                    .replace("lora_B", "lora_up")
                    .replace("down.weight", "lora_down.weight")
                    .replace("up.weight", "lora_up.weight")
                    .replace("lora_lora_", "lora_")
                ] = t
                break
    out = {}
    for name, g in groups.items():
        if "diff" in g:
            out[name] = g["diff"]
            continue
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        scale = float(g["alpha"]) / down.shape[0] if "alpha" in g else 1.0
        out[name] = up @ down * scale
    return out


def _bfl_path(name: str) -> str:
    names = flux_names(SPEC)
    name = name.removeprefix("diffusion_model.")
    if name.startswith("lora_unet_"):
        return names.bfl_underscore[name.removeprefix("lora_unet_")]
    if ".processor." in name:
        block, xl = name.split(".processor.")
        child = {
            "qkv_lora1": "img_attn.qkv",
            "proj_lora1": "img_attn.proj",
            "qkv_lora2": "txt_attn.qkv",
            "proj_lora2": "txt_attn.proj",
        }[xl]
        return f"{block}.{child}"
    return name


@pytest.mark.parametrize("dialect", BFL_DIALECTS)
def test_bfl_named_dialects_read_into_exact_canonical_parts(dialect: str, tmp_path: Path) -> None:
    """A LoRA on fused qkv / linear1 splits into to_q/to_k/to_v(/proj_mlp) whose ΔW re-join bit-close."""
    tensors = flux_lora_dialect(SPEC, dialect)
    save_tensors(tmp_path / "l.safetensors", tensors, {})
    lora = load_lora(tmp_path / "l.safetensors", family=SPEC)
    assert lora.family.name == "flux1" and not lora.unmatched
    km, names = keymap(SPEC), flux_names(SPEC)
    prefix = SPEC.transformer.single_prefix  # type: ignore[union-attr]
    expected = {_bfl_path(n): d for n, d in truth(tensors).items()}
    covered = {m for p in expected for m in (part.module for part in names.bfl[p])}
    assert set(lora.adapters) == covered
    for path, delta in expected.items():
        parts = {f"{p.module}.weight": lora.adapters[p.module].delta() for p in names.bfl[path]}
        joined = km.join("bfl", f"{prefix}{path}.weight", parts)
        torch.testing.assert_close(joined, delta, rtol=1e-6, atol=1e-7)
    if dialect == "kohya-split-qkv":  # block-diagonal up read as rank-r parts, not rank 3r
        assert lora.adapters["transformer.transformer_blocks.0.attn.to_q"].rank == 2


@pytest.mark.parametrize("dialect", CANONICAL_DIALECTS)
def test_diffusers_named_dialects_read_exactly(dialect: str, tmp_path: Path) -> None:
    tensors = flux_lora_dialect(SPEC, dialect)
    save_tensors(tmp_path / "l.safetensors", tensors, {})
    lora = load_lora(tmp_path / "l.safetensors", family=SPEC)
    assert not lora.unmatched
    names = flux_names(SPEC)
    expected = truth(tensors)
    assert len(lora.adapters) == len(expected)
    for name, delta in expected.items():
        body = name.removeprefix("transformer.")
        for p in ("lora_transformer_", "lycoris_", "lora_te1_", "lora_te2_", "lora_te3_"):
            body = body.removeprefix(p)
        module = names.underscore.get(body) or f"transformer.{body}"
        adapter = lora.adapters[module]
        torch.testing.assert_close(adapter.delta(), delta, rtol=1e-6, atol=1e-7)
        if isinstance(adapter, Full) and "diff_b" in str(tensors.keys()):
            assert adapter.diff_b is not None
    if dialect.startswith("kohya-te"):  # T5 told from CLIP-L by its module names, under either prefix
        assert lora.components() == {"te1": 72, "te2": 168}  # 12 × 6 CLIP, 24 × 7 T5 Linears


@pytest.mark.parametrize("dialect", ["kohya", "kohya-split-qkv", "ai-toolkit", "xlabs"])
def test_written_kohya_and_diffusers_forms_convert_to_each_other_exactly(dialect: str, tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    lora = load_lora(src, family=SPEC)
    k = save_lora(lora, tmp_path / "k.safetensors", "kohya")
    from_k = load_lora(k, family=SPEC)
    assert from_k.source_format == FORMAT_KOHYA and from_k.adapters.keys() == lora.adapters.keys()
    for m, a in lora.adapters.items():
        torch.testing.assert_close(from_k.adapters[m].delta(), a.delta(), rtol=0, atol=0)
    k2 = save_lora(from_k, tmp_path / "k2.safetensors", "kohya")
    assert k.read_bytes() == k2.read_bytes()  # kohya → canonical → kohya is the identity
    if dialect in ("ai-toolkit", "xlabs"):  # scale 1: the diffusers form is exact too
        d = save_lora(from_k, tmp_path / "d.safetensors", "diffusers")
        from_d = load_lora(d, family=SPEC)
        for m, a in lora.adapters.items():
            torch.testing.assert_close(from_d.adapters[m].delta(), a.delta(), rtol=0, atol=0)
