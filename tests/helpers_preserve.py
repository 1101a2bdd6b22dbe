"""Checkpoints the way people have them (issue 14): odd spellings, unknown tensors, shards, whole
pipeline folders; and a byte-level comparison of an output with its base.

Built from the tiny synthetic checkpoints, rewritten with the ``safetensors`` library itself (so
header order and padding are the library's, as in downloaded files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratools.families.spec import FamilySpec
from loratools.ops.provenance import FOLDER_FILE as PROVENANCE_FILE
from loratools.ops.provenance import KEY as PROVENANCE_KEY
from loratools.ops.provenance import MODELSPEC_HASH
from loratools.synthetic import write_checkpoint

# Unknown to the key map: a VAE resnet shortcut where the architecture has none, and EMA bookkeeping.
VAE_EXTRA = "decoder.up_blocks.1.resnets.0.conv_shortcut"
SINGLE_VAE_EXTRA = "first_stage_model.decoder.up.2.block.0.nin_shortcut"
EMA_EXTRA = "model_ema.diffusion_modelout2weight"
LAYOUT_VARIANTS = ("single", "diffusers", "diffusers-no-text-model", "sharded")


def _rewrite(path: Path, edit: dict[str, torch.Tensor] | None = None, rename: object = None) -> None:
    tensors = load_file(str(path))
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}  # type: ignore[operator]
    tensors.update(edit or {})
    save_file(tensors, str(path), {"format": "pt"})


def tokenizer_folder(path: Path) -> None:
    """A CLIP tokenizer from a tiny local vocabulary (no network)."""
    path.mkdir(parents=True, exist_ok=True)
    words = ["a", "photo", "of", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{w}</w>": i + 2 for i, w in enumerate(words)}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def make_pipeline_files(folder: Path, spec: FamilySpec) -> None:
    """scheduler/, tokenizer(_2)/, feature_extractor/ and a model_index.json naming them."""
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    tokenizer_folder(folder / "tokenizer")
    if spec.name == "sdxl":
        tokenizer_folder(folder / "tokenizer_2")
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    (folder / "feature_extractor").mkdir(exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text('{"crop_size": 224}\n')
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def make_variant(spec: FamilySpec, root: Path, variant: str) -> Path:
    """One tiny checkpoint of ``spec`` in a layout variant of LAYOUT_VARIANTS, with unknown tensors."""
    gen = torch.Generator().manual_seed(1)
    if variant == "single":
        path = write_checkpoint(spec, root / f"{spec.name}-single.safetensors", "single")
        w = load_file(str(path))[f"{SINGLE_VAE_EXTRA.replace('nin_shortcut', 'conv1')}.weight"]
        edit = {
            f"{SINGLE_VAE_EXTRA}.weight": torch.randn(w.shape[0], w.shape[0], 1, 1, generator=gen),
            f"{SINGLE_VAE_EXTRA}.bias": torch.randn(w.shape[0], generator=gen),
            EMA_EXTRA: torch.randn(4, generator=gen),
        }
        tensors = load_file(str(path))
        tensors.update(edit)
        save_file(tensors, str(path), {"format": "pt", "modelspec.title": "tiny base", "note": "kept"})
        return path
    folder = write_checkpoint(spec, root / f"{spec.name}-{variant}", "diffusers")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    channels = load_file(str(vae))[f"{VAE_EXTRA.replace('conv_shortcut', 'conv1')}.weight"].shape[0]
    _rewrite(
        vae,
        {
            f"{VAE_EXTRA}.weight": torch.randn(channels, channels, 1, 1, generator=gen),
            f"{VAE_EXTRA}.bias": torch.randn(channels, generator=gen),
        },
    )
    _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", {EMA_EXTRA: torch.randn(4, generator=gen)})
    if variant == "diffusers-no-text-model":
        for sub in ("text_encoder", "text_encoder_2"):
            if (folder / sub).exists():
                _rewrite(folder / sub / "model.safetensors", rename=lambda k: k.removeprefix("text_model."))
    if variant == "sharded":
        unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(unet))
        names = list(tensors)
        shards = {
            "diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(unet.parent / shard), {"format": "pt"})
        unet.unlink()
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
        (unet.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    make_pipeline_files(folder, spec)
    return folder


def copy_variant(path: Path, dest: Path) -> Path:
    (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
    return dest


def _header(path: Path) -> tuple[bytes, dict[str, object]]:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        raw = fh.read(n)
    return raw, json.loads(raw)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)  # NaN-safe, -0.0-exact comparison


def files_of(path: Path) -> dict[str, Path]:
    """Relative path → file, for a file or a folder."""
    if path.is_file():
        return {"": path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


def compare(base: Path, out: Path, *, dtype: str | None = None) -> set[str]:
    """Assert ``out`` holds every file of ``base``, every tensor under its own name and order,
    non-weight files and untouched tensors byte-identical (cast only where ``dtype`` says); return
    the tensors (``file:key``) whose bytes changed."""
    before, after = files_of(base), files_of(out)
    after.pop(PROVENANCE_FILE, None)  # a merge records what went in (tests/test_provenance.py)
    assert set(before) == set(after), set(before) ^ set(after)
    changed: set[str] = set()
    for rel, a in before.items():
        b = after[rel]
        if a.suffix != ".safetensors":
            if not (dtype and rel.endswith(".index.json")):
                assert a.read_bytes() == b.read_bytes(), rel
            continue
        raw_a, head_a = _header(a)
        raw_b, head_b = _header(b)
        assert list(head_a) == list(head_b), rel  # names, spelling and order
        meta_b = dict(head_b.get("__metadata__") or {})  # type: ignore[call-overload]
        recorded = meta_b.pop(PROVENANCE_KEY, None) is not None
        meta_a = dict(head_a.get("__metadata__") or {})  # type: ignore[call-overload]
        if any(k.startswith("modelspec.") for k in meta_a):  # the hash describes the new weights
            data = b.read_bytes()[8 + struct.unpack("<Q", b.read_bytes()[:8])[0] :]
            assert meta_b.pop(MODELSPEC_HASH) == "0x" + hashlib.sha256(data).hexdigest(), rel
            meta_a.pop(MODELSPEC_HASH, None)
        assert (meta_a or None) == (meta_b or None), rel
        ta, tb = load_file(str(a)), load_file(str(b))
        for key, tensor in ta.items():
            got = tb[key]
            if dtype is not None and tensor.is_floating_point():
                assert str(got.dtype) == f"torch.{dtype}", (rel, key)
                tensor = tensor.to(got.dtype)
            else:
                assert got.dtype == tensor.dtype, (rel, key)
            if not torch.equal(_bytes(tensor), _bytes(got)):
                changed.add(f"{rel}:{key}")
        if dtype is None and not recorded and not changed & {f"{rel}:{k}" for k in ta}:
            assert raw_a == raw_b, rel
    return changed
