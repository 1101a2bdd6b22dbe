"""Synthetic checkpoints with the real key sets: tiny ones for tests and the demo, full-size for bench.

A synthetic checkpoint is a family spec (real block and layer counts; the widths of your choice)
written out with seeded random weights, tensor by tensor through the streaming writer, so even a
7 GB SDXL file never sits in memory. Every canonical tensor's values depend only on its canonical
name and the seed: a single file and a diffusers folder made with the same seed hold the same model,
which is what lets tests compare layouts tensor for tensor.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .families import FAMILIES, FamilySpec, keymap
from .families.configs import diffusers_configs
from .families.keymap import single_prefixes
from .families.spec import DIFFUSERS_FOLDERS, Weight
from .io.atomic import AtomicFolder
from .io.checkpoint import WEIGHT_NAMES
from .io.safetensors import DTYPES, StreamingWriter, TensorInfo, dtype_name

if TYPE_CHECKING:
    from .formats.adapters import Adapter, LoraFile


def _tiny(spec: FamilySpec, text_widths: tuple[int, ...]) -> FamilySpec:
    """Same counts as ``spec``, widths small enough for a test to build models in milliseconds."""
    assert spec.unet is not None
    texts = []
    for text, width in zip(spec.texts, text_widths, strict=True):
        texts.append(
            replace(
                text,
                hidden=width,
                intermediate=2 * width,
                vocab=1000,
                heads=2,
                projection=width if text.projection is not None else None,
            )
        )
    context = sum(text_widths) if spec.name == "sdxl" else text_widths[0]
    adm = None
    if spec.unet.adm_in_channels is not None:
        adm = text_widths[-1] + 6 * 8  # pooled text embedding + six size/crop embeddings of width 8
    unet = replace(
        spec.unet,
        model_channels=8,
        context_dim=context,
        adm_in_channels=adm,
        attention_heads=tuple(2 for _ in spec.unet.channel_mult),
        norm_groups=8,
    )
    vae = replace(spec.vae, channels=(8, 16, 32, 32), norm_groups=8)
    return replace(spec, unet=unet, texts=tuple(texts), vae=vae)


# Widths differ between text encoders and from the U-Net so a swapped dimension cannot hide.
TINY: dict[str, FamilySpec] = {
    "sd1": _tiny(FAMILIES["sd1"], (12,)),
    "sd2": _tiny(FAMILIES["sd2"], (16,)),
    "sdxl": _tiny(FAMILIES["sdxl"], (12, 20)),
}


def tiny_flux(*, guidance: bool = True) -> FamilySpec:
    """FLUX.1 with every real block count (19 double, 38 single, 24 T5 and 12 CLIP layers) and tiny widths.

    hidden 16 (2 heads × 8), MLP 64, the real packed-latent input 64, CLIP-L 12 wide, T5 20 wide: every width
    differs, so a swapped dimension cannot hide. ``guidance=False`` is [schnell].
    """
    spec = FAMILIES["flux1"]
    assert spec.transformer is not None and spec.t5 is not None
    clip = replace(spec.texts[0], hidden=12, intermediate=24, vocab=1000, heads=2)
    t5 = replace(spec.t5, d_model=20, d_ff=24, heads=2, d_kv=4, vocab=1000)
    flux = replace(
        spec.transformer, heads=2, head_dim=8, in_channels=64, context_dim=20, vec_dim=12, guidance_embed=guidance
    )
    vae = replace(spec.vae, channels=(8, 16, 32, 32), norm_groups=8)
    return replace(spec, transformer=flux, texts=(clip,), t5=t5, vae=vae)


# Kept apart from TINY (whose families every SD-LoRA test table runs over): FLUX.1 fixtures.
TINY_FLUX: dict[str, FamilySpec] = {"dev": tiny_flux(), "schnell": tiny_flux(guidance=False)}


def _seed_for(name: str, seed: int) -> int:
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def canonical_tensor(weight: Weight, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic value of one canonical tensor of a synthetic model."""
    if weight.dtype is not None:
        fixed = DTYPES[weight.dtype]
        if weight.canonical.endswith("position_ids"):
            return torch.arange(weight.shape[-1], dtype=fixed).reshape(weight.shape)
        return torch.zeros(weight.shape, dtype=fixed)
    generator = torch.Generator().manual_seed(_seed_for(weight.canonical, seed))
    values = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    if (
        len(weight.shape) == 1
        and ("norm" in weight.canonical.rsplit(".", 2)[-2])
        and weight.canonical.endswith("weight")
    ):
        values = 1.0 + 0.1 * values  # norm scales sit near one
    else:
        values = values * 0.05
    return values.to(dtype)


def _extra_tensor(name: str, shape: tuple[int, ...], fixed: str | None, dtype: torch.dtype) -> torch.Tensor:
    if fixed is not None:
        return torch.zeros(shape, dtype=DTYPES[fixed])
    generator = torch.Generator().manual_seed(_seed_for(name, 0))
    return torch.rand(shape, generator=generator).to(dtype)


def single_file_plan(
    spec: FamilySpec,
    dtype: torch.dtype = torch.float32,
    *,
    extras: bool = True,
    components: tuple[str, ...] | None = None,
    bare: bool = False,
) -> dict[str, TensorInfo]:
    """Key → dtype/shape of a synthetic single file, sorted by name as real files are.

    ``components``: only these (``("transformer",)`` is a BFL transformer file); ``bare``: without
    the all-in-one prefix (flux1-dev.safetensors, ae.safetensors).
    """
    km = keymap(spec)
    layout = spec.single_layout
    prefixes = single_prefixes(spec)
    plan: dict[str, TensorInfo] = {}
    for w in km.weights:
        name = w.layout_name(layout)
        if components is not None and w.component not in components:
            continue
        if name is not None and bare:
            name = next((name[len(p) :] for p in prefixes if name.startswith(p)), name)
        if name is not None and name not in plan:
            plan[name] = TensorInfo(w.dtype or dtype_name(dtype), w.layout_shape(layout))
    if extras:
        for name, (shape, fixed) in km.extras.items():
            plan[name] = TensorInfo(fixed or dtype_name(dtype), shape)
    return dict(sorted(plan.items()))


