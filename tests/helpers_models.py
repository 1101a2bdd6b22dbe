"""LoRA files of models loratools has no family map for, with real module names and real shapes.

FLUX.1 (diffusers ``FluxTransformer2DModel``: hidden 3072, ``transformer_blocks`` double-stream,
``single_transformer_blocks`` single-stream, proj_out 3072×15360; kohya/BFL ``double_blocks``),
SD3 (diffusers ``SD3Transformer2DModel`` medium: hidden 1536, ``context_embedder`` 1536×4096), a
RoBERTa peft adapter (768 wide). Small rank, so they are cheap; the raw reader here is the test's
own, independent of loratools' readers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# (module path, (out, in)) — diffusers names; every shape is the real model's
FLUX_DIFFUSERS = {
    "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
    "transformer.transformer_blocks.0.attn.add_k_proj": (3072, 3072),
    "transformer.single_transformer_blocks.12.attn.to_k": (3072, 3072),
}
FLUX_DIFFUSERS_WIDE = {**FLUX_DIFFUSERS, "transformer.single_transformer_blocks.12.proj_out": (3072, 15360)}
FLUX_KOHYA = {  # sd-scripts networks/lora_flux.py names (BFL module paths)
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_txt_attn_proj": (3072, 3072),
}
FLUX_KOHYA_WIDE = {**FLUX_KOHYA, "lora_unet_single_blocks_7_linear2": (3072, 15360)}
SD3_DIFFUSERS = {
    "transformer.transformer_blocks.0.attn.to_q": (1536, 1536),
    "transformer.transformer_blocks.3.attn.add_q_proj": (1536, 1536),
    "transformer.context_embedder": (1536, 4096),
}
ROBERTA_PEFT = {
    "base_model.model.roberta.encoder.layer.0.attention.self.query": (768, 768),
    "base_model.model.roberta.encoder.layer.0.attention.self.value": (768, 768),
}


def factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inp, generator=g) * 0.1)
        for m, (out, inp) in shapes.items()
    }


def write_kohya(path: Path, shapes: dict[str, tuple[int, int]], *, rank: int = 3, seed: int = 0) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, (up, down)) in enumerate(factors(shapes, rank, seed).items()):
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.alpha"] = torch.tensor(float(1 + i))
    save_file(tensors, str(path), {"ss_network_module": "networks.lora"})
    return path


def write_peft_file(path: Path, shapes: dict[str, tuple[int, int]], *, rank: int = 3, seed: int = 0) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, (up, down) in factors(shapes, rank, seed).items():
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    save_file(tensors, str(path), {"format": "pt"})
    return path


def write_peft_folder(folder: Path, shapes: dict[str, tuple[int, int]], config: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    write_peft_file(folder / "adapter_model.safetensors", shapes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _pattern(patterns: dict[str, object], path: str) -> object:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def raw_deltas(path: Path) -> dict[str, np.ndarray]:
    """ΔW per module name, float64, straight from the stored tensors (kohya alpha/r, or peft with
    diffusers' lora_adapter_metadata / an adapter_config.json; scale 1 without either)."""
    if path.is_dir():
        config = json.loads((path / "adapter_config.json").read_text())
        out = raw_deltas(path / "adapter_model.safetensors")
        return {m: d * _config_scale({"": config}, m, d) for m, d in out.items()}
    with safe_open(str(path), "np") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
        tensors = {k: f.get_tensor(k).astype(np.float64) for k in keys}
    out: dict[str, np.ndarray] = {}
    if any(k.endswith(".lora_down.weight") for k in keys):
        for k in keys:
            if k.endswith(".lora_down.weight"):
                name = k[: -len(".lora_down.weight")]
                down, up = tensors[k], tensors[f"{name}.lora_up.weight"]
                r = down.shape[0]
                alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else r
                out[name] = up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (alpha / r)
        return out
    configs: dict[str, dict[str, object]] = {}
    for key, value in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        folder, _, field = key.partition(".")
        configs.setdefault(folder, {})[field] = value
    for k in keys:
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            down, up = tensors[k], tensors[k.replace("lora_A", "lora_B")]
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            out[name] = delta * (_config_scale(configs, name, down) if configs else 1.0)
    return out


def _config_scale(configs: dict[str, dict[str, object]], name: str, down: np.ndarray) -> float:
    folder, _, path = name.partition(".")
    if folder not in configs:
        folder, path = "", name
    config = configs[folder]
    r = _pattern(config.get("rank_pattern") or {}, path) or config["r"]  # type: ignore[arg-type]
    alpha = _pattern(config.get("alpha_pattern") or {}, path) or config["lora_alpha"]  # type: ignore[arg-type]
    return float(alpha) / float(r)  # type: ignore[arg-type]


def best_rank(delta: np.ndarray, k: int) -> np.ndarray:
    """The optimal rank-k truncation (Eckart–Young) by numpy's SVD. A wide ΔW (a FLUX.1 3072×3072)
    of rank ≤ 8 is first projected on its column space (exact: Q spans it), so the SVD is 8 wide."""
    if min(delta.shape) > 512:
        q, _ = np.linalg.qr(delta @ np.random.default_rng(0).standard_normal((delta.shape[1], 8)))
        u, s, vt = np.linalg.svd(q.T @ delta, full_matrices=False)
        u = q @ u
    else:
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]
