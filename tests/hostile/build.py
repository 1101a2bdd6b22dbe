"""Byte-level builders for hostile files: safetensors with any header, pickles with payloads, LoRAs.

Everything here writes small files from scratch; the good companions (tiny checkpoints, small
LoRAs) come from :mod:`loratools.synthetic` so their key sets are the real ones.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from loratools.families import FAMILIES
from loratools.formats.adapters import LoraFile
from loratools.synthetic import TINY, iter_single_file, make_lora, single_file_plan, write_checkpoint

# LoRA "scales": tiny LoRAs fit the tiny test checkpoints (merge, unmerge); full-size ones are what
# the LoRA-only commands resolve by shapes (a tiny LoRA fits no real model and is refused there).
SPECS = {"tiny": TINY["sd1"], "full": FAMILIES["sd1"]}
OTHER_FAMILY = {"tiny": TINY["sdxl"], "full": FAMILIES["sdxl"]}


def st_bytes(header: object, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors container with exactly the header given (JSON-encoded unless ``raw``)."""
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def save_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Tensors written by the safetensors library itself (no loratools validation on the way)."""
    return write(path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def pick_modules(lora: LoraFile, count: int = 4) -> LoraFile:
    """A few U-Net attention modules and two text-encoder ones: small files, unambiguous family."""
    names = list(lora.adapters)
    # attn2 to_k/to_v read the text context: 768 wide only in SD 1.x (SD 2.x 1024, SDXL 2048)
    block = "unet.down_blocks.1.attentions.0.transformer_blocks.0."
    unet = [
        n for n in names if n.startswith(block) and n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "ff.net.2"))
    ]
    unet = unet[:count]
    text = [n for n in names if n.startswith("te1.") and ".layers.0." in n][:2]
    return lora.with_adapters({n: lora.adapters[n] for n in unet + text})


def lora_file(scale: str, *, rank: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoraFile:
    """A small kohya-targeted LoRA of SD1 (tiny widths or real ones)."""
    return pick_modules(make_lora(SPECS[scale], rank=rank, seed=seed, dtype=dtype))


def lora_tensors(scale: str, fmt: str = "kohya", **kwargs: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The raw key → tensor dict (and metadata) of a small LoRA as ``fmt`` writes it, to be damaged."""
    from loratools.formats import kohya, peft

    lora = lora_file(scale, **kwargs)  # type: ignore[arg-type]
    if fmt == "kohya":
        return kohya.kohya_state_dict(lora), kohya.kohya_metadata(lora)
    return peft.peft_state_dict(lora), peft.diffusers_metadata(lora)


def checkpoint(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, layout: str = "single") -> Path:
    """A tiny SD1 checkpoint with the real key set."""
    return write_checkpoint(TINY["sd1"], path, layout, seed=seed, dtype=dtype)


# A few modules a "fine-tune" changed: extract and diff then work on three modules, not 350
TUNED = (
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.3.0.in_layers.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
)


def tuned(path: Path) -> Path:
    """The tiny SD1 checkpoint with :data:`TUNED` changed by a low-rank (and a small dense) step."""
    tensors = checkpoint_tensors()
    generator = torch.Generator().manual_seed(1)
    for key in TUNED:
        weight = tensors[key]
        step = torch.randn(weight.shape[0], 1, generator=generator) @ torch.randn(
            1, weight[0].numel(), generator=generator
        )
        tensors[key] = weight + 0.01 * step.reshape(weight.shape)
    return save_raw(path, tensors, {"format": "pt"})


def checkpoint_tensors(*, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """The key → tensor dict of a tiny SD1 single file (real key set, in memory), to be damaged."""
    spec = TINY["sd1"]
    plan = single_file_plan(spec, dtype)
    return dict(iter_single_file(spec, dtype, seed, plan))


def zip_of(members: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def torch_zip_members(obj: object) -> dict[str, bytes]:
    """The members of ``torch.save(obj)``'s zip container, to be tampered with."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}
