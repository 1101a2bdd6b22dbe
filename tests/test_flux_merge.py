"""Merging FLUX.1 LoRAs into FLUX.1 checkpoints: diffusers' own loader as the oracle, fused slices included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect, write_flux_fixtures
from safetensors.torch import load_file

from loratools.errors import LoratoolsError
from loratools.formats.io import load_lora
from loratools.io.safetensors import save_tensors
from loratools.ops.checkpoint import convert_checkpoint
from loratools.ops.merge import merge
from loratools.synthetic import TINY, TINY_FLUX, make_lora, write_checkpoint, write_single_file

SPEC = TINY_FLUX["dev"]
TRANSFORMER = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-merge")
    out = {f"{k} fp32": v for k, v in write_flux_fixtures(root, dtype=torch.float32).items()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp8", torch.float8_e4m3fn)):
        (root / name).mkdir()
        spec_kw = {"components": ("transformer",), "bare": True}
        out[f"bfl {name}"] = write_single_file(SPEC, root / name / "b.safetensors", dtype=dtype, **spec_kw)  # type: ignore[arg-type]
    return out


def _oracle(folder: Path, lora_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers: FluxTransformer2DModel + load_lora_adapter + fuse_lora (peft), in float32."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    model.load_lora_adapter({k: v.clone() for k, v in lora_sd.items()}, prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("base", ["diffusers fp32", "bfl fp32", "comfyui_checkpoint fp32"])
def test_merge_matches_diffusers_fuse_lora_including_fused_slices(
    bases: dict[str, Path], base: str, tmp_path: Path
) -> None:
    """An ai-toolkit LoRA on to_q/to_k/to_v/proj_mlp merged into split and fused (qkv, linear1) bases."""
    lora_sd = flux_lora_dialect(SPEC, "ai-toolkit", seed=3)
    lora_path = tmp_path / "l.safetensors"
    save_tensors(lora_path, lora_sd, {})
    out = tmp_path / ("m" if base.startswith("diffusers") else "m.safetensors")
    merge(bases[base], [lora_path], out)
    if not base.startswith("diffusers"):
        convert_checkpoint(out, tmp_path / "md", layout="diffusers")
        out = tmp_path / "md"
    ours = load_file(out / TRANSFORMER)
    theirs = _oracle(bases["diffusers fp32"], lora_sd)
    assert ours.keys() == theirs.keys()
    original = load_file(bases["diffusers fp32"] / TRANSFORMER)
    changed = 0
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(ours[k], original[k])
    assert changed == len(lora_sd) // 2  # every targeted weight moved, nothing else


@pytest.mark.parametrize("base", ["diffusers fp32", "bfl fp32"])
def test_kohya_fused_lora_merges_to_its_exact_delta(bases: dict[str, Path], base: str, tmp_path: Path) -> None:
    """A kohya LoRA on fused qkv/linear1 patches a diffusers-split base by row slices, and a fused base whole."""
    lora_sd = flux_lora_dialect(SPEC, "kohya-split-qkv", seed=4)
    lora_path = tmp_path / "k.safetensors"
    save_tensors(lora_path, lora_sd, {})
    out = tmp_path / ("m" if base.startswith("diffusers") else "m.safetensors")
    merge(bases[base], [lora_path], out)
    lora = load_lora(lora_path, family=SPEC)
    base_sd = load_file(bases["diffusers fp32"] / TRANSFORMER)
    if not base.startswith("diffusers"):
        convert_checkpoint(out, tmp_path / "md", layout="diffusers")
        out = tmp_path / "md"
    ours = load_file(out / TRANSFORMER)
    for module, adapter in lora.adapters.items():
        key = module.removeprefix("transformer.") + ".weight"
        torch.testing.assert_close(ours[key], base_sd[key] + adapter.delta(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
def test_low_precision_base_is_rounded_once_from_fp32(bases: dict[str, Path], dtype: str, tmp_path: Path) -> None:
    lora_path = tmp_path / "l.safetensors"
    save_tensors(lora_path, flux_lora_dialect(SPEC, "kohya", seed=5), {})
    merge(bases[f"bfl {dtype}"], [lora_path], tmp_path / "m.safetensors")
    merged, base = load_file(tmp_path / "m.safetensors"), load_file(bases[f"bfl {dtype}"])
    lora = load_lora(lora_path, family=SPEC)
    w = "double_blocks.0.img_attn.qkv.weight"
    parts = [lora.adapters[f"transformer.transformer_blocks.0.attn.to_{x}"].delta() for x in "qkv"]
    expected = (base[w].float() + torch.cat(parts)).to(base[w].dtype)
    assert merged[w].dtype == base[w].dtype and torch.equal(merged[w].float(), expected.float())


@pytest.mark.parametrize(("dtype", "strength"), [("bf16", 1.0), ("fp8", 1.0), ("fp8", 0.05), ("fp16", 1.0)])
def test_rounding_loss_is_reported_as_the_files_show_it(
    bases: dict[str, Path], dtype: str, strength: float, tmp_path: Path
) -> None:
    """bf16/fp8 merges report ‖round(W+ΔW) − (W+ΔW)‖/‖ΔW‖ per component; the files are the judge:
    the same merge written in fp32 is W+ΔW unrounded, the base file is W. fp16 reports nothing."""
    lora_path = tmp_path / "l.safetensors"
    save_tensors(lora_path, flux_lora_dialect(SPEC, "kohya", seed=5), {})
    weighted = f"{lora_path}:{strength}"
    report = merge(bases[f"bfl {dtype}"], [weighted], tmp_path / "m.safetensors")
    if dtype == "fp16":
        assert report.rounding == {} and not any("rounding" in w for w in report.warnings)
        return
    merge(bases[f"bfl {dtype}"], [weighted], tmp_path / "exact.safetensors", dtype="fp32")
    rounded, exact = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "exact.safetensors")
    base = load_file(bases[f"bfl {dtype}"])
    lost_sq = delta_sq = 0.0
    for key in rounded:
        if not torch.equal(exact[key], base[key].float()):
            lost_sq += float((rounded[key].double() - exact[key].double()).square().sum())
            delta_sq += float((exact[key].double() - base[key].double()).square().sum())
    assert set(report.rounding) == {"transformer"}
    facts = report.rounding["transformer"]
    assert facts["dtype"] == str(rounded["double_blocks.0.img_attn.qkv.weight"].dtype).removeprefix("torch.")
    assert facts["lost"] == pytest.approx((lost_sq / delta_sq) ** 0.5, rel=1e-6)
    warned = [w for w in report.warnings if w.startswith("rounding the merged transformer")]
    assert bool(warned) == (facts["lost"] > 0.05)  # type: ignore[operator]


def test_flux_lora_onto_sdxl_and_sdxl_lora_onto_flux_are_refused_by_name(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    flux_lora = tmp_path / "f.safetensors"
    save_tensors(flux_lora, flux_lora_dialect(SPEC, "kohya"), {})
    sdxl = write_checkpoint(TINY["sdxl"], tmp_path / "sdxl.safetensors", "single")
    with pytest.raises(LoratoolsError, match=r"FLUX\.1"):
        merge(sdxl, [flux_lora], tmp_path / "o.safetensors")
    with pytest.raises(LoratoolsError, match=r"SDXL|fit FLUX"):
        merge(bases["bfl fp32"], [make_lora(TINY["sdxl"], rank=1)], tmp_path / "o2.safetensors")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o2.safetensors").exists()


def test_unrecognised_flux_dialect_is_refused_never_unchanged(bases: dict[str, Path], tmp_path: Path) -> None:
    lora = tmp_path / "u.safetensors"
    save_tensors(lora, {"double_blocks.0.img_attn.qkv.weird_a": torch.zeros(2, 16)}, {})
    with pytest.raises(LoratoolsError, match=r"double_blocks\.0\.img_attn\.qkv"):
        merge(bases["bfl fp32"], [lora], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
