"""Generated LoRA files for the load-check tests: small subsets of a real family's modules at
full-size shapes (rank 2), written as a loader would meet them, mutations included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loratools.families.spec import FamilySpec
from loratools.formats.adapters import LoHa, LoKr, LoraFile, LowRank
from loratools.formats.io import save_lora
from loratools.formats.kohya import kohya_metadata, kohya_state_dict
from loratools.io.safetensors import save_tensors
from loratools.synthetic import make_lora

UNET_BLOCK = "unet.down_blocks.0.attentions.0."  # proj_in/out, attn1/attn2 q,k,v,out, ff: 11 modules
TE_LAYER = ".text_model.encoder.layers.0."  # q,k,v,out,fc1,fc2: 6 modules per text encoder


def subset(
    spec: FamilySpec,
    *,
    rank: int = 2,
    alphas: str = "uniform",
    alpha: float = 1.0,
    keep: Callable[[str], bool] | None = None,
    seed: int = 0,
) -> LoraFile:
    """One transformer block of the U-Net and layer 0 of each text encoder (or ``keep``'s choice)."""
    lora = make_lora(spec, rank=rank, alpha=alpha, alphas=alphas, seed=seed)
    keep = keep or (lambda m: m.startswith(UNET_BLOCK) or TE_LAYER in m)
    return lora.with_adapters({m: a for m, a in lora.adapters.items() if keep(m)})


def write_kohya(lora: LoraFile, path: Path, mutate: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """The kohya file of ``lora``; ``mutate`` edits the raw key → tensor dict first."""
    tensors = kohya_state_dict(lora)
    if mutate is not None:
        mutate(tensors)
    save_tensors(path, tensors, kohya_metadata(lora), overwrite=True)
    return path


def write_raw(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_tensors(path, tensors, metadata or {}, overwrite=True)
    return path


def write_diffusers(lora: LoraFile, path: Path) -> Path:
    return save_lora(lora, path, "diffusers", overwrite=True)


def with_kind(lora: LoraFile, kind: str, modules: int = 3) -> LoraFile:
    """The first ``modules`` linear modules as LoHa, LoKr (both halves factored, ranks 2 and 4) or
    output-axis DoRA; the rest unchanged."""
    g = torch.Generator().manual_seed(1)
    out = dict(lora.adapters)
    linear = [m for m, a in out.items() if isinstance(a, LowRank) and a.down.dim() == 2]
    for module in linear[:modules]:
        a = out[module]
        assert isinstance(a, LowRank)
        o, i = a.up.shape[0], a.down.shape[1]
        if kind == "loha":
            out[module] = LoHa(
                *(torch.randn(s, generator=g) * 0.1 for s in ((o, 2), (2, i), (o, 2), (2, i))), alpha=1.0
            )
        elif kind == "lokr":
            o1, i1 = 2 if o % 2 == 0 else 1, 2 if i % 2 == 0 else 1

            def r(*s: int) -> torch.Tensor:
                return torch.randn(*s, generator=g) * 0.1

            out[module] = LoKr(
                alpha=1.0, w1a=r(o1, 2), w1b=r(2, i1), w2a=r(o // o1, 4), w2b=r(4, i // i1), shape=(o, i)
            )
        elif kind == "dora":
            out[module] = LowRank(
                a.up, a.down, a.alpha, dora_scale=torch.rand(o, 1, generator=g) + 0.5, dora_axis="out"
            )
    return lora.with_adapters(out)
