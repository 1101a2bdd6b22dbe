"""``loratools inspect`` on FLUX.1 checkpoints in every layout, and on BFL-named LoRAs that share
a checkpoint's roots (bugs: every FLUX.1 checkpoint was an internal error, KeyError 'transformer';
a LoRA on ``img_in`` was a ValueError; a BFL control LoRA was taken for a checkpoint)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_flux import flux_lora_dialect, write_flux_fixtures
from safetensors import safe_open

from loratools.classify import classify
from loratools.cli.main import cli
from loratools.formats.flux import flux_names
from loratools.formats.io import load_lora
from loratools.io.safetensors import save_tensors
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_flux_fixtures(tmp_path_factory.mktemp("flux-inspect"))


def _numel(path: Path) -> dict[str, int]:
    """Parameters per file of a checkpoint (the safetensors headers, no loratools reader)."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            out[str(f.relative_to(path)) if path.is_dir() else f.name] = sum(
                math.prod(fh.get_slice(k).get_shape())
                for k in fh.keys()  # noqa: SIM118 (a safe_open handle, not a dict)
            )
    return out


@pytest.mark.parametrize("layout", ["bfl", "comfyui_prefix", "comfyui_checkpoint", "diffusers"])
def test_every_flux_checkpoint_layout_is_inspected(fixtures: dict[str, Path], layout: str) -> None:
    path = fixtures[layout]
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["family"] == "flux1"
    total = sum(_numel(path).values())
    assert sum(c["parameters"] for c in facts["components"]) == total
    transformer = next(n for n in facts["tree"] if n["key"] == "transformer")
    expected = sum(math.prod(s) for m, s in flux_names(SPEC).shapes.items() if m.startswith("transformer."))
    # the tree counts weights; a fused qkv/linear1 is split by its parts' own shapes (mlp = 4 × q)
    assert transformer["parameters"] >= expected
    human = CliRunner().invoke(cli, ["inspect", str(path)])
    assert human.exit_code == 0 and "single transformer blocks 0–37" in human.output, human.output[-2000:]


def test_lora_on_img_in_is_read(tmp_path: Path) -> None:
    """A BFL path without a dot (img_in, txt_in) as a LoRA target (kohya's in_dims / ai-toolkit)."""
    names = flux_names(SPEC)
    o, i = names.bfl_shapes["img_in"]
    tensors = {
        "diffusion_model.img_in.lora_A.weight": torch.randn(2, i),
        "diffusion_model.img_in.lora_B.weight": torch.randn(o, 2),
    }
    path = tmp_path / "img_in.safetensors"
    save_tensors(path, tensors, {})
    lora = load_lora(path, family=SPEC)
    (adapter,) = lora.adapters.values()
    torch.testing.assert_close(
        adapter.delta(),
        tensors["diffusion_model.img_in.lora_B.weight"] @ tensors["diffusion_model.img_in.lora_A.weight"],
    )


def test_bfl_named_lora_with_norm_scales_is_a_lora_and_lists_what_it_cannot_place(tmp_path: Path) -> None:
    """BFL's control LoRAs: BFL names without a prefix, lora_A/lora_B, bias deltas, norm scales."""
    names = flux_names(SPEC)
    tensors = {k.removeprefix("diffusion_model."): v for k, v in flux_lora_dialect(SPEC, "ai-toolkit-bfl").items()}
    tensors["double_blocks.0.img_attn.qkv.lora_B.bias"] = torch.zeros(
        names.bfl_shapes["double_blocks.0.img_attn.qkv"][0]
    )
    for b in range(38):
        tensors[f"single_blocks.{b}.norm.key_norm.scale"] = torch.ones(8)
        tensors[f"single_blocks.{b}.norm.query_norm.scale"] = torch.ones(8)
    path = tmp_path / "control.safetensors"
    save_tensors(path, tensors, {})
    assert classify(path) == "lora"
    lora = load_lora(path, family=SPEC)
    assert "double_blocks.0.img_attn.qkv.lora_B.bias" in lora.unmatched
    assert sum(k.endswith("_norm.scale") for k in lora.unmatched) == 76
    assert len(lora.adapters) == 418


def test_control_lora_is_named_and_refused_for_merge(tmp_path: Path) -> None:
    """BFL's control LoRAs widen img_in (64 → 128 inputs) and replace norm scales: a merge of the LoRA
    modules alone would write a model that is neither, so it is refused by name (exit 2, no file)."""
    from loratools.synthetic import write_single_file

    names = flux_names(SPEC)
    tensors = {k.removeprefix("diffusion_model."): v for k, v in flux_lora_dialect(SPEC, "ai-toolkit-bfl").items()}
    o, i = names.bfl_shapes["img_in"]
    tensors |= {"img_in.lora_A.weight": torch.randn(2, 2 * i), "img_in.lora_B.weight": torch.randn(o, 2)}
    for b in range(38):
        tensors[f"single_blocks.{b}.norm.key_norm.scale"] = torch.ones(8)
        tensors[f"single_blocks.{b}.norm.query_norm.scale"] = torch.ones(8)
    path = tmp_path / "canny.safetensors"
    save_tensors(path, tensors, {})
    lora = load_lora(path, family=SPEC)
    assert any("control LoRA" in w for w in lora.warnings)
    base = write_single_file(
        SPEC, tmp_path / "base.safetensors", dtype=torch.float32, components=("transformer",), bare=True
    )
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(base), str(path), "-o", str(out)])
    assert result.exit_code == 2 and "control LoRA" in result.output and not out.exists(), result.output