def iter_single_file(
    spec: FamilySpec, dtype: torch.dtype, seed: int, plan: Mapping[str, TensorInfo]
) -> Iterator[tuple[str, torch.Tensor]]:
    km = keymap(spec)
    layout = spec.single_layout
    for name in plan:
        weights = km.lookup(layout, name)
        if not weights:
            shape, fixed = km.extras[name]
            yield name, _extra_tensor(name, shape, fixed, dtype)
            continue
        parts = {w.canonical: canonical_tensor(w, seed, dtype) for w in weights}
        yield name, km.join(layout, name, parts).contiguous()


def write_single_file(
    spec: FamilySpec,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    extras: bool = True,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    components: tuple[str, ...] | None = None,
    bare: bool = False,
) -> Path:
    """Write a synthetic single-file (LDM/SGM/BFL) checkpoint, streamed tensor by tensor."""
    path = Path(path)
    plan = single_file_plan(spec, dtype, extras=extras, components=components, bare=bare)
    with StreamingWriter(path, plan, {"format": "pt", **(metadata or {})}, overwrite=overwrite) as writer:
        for name, tensor in iter_single_file(spec, dtype, seed, plan):
            writer.write(name, tensor)
    return path


def write_diffusers_folder(
    spec: FamilySpec,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic diffusers folder (configs + one safetensors file per component)."""
    path = Path(path)
    km = keymap(spec)
    configs = diffusers_configs(spec)
    with AtomicFolder(path, overwrite=overwrite) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
        for component, folder in DIFFUSERS_FOLDERS.items():
            weights = [w for w in km.weights if w.component == component and w.diffusers is not None]
            if not weights:
                continue
            (tmp / folder).mkdir()
            (tmp / folder / "config.json").write_text(json.dumps(configs[folder], indent=2))
            stem = WEIGHT_NAMES[0] if component in ("unet", "transformer", "vae") else WEIGHT_NAMES[1]
            prefix = f"{folder}."
            plan = {
                w.diffusers[len(prefix) :]: TensorInfo(w.dtype or dtype_name(dtype), w.shape)
                for w in weights
                if w.diffusers
            }
            with StreamingWriter(tmp / folder / f"{stem}.safetensors", plan, {"format": "pt"}) as writer:
                for w in weights:
                    if w.diffusers:
                        writer.write(w.diffusers[len(prefix) :], canonical_tensor(w, seed, dtype))
    return path


def write_checkpoint(spec: FamilySpec, path: str | Path, layout: str, **kwargs: Any) -> Path:
    """Write a synthetic checkpoint in ``layout`` ("single"/"ldm"/"sgm" or "diffusers")."""
    if layout == "diffusers":
        return write_diffusers_folder(spec, path, **kwargs)
    return write_single_file(spec, path, **kwargs)


# --- LoRAs ----------------------------------------------------------------------------------------

KOHYA_UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
KOHYA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_modules(spec: FamilySpec, *, conv: bool = False, text: bool = True) -> list[str]:
    """Canonical modules a kohya LoRA targets (``conv``: LoCon adds resnets and samplers)."""
    from .formats.names import name_tables

    out = []
    for module in name_tables(spec).modules.values():
        if module.component == "unet":
            in_transformer = ".attentions." in module.name and module.name.endswith(KOHYA_UNET_TARGETS)
            in_resnet = conv and (".resnets." in module.name or "samplers." in module.name)
            if in_transformer or in_resnet:
                out.append(module.name)
        elif text and module.path.endswith(KOHYA_TEXT_TARGETS):
            if module.component == "te1" and spec.texts[0].diffusers_layers < spec.texts[0].layers:
                layer = int(module.path.split(".")[3])
                if layer >= spec.texts[0].diffusers_layers:  # kohya's SD2 encoder has 23 layers
                    continue
            out.append(module.name)
    return out


def make_lora(
    spec: FamilySpec,
    *,
    rank: int = 4,
    alpha: float | None = None,
    conv: bool = False,
    text: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    alphas: str = "uniform",
) -> LoraFile:
    """A random LoRA (LoCon with ``conv``) over a family's kohya targets, as a LoraFile.

    ``alphas``: "uniform" (all ``alpha``, default rank/2) or "varied" (per-module 1…8, to test
    per-module scales). 3×3 convs get the conv shape ``down (r, in, 3, 3)``, ``up (out, r, 1, 1)``.
    """
    from .formats.adapters import LoraFile, LowRank
    from .formats.names import name_tables

    tables = name_tables(spec)
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, Adapter] = {}
    for i, module in enumerate(lora_modules(spec, conv=conv, text=text)):
        shape = tables.modules[module].shape
        out, inp = shape[0], shape[1]
        if len(shape) == 4:
            down = torch.randn(rank, inp, *shape[2:], generator=generator) * 0.1
            up = torch.randn(out, rank, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(rank, inp, generator=generator) * 0.1
            up = torch.randn(out, rank, generator=generator) * 0.1
        value = float(1 + i % 8) if alphas == "varied" else (alpha if alpha is not None else rank / 2)
        adapters[module] = LowRank(up.to(dtype), down.to(dtype), value)
    return LoraFile(adapters, spec, "synthetic")
