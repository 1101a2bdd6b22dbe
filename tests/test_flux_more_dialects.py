"""FLUX.1 dialects beyond the trainers' common ones, each built from the ai-toolkit BFL-named
LoRA by its tool's own renaming rule and read back to the same ΔW per canonical module:

- fal Kontext trainer: ``base_model.model.`` + BFL names, ``lora_A``/``lora_B`` (diffusers
  ``_convert_fal_kontext_lora_to_diffusers``: detected by ``base_model``, same module names);
- DiffSynth-Studio: its own FluxDiT names (``blocks.N.attn.a_to_qkv``, ``single_blocks.N.to_qkv_mlp``
  …) with peft's adapter name (``lora_A.default.weight``), no alpha (DiffSynth-Studio
  diffsynth/models/lora.py ``FluxLoRAConverter.align_to_diffsynth_format``: a plain rename of the
  BFL modules, rows kept);
- OMI (Open Model Initiative, OneTrainer's "OMI" output; InvokeAI vendors its key sets in
  invokeai/backend/model_manager/omi/vendor/convert/lora/convert_flux_lora.py): ``transformer.`` +
  BFL names with each fused part its own module (``img_attn.qkv.0|1|2``, ``linear1.0…3``),
  ``clip_l.``/``t5.`` text encoders, kohya ``lora_down``/``lora_up``/``alpha``.

The expected ΔW comes from the source tensors alone (helpers_flux.raw_canonical_deltas, which
cuts fused modules by the key map's row facts), never from loratools' readers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect, raw_canonical_deltas

from loratools.formats.flux import flux_names
from loratools.formats.io import load_lora
from loratools.io.safetensors import save_tensors
from loratools.ops.rescale import rescale
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]

# DiffSynth-Studio FluxDiT module → BFL module, inside a block (align_to_diffsynth_format's table)
DIFFSYNTH_DOUBLE = {
    "img_mod.lin": "norm1_a.linear",
    "txt_mod.lin": "norm1_b.linear",
    "img_attn.qkv": "attn.a_to_qkv",
    "txt_attn.qkv": "attn.b_to_qkv",
    "img_attn.proj": "attn.a_to_out",
    "txt_attn.proj": "attn.b_to_out",
    "img_mlp.0": "ff_a.0",
    "img_mlp.2": "ff_a.2",
    "txt_mlp.0": "ff_b.0",
    "txt_mlp.2": "ff_b.2",
}
DIFFSYNTH_SINGLE = {"modulation.lin": "norm.linear", "linear1": "to_qkv_mlp", "linear2": "proj_out"}


def _bfl_source(seed: int = 3) -> dict[str, torch.Tensor]:
    return flux_lora_dialect(SPEC, "ai-toolkit-bfl", seed=seed)


def _fal_kontext(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"base_model.model." + k.removeprefix("diffusion_model."): v for k, v in src.items()}


def _diffsynth(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in src.items():
        stem, side = key.removeprefix("diffusion_model.").rsplit(".lora_", 1)
        kind, index, child = stem.split(".", 2)
        if kind == "double_blocks":
            name = f"blocks.{index}.{DIFFSYNTH_DOUBLE[child]}"
        else:
            name = f"single_blocks.{index}.{DIFFSYNTH_SINGLE[child]}"
        out[f"{name}.lora_{side[0]}.default.weight"] = tensor
    return out


def _omi(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = flux_names(SPEC)
    out = {}
    for key in [k for k in src if k.endswith(".lora_A.weight")]:
        path = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
        down, up = src[key], src[key.replace(".lora_A.", ".lora_B.")]
        parts = names.bfl[path]
        for i, part in enumerate(parts):
            stem = f"transformer.{path}.{i}" if len(parts) > 1 else f"transformer.{path}"
            rows = torch.cat([up[a:b] for a, b in part.rows])
            rank = down.shape[0]
            out |= {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": rows,
                f"{stem}.alpha": torch.tensor(float(rank)),
            }
    return out


BUILDERS = {"fal-kontext": _fal_kontext, "diffsynth": _diffsynth, "omi": _omi}


@pytest.mark.parametrize("dialect", sorted(BUILDERS))
def test_read_to_the_source_delta(dialect: str, tmp_path: Path) -> None:
    src = _bfl_source()
    path = tmp_path / f"{dialect}.safetensors"
    save_tensors(path, BUILDERS[dialect](src), {})
    lora = load_lora(path, family=SPEC)
    assert not lora.unmatched, list(lora.unmatched.items())[:3]
    expected, _ = raw_canonical_deltas(SPEC, src, {})
    assert lora.adapters.keys() == expected.keys()
    for module, delta in expected.items():
        torch.testing.assert_close(lora.adapters[module].delta().double(), delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dialect", sorted(BUILDERS))
def test_inspect_without_a_family_says_flux1(dialect: str, tmp_path: Path) -> None:
    path = tmp_path / f"{dialect}.safetensors"
    save_tensors(path, BUILDERS[dialect](_bfl_source()), {})
    lora = load_lora(path)
    assert lora.verdict.family == "flux1", lora.verdict


@pytest.mark.parametrize("dialect", sorted(BUILDERS))
def test_rescale_keeps_the_dialect_keys_and_order(dialect: str, tmp_path: Path) -> None:
    src = BUILDERS[dialect](_bfl_source())
    path, out = tmp_path / f"{dialect}.safetensors", tmp_path / "half.safetensors"
    save_tensors(path, src, {})
    rescale(path, out, 0.5, family=SPEC)
    from safetensors.torch import load_file

    written = load_file(out)
    assert list(written) == list(src)
    before = load_lora(path, family=SPEC).adapters
    after = load_lora(out, family=SPEC).adapters
    for module, adapter in before.items():
        torch.testing.assert_close(after[module].delta(), 0.5 * adapter.delta(), rtol=1e-5, atol=1e-7)


def _comfyui_native(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's own save spelling (``diffusion_model.`` + BFL names, kohya factor names)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        stem, side = key.rsplit(".lora_", 1)
        out[f"{stem}.{'lora_down' if side.startswith('A') else 'lora_up'}.weight"] = tensor
        if side.startswith("A"):
            out[f"{stem}.alpha"] = torch.tensor(float(tensor.shape[0]))
    return out


@pytest.mark.parametrize("dialect", [*sorted(BUILDERS), "comfyui-native"])
def test_surgery_without_a_family_keeps_keys_and_scales_delta(dialect: str, tmp_path: Path) -> None:
    """No family given and tiny widths (no FLUX.1 spec fits): read by the file's own names, never
    refused (issue 13); rescale writes the same keys in the same order at half the ΔW."""
    from safetensors.torch import load_file

    build = BUILDERS.get(dialect, _comfyui_native)
    src = build(_bfl_source(seed=5))
    path, out = tmp_path / f"{dialect}.safetensors", tmp_path / "half.safetensors"
    save_tensors(path, src, {})
    rescale(path, out, 0.5)
    written = load_file(out)
    assert list(written) == list(src)
    before, after = load_lora(path), load_lora(out)
    assert before.verdict.family == "flux1"
    assert before.adapters.keys() == after.adapters.keys()
    for module, adapter in before.adapters.items():
        torch.testing.assert_close(after.adapters[module].delta(), 0.5 * adapter.delta(), rtol=1e-5, atol=1e-7)
