"""Checkpoints as lazy views: single files, pickles, diffusers folders (sharded or not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.families.detect import detect
from loratools.io.checkpoint import open_checkpoint
from loratools.ops.checkpoint import convert_checkpoint


def _all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.items())


def test_sharded_folder_reads_like_the_unsharded_one(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    source = tiny_checkpoints[("sdxl", "diffusers")]
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    unet = sharded / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet)
    names = sorted(tensors)
    halves = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / "unet" / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    unet.unlink()
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    original, resharded = _all(source), _all(sharded)
    assert original.keys() == resharded.keys()
    assert all(torch.equal(original[k], resharded[k]) for k in original)
    with open_checkpoint(sharded) as ckpt:
        assert len(ckpt.files) == 5  # two unet shards + te, te2, vae


def test_bin_fallback_and_ckpt_pickles(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = tmp_path / "binfolder"
    shutil.copytree(tiny_checkpoints[("sd1", "diffusers")], folder)
    te = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(te), folder / "text_encoder" / "pytorch_model.bin")
    te.unlink()
    with open_checkpoint(folder) as ckpt:
        assert detect(ckpt.shapes()).family.name == "sd1"
    single = load_file(tiny_checkpoints[("sd1", "single")])
    torch.save({"state_dict": single, "global_step": 1}, tmp_path / "model.ckpt")
    with open_checkpoint(tmp_path / "model.ckpt") as ckpt:
        found = detect(ckpt.shapes())
        assert found.family.name == "sd1" and found.is_complete
        assert ckpt.dropped == ["global_step"]


def test_old_sd1_text_encoder_names_without_text_model(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """Old SD1 files write cond_stage_model.transformer.encoder… (A1111 renames them the same way)."""
    tensors = load_file(tiny_checkpoints[("sd1", "single")])
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in tensors.items()
    }
    save_file(old, tmp_path / "old.safetensors")
    with open_checkpoint(tmp_path / "old.safetensors") as ckpt:
        found = detect(ckpt.shapes())
    assert found.family.name == "sd1" and found.is_complete and not found.unknown
    convert_checkpoint(tmp_path / "old.safetensors", tmp_path / "d", layout="diffusers")
    diffusers = _all(tmp_path / "d")
    assert torch.equal(
        diffusers["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"],
        tensors["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"],
    )


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_same_layout_copy_is_byte_identical(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, family: str
) -> None:
    source = tiny_checkpoints[(family, "single")]
    report = convert_checkpoint(source, tmp_path / "copy.safetensors")
    assert report.raw_copied == report.tensors_written
    assert (tmp_path / "copy.safetensors").read_bytes() == source.read_bytes()


def test_single_and_folder_of_the_same_seed_agree_through_the_key_map(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, family: str
) -> None:
    converted = tmp_path / "converted"
    convert_checkpoint(tiny_checkpoints[(family, "single")], converted, layout="diffusers")
    ours, fixture = _all(converted), _all(tiny_checkpoints[(family, "diffusers")])
    assert set(ours) <= set(fixture)
    assert set(fixture) - set(ours) <= {"text_encoder.text_model.embeddings.position_ids"}
    assert all(torch.equal(ours[k], fixture[k]) for k in ours)
    configs = json.loads((converted / "unet" / "config.json").read_text())
    assert configs["_class_name"] == "UNet2DConditionModel"
