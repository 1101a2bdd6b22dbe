"""Family and layout detection: every fixture, the full-size real key sets, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAMILY_NAMES, KEYSET_FILES, keyset_shapes, load_keyset

from loratools.errors import UnknownModelError
from loratools.families.detect import detect
from loratools.io.checkpoint import open_checkpoint
from loratools.synthetic import TINY, single_file_plan


def test_detects_every_fixture(tiny_checkpoints: dict[tuple[str, str], Path], family: str, layout: str) -> None:
    with open_checkpoint(tiny_checkpoints[(family, layout)]) as ckpt:
        found = detect(ckpt.shapes(), ckpt.metadata)
    assert found.family.name == family
    expected_layout = TINY[family].single_layout if layout == "single" else "diffusers"
    assert found.layout == expected_layout
    assert found.is_complete and not found.unknown
    assert found.family.unet.model_channels == TINY[family].unet.model_channels
    assert found.family.unet.context_dim == TINY[family].unet.context_dim
    assert [t.hidden for t in found.family.texts] == [t.hidden for t in TINY[family].texts]


@pytest.mark.parametrize("name", [n for pair in KEYSET_FILES.values() for n in pair])
def test_detects_full_size_real_key_sets(name: str) -> None:
    data = load_keyset(name)
    shapes = {k: shape for k, (shape, _) in keyset_shapes(name).items()}
    found = detect(shapes, data.get("metadata"))
    assert found.family.name == {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[data["family"]]
    assert found.layout == data["layout"]
    assert found.is_complete and not found.unknown
    assert found.family.unet.context_dim == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[found.family.name]
    assert found.prediction == "unknown"  # weights cannot tell epsilon from v


def _shapes(family: str) -> dict[str, tuple[int, ...]]:
    return {k: info.shape for k, info in single_file_plan(TINY[family]).items()}


def test_mixed_family_is_refused() -> None:
    shapes = {k: s for k, s in _shapes("sd2").items() if not k.startswith("cond_stage_model.")}
    shapes.update({k: s for k, s in _shapes("sd1").items() if k.startswith("cond_stage_model.")})
    with pytest.raises(UnknownModelError, match="mixed model families"):
        detect(shapes)


def test_sdxl_refiner_is_named_and_refused() -> None:
    shapes = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): s
        for k, s in _shapes("sdxl").items()
        if not k.startswith("conditioner.embedders.0.")
    }
    with pytest.raises(UnknownModelError, match="refiner"):
        detect(shapes)


def test_not_a_checkpoint_lists_first_keys() -> None:
    with pytest.raises(UnknownModelError, match="lora_unet_x"):
        detect({"lora_unet_x.lora_down.weight": (4, 8)})


def test_inpainting_unet_is_named() -> None:
    shapes = _shapes("sd1")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (8, 9, 3, 3)
    found = detect(shapes)
    assert found.variant == "inpainting" and found.is_complete


def test_unet_only_file_is_partial_but_detected() -> None:
    shapes = {k: s for k, s in _shapes("sd2").items() if k.startswith("model.diffusion_model.")}
    found = detect(shapes)
    assert found.family.name == "sd2"
    assert any("partial checkpoint" in n for n in found.notes)


def test_missing_and_foreign_keys_are_reported() -> None:
    shapes = _shapes("sdxl")
    del shapes["model.diffusion_model.output_blocks.2.2.conv.weight"]
    shapes["something.else"] = (3,)
    found = detect(shapes)
    assert found.missing == ["model.diffusion_model.output_blocks.2.2.conv.weight"]
    assert found.unknown == ["something.else"]


def test_shape_mismatch_is_reported() -> None:
    shapes = _shapes("sd1")
    shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = (8, 7, 1, 1)
    found = detect(shapes)
    assert found.shape_mismatches and "input_blocks.1.1.proj_in.weight" in found.shape_mismatches[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_metadata_declared_prediction_is_reported(family: str) -> None:
    found = detect(_shapes(family), {"modelspec.prediction_type": "v"})
    assert found.prediction == "v"
