"""diffusers + peft ``fuse_lora`` as the oracle for ``loratools merge``.

The same LoRA file goes two ways into the same tiny fp32 diffusers folder: diffusers' own loader
(``load_lora_weights``, its kohya/peft conversion) and ``fuse_lora`` on the built models, and
loratools' streamed merge of the files. Every patched weight must agree to float32 tolerance, and,
rounded to float16, bit for bit wherever the two float32 values agree (where they differ, by a
float32 rounding step of a different summation order, the fp16 values may differ by one step; the
count is bounded). Weights are powers of two and alpha/rank = 1/2, so the scale itself rounds
nothing and both sides compute the same products.

Uniform alphas only: with per-module alphas diffusers mis-scales kohya files (docs/FORMATS.md §2.5,
tests/test_diffusers_lora_oracle.py) and the math, not diffusers, is the judge there — see
tests/test_merge.py for merges checked against ``alpha/r·up@down`` computed from raw tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAMILY_NAMES
from helpers_diffusers_oracle import (
    RANK,
    UNIFORM_ALPHA,
    base_weights,
    build_pipeline,
    components,
    load_with_diffusers,
    module_of,
)

from loratools.families.spec import DIFFUSERS_FOLDERS
from loratools.formats.io import load_lora, save_lora
from loratools.ops.merge import LoraInput, merge
from loratools.synthetic import TINY, make_lora

pytestmark = [pytest.mark.oracle]
safetensors_torch = pytest.importorskip("safetensors.torch")
LoraLayer = pytest.importorskip("peft.tuners.lora").LoraLayer

RTOL, ATOL = 1e-6, 1e-6


def fused_weights(pipe: object, modules: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for canonical in modules:
        module = module_of(pipe, canonical)
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        out[canonical] = layer.weight.detach().clone()
    return out


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> int:
    """fp32 close; fp16-rounded identical except where the fp32 values differ. Returns that count."""
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape, what
    assert torch.allclose(ours, theirs, rtol=RTOL, atol=ATOL), (
        f"{what}: max |Δ| {(ours - theirs).abs().max().item():.3g}"
    )
    h_ours, h_theirs = ours.half(), theirs.half()
    fp16_differs = h_ours != h_theirs
    assert not (fp16_differs & (ours == theirs)).any(), what  # impossible unless rounding is broken
    return int(fp16_differs.sum())


def _check(pipe: object, out: Path, modules: list[str], max_flipped: float) -> tuple[dict, dict]:
    ours = base_weights(out, modules)
    theirs = fused_weights(pipe, modules)
    total = sum(t.numel() for t in theirs.values())
    flipped = sum(assert_agree(ours[m], theirs[m], m) for m in modules)
    assert flipped <= total * max_flipped, f"{flipped} of {total} values round differently to fp16"
    return ours, theirs


CASES = [("kohya", False), ("kohya", True), ("diffusers", False)]


@pytest.mark.parametrize(("fmt", "conv"), CASES, ids=["kohya-lora", "kohya-locon", "diffusers-lora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_equals_diffusers_fuse_lora(
    family: str, fmt: str, conv: bool, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    lora = make_lora(TINY[family], rank=RANK, alpha=UNIFORM_ALPHA, conv=conv, text=not conv)
    modules = sorted(lora.adapters)
    path = save_lora(lora, tmp_path / f"lora-{fmt}.safetensors", fmt)
    assert set(load_lora(path, family=TINY[family]).adapters) == set(modules)

    weight = 0.5
    report = merge(folder, [LoraInput(path, weight)], tmp_path / "merged", strict=True)
    assert sum(report.patched.values()) == len(modules) and report.unmatched == 0

    pipe = build_pipeline(folder, family)
    # (Adapter names that occur inside module names, like "x", confuse transformers' load report.)
    assert load_with_diffusers(pipe, family, path, "the_lora", set(modules)) == []
    pipe.fuse_lora(
        lora_scale=weight, components=[DIFFUSERS_FOLDERS[c] for c in components(family)], adapter_names=["the_lora"]
    )
    # Measured: bit-exact for Linear LoRAs; peft computes 3×3 LoCon ΔW with a conv2d (another
    # summation order), which moved 1 of 531136 sd1 values across an fp16 rounding boundary.
    _check(pipe, tmp_path / "merged", modules, max_flipped=1e-5 if conv else 0.0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_two_loras_with_a_negative_weight_equal_diffusers(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    a = make_lora(TINY[family], rank=RANK, alpha=UNIFORM_ALPHA, seed=1)
    b = make_lora(TINY[family], rank=RANK, alpha=UNIFORM_ALPHA, seed=2)
    pa = save_lora(a, tmp_path / "a.safetensors", "kohya")
    pb = save_lora(b, tmp_path / "b.safetensors", "diffusers")
    modules = sorted(a.adapters)
    merge(folder, [LoraInput(pa, 0.5), LoraInput(pb, -1.0)], tmp_path / "merged", strict=True)

    pipe = build_pipeline(folder, family)
    assert load_with_diffusers(pipe, family, pa, "first_lora", set(modules)) == []
    assert load_with_diffusers(pipe, family, pb, "second_lora", set(modules), others=("first_lora",)) == []
    pipe.set_adapters(["first_lora", "second_lora"], adapter_weights=[0.5, -1.0])
    pipe.fuse_lora(
        components=[DIFFUSERS_FOLDERS[c] for c in components(family)], adapter_names=["first_lora", "second_lora"]
    )
    # peft adds the two LoRAs one after the other (two fp32 roundings); loratools adds their
    # rank-concatenated product once. Measured ~7e-5 of values round to another fp16 value.
    # Where the two differ, the math decides: over all modules ours is no further from
    # W + ½ΔA − ΔB computed in float64 (Frobenius norm of the error).
    ours, theirs = _check(pipe, tmp_path / "merged", modules, max_flipped=2e-4)
    base = base_weights(folder, modules)
    ours_sq = theirs_sq = 0.0
    for module in modules:
        exact = base[module].double()
        for lora, weight in ((a, 0.5), (b, -1.0)):
            adapter = lora.adapters[module]
            up, down = adapter.up.double().flatten(1), adapter.down.double().flatten(1)
            exact = exact + weight * adapter.scale * (up @ down).reshape(exact.shape)
        ours_sq += float((ours[module].double() - exact).square().sum())
        theirs_sq += float((theirs[module].double() - exact).square().sum())
    assert ours_sq <= theirs_sq, f"error from exact: ours {ours_sq**0.5:.3g}, diffusers {theirs_sq**0.5:.3g}"
