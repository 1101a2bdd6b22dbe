"""extract from two FLUX.1 checkpoints (issue 17 item 4): every block Linear, CLIP and T5 module
the two differ in becomes a LoRA module whose ΔW is the optimal rank-k truncation of
``tuned − base``, whatever the two layouts (BFL single file with fused qkv/linear1, diffusers
folder). The oracle reads the diffusers folders' raw tensors with safetensors (diffusers names are
the canonical ones) and truncates with numpy's SVD: no loratools reader on that side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rank_oracles import dense, truncation
from safetensors.torch import load_file

from loratools.formats.io import load_lora
from loratools.ops.extract import extract, extract_targets
from loratools.synthetic import TINY_FLUX, write_checkpoint

RANK = 2
FOLDERS = {"transformer": "transformer", "te1": "text_encoder", "te2": "text_encoder_2"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(role, layout) → a tiny FLUX.1 [dev] checkpoint; base and tuned differ everywhere (seeds)."""
    root = tmp_path_factory.mktemp("flux-extract")
    spec = TINY_FLUX["dev"]
    out = {}
    for role, seed in (("base", 0), ("tuned", 1)):
        out[(role, "diffusers")] = write_checkpoint(spec, root / f"{role}-d", "diffusers", seed=seed)
        out[(role, "single")] = write_checkpoint(spec, root / f"{role}.safetensors", "single", seed=seed)
    return out


def _raw(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for component, sub in FOLDERS.items():
        for file in sorted((folder / sub).glob("*.safetensors")):
            tensors.update({f"{component}.{k}": v for k, v in load_file(file).items()})
    return tensors


@pytest.mark.parametrize(("base_layout", "tuned_layout"), [("diffusers", "diffusers"), ("single", "single"), ("single", "diffusers")])  # fmt: skip
def test_flux_extract_is_the_optimal_truncation(
    checkpoints: dict[tuple[str, str], Path], tmp_path: Path, base_layout: str, tuned_layout: str
) -> None:
    out = tmp_path / "extracted.safetensors"
    report = extract(checkpoints[("base", base_layout)], checkpoints[("tuned", tuned_layout)], out, rank=RANK)
    assert report.family == "flux1" and not report.missing
    lora = load_lora(out, TINY_FLUX["dev"])  # canonical modules of the tiny spec (widths matter)
    targets = extract_targets(TINY_FLUX["dev"])
    assert set(lora.adapters) == set(targets)
    base, tuned = _raw(checkpoints[("base", "diffusers")]), _raw(checkpoints[("tuned", "diffusers")])
    worst = 0.0
    for module in targets:
        difference = dense(tuned[f"{module}.weight"].double() - base[f"{module}.weight"].double())
        ours = dense(lora.adapters[module].delta())
        assert np.linalg.matrix_rank(ours, tol=1e-5 * np.linalg.norm(ours, 2)) <= RANK  # float32 factors
        # Eckart–Young: no rank-k matrix is closer to the difference than its truncated SVD. Compared
        # by residual, not by the matrices: random differences have near-tied singular values.
        optimal = np.linalg.norm(difference - truncation(difference, RANK))
        worst = max(worst, np.linalg.norm(difference - ours) / optimal - 1)
    assert worst < 1e-6


def test_flux_extract_covers_every_block_linear_clip_and_t5() -> None:
    """The target list follows kohya's Flux LoRA: double/single block Linears, CLIP attn/MLP, T5."""
    targets = extract_targets(TINY_FLUX["dev"])
    spec = TINY_FLUX["dev"]
    assert spec.transformer is not None and spec.t5 is not None
    double = [t for t in targets if t.startswith("transformer.transformer_blocks.")]
    single = [t for t in targets if t.startswith("transformer.single_transformer_blocks.")]
    assert len(double) == 14 * spec.transformer.double_blocks  # q k v out, add q k v out, 2×2 ff, 2 norms
    assert len(single) == 6 * spec.transformer.single_blocks  # q k v, proj_mlp, proj_out, norm
    assert len([t for t in targets if t.startswith("te2.")]) == 7 * spec.t5.layers
    assert not any(t.startswith(("transformer.x_embedder", "transformer.time_text_embed")) for t in targets)
