"""FLUX.1 LoRAs written in ComfyUI's own spelling (``diffusion_model.`` + BFL names): exact ΔW both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_flux import flux_lora_dialect

from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.families import SD1
from loratools.formats.flux import flux_names
from loratools.formats.io import load_lora, save_lora
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.synthetic import TINY_FLUX, make_lora

SPEC = TINY_FLUX["dev"]


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return f.read_all(), f.metadata


SOURCES = ("ai-toolkit", "kohya", "kohya-split-qkv", "xlabs", "ai-toolkit-bfl")


def _comfy(tmp_path: Path, dialect: str) -> tuple[Path, Path]:
    src = tmp_path / "src.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {"note": "kept"})
    return src, save_lora(load_lora(src, family=SPEC), tmp_path / "comfy.safetensors", "comfyui")


@pytest.mark.parametrize("dialect", SOURCES)
def test_comfyui_form_has_bfl_names_and_the_same_delta(dialect: str, tmp_path: Path) -> None:
    src, out = _comfy(tmp_path, dialect)
    tensors, meta = load_tensors(out)
    bfl = flux_names(SPEC).bfl
    for key in tensors:
        stem, _, param = key.rpartition(".")
        if key.endswith(".weight"):
            stem, param = stem.rpartition(".")[0], stem.rpartition(".")[2] + ".weight"
        assert stem.startswith("diffusion_model."), key
        assert stem.removeprefix("diffusion_model.") in bfl, key
        assert param in ("lora_up.weight", "lora_down.weight", "alpha"), key
    assert meta["note"] == "kept"
    before, after = load_lora(src, family=SPEC), load_lora(out, family=SPEC)
    assert after.adapters.keys() == before.adapters.keys()
    for module, adapter in before.adapters.items():
        torch.testing.assert_close(after.adapters[module].delta(), adapter.delta(), rtol=1e-6, atol=1e-7)


def test_split_qkv_is_fused_exactly_block_diagonal_up_stacked_down(tmp_path: Path) -> None:
    """Separate to_q/to_k/to_v LoRAs → one qkv LoRA of rank 3r whose ΔW is the stacked part ΔWs."""
    src, out = _comfy(tmp_path, "ai-toolkit")
    tensors, _ = load_tensors(out)
    lora = load_lora(src, family=SPEC)
    parts = flux_names(SPEC).bfl["double_blocks.0.img_attn.qkv"]
    r = lora.adapters[parts[0].module].rank  # type: ignore[attr-defined]
    up = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"].float()
    down = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"].float()
    alpha = float(tensors["diffusion_model.double_blocks.0.img_attn.qkv.alpha"])
    assert down.shape[0] == len(parts) * r
    fused = up @ down * (alpha / down.shape[0])
    expected = torch.cat([lora.adapters[p.module].delta() for p in parts], dim=0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_diffusers_to_comfyui_to_diffusers_round_trip_is_exact(tmp_path: Path) -> None:
    src, out = _comfy(tmp_path, "ai-toolkit")
    back = save_lora(load_lora(out, family=SPEC), tmp_path / "back.safetensors", "diffusers")
    before, after = load_lora(src, family=SPEC), load_lora(back, family=SPEC)
    assert after.adapters.keys() == before.adapters.keys()
    for module, adapter in before.adapters.items():
        torch.testing.assert_close(after.adapters[module].delta(), adapter.delta(), rtol=1e-6, atol=1e-7)
    assert load_tensors(back)[1]["note"] == "kept"


def test_comfyui_target_is_refused_for_sd_loras(tmp_path: Path) -> None:
    lora = make_lora(SD1, rank=2, text=False)
    with pytest.raises(InputError, match=r"--to comfyui writes FLUX\.1 LoRAs; ComfyUI reads SD LoRAs as kohya"):
        save_lora(lora, tmp_path / "x.safetensors", "comfyui")


# every dialect the helpers write, read without a family map (tiny widths match no real FLUX.1 one)
UNPLACED = (*SOURCES, "onetrainer", "lycoris-full", "kohya-te", "kohya-te3")


@pytest.mark.parametrize("dialect", UNPLACED)
def test_comfyui_target_without_a_family_map_is_refused_in_one_line_naming_why(dialect: str, tmp_path: Path) -> None:
    """A FLUX.1 LoRA known only by its module names has no ComfyUI spelling (that comes from the
    family map): the refusal says so, not that the file is an SD LoRA, and writes nothing."""
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    assert load_lora(src).family is None
    result = CliRunner().invoke(cli, ["convert", str(src), str(out), "--to", "comfyui"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # one message, however the terminal wraps it
    assert text.startswith("error: writing a ") and text.count("error:") == 1 and "Traceback" not in text
    assert "FLUX.1 LoRA in ComfyUI naming (--to comfyui) needs a FLUX.1 family map" in text
    assert "SD LoRAs" not in text and not out.exists()
