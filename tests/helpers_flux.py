"""FLUX.1 test helpers: tiny fixtures in every layout, and the real key sets as flat tables."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import load_keyset

from loratools.synthetic import TINY_FLUX, write_checkpoint, write_single_file

# name → (writer keyword arguments); every real FLUX.1 checkpoint layout.
FLUX_LAYOUTS = {
    "bfl": {"components": ("transformer",), "bare": True},  # flux1-dev.safetensors
    "comfyui_prefix": {"components": ("transformer",)},  # model.diffusion_model.* only
    "comfyui_checkpoint": {},  # all-in-one: transformer, CLIP-L, T5, VAE
}


def write_flux_fixtures(root: Path, variant: str = "dev", dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Tiny FLUX.1 checkpoints (every real block count) in every layout, one seed: the same model."""
    spec = TINY_FLUX[variant]
    paths = {
        name: write_single_file(spec, root / f"{variant}-{name}.safetensors", dtype=dtype, **kwargs)  # type: ignore[arg-type]
        for name, kwargs in FLUX_LAYOUTS.items()
    }
    paths["diffusers"] = write_checkpoint(spec, root / f"{variant}-diffusers", "diffusers", dtype=dtype)
    return paths


def real_flat(name: str, *variants: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """A FLUX.1 key set with variants applied (remove, then rename, then add), as key → (shape, dtype).

    Single files: bare names; diffusers: ``<subfolder>.<key>``.
    """
    data = load_keyset(name)
    folder = data["container"] == "diffusers"
    tables = {c: {k: (tuple(s), d) for k, (s, d) in keys.items()} for c, keys in data["components"].items()}
    for v in variants:
        spec = data["variants"][v]
        for c, names in spec.get("remove", {}).items():
            for n in names:
                del tables[c][n]
        for c, renames in spec.get("rename", {}).items():
            tables[c] = {renames.get(k, k): s for k, s in tables[c].items()}
        for c, added in spec.get("add", {}).items():
            tables.setdefault(c, {}).update({k: (tuple(s), d) for k, (s, d) in added.items()})
    return {(f"{c}.{k}" if folder else k): v for c, keys in tables.items() for k, v in keys.items()}
