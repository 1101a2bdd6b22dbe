"""The torch-free resize path (ops/rank_numpy.py, ops/lowrank_np.py) against the torch path.

Oracle: the torch path itself (``resize_lora`` + ``save_lora``, main's implementation, kept as the
fallback), run on the same file. Keys, order, shapes, dtypes, alphas and metadata (bar the
``sshs_`` hashes) are identical. The factors are not always: numpy's OpenBLAS/LAPACK and torch's
MKL may return an eigenvector with the opposite sign (both are valid; up and down flip
together), so ΔW is compared — to float64 rounding through the r×r core (~1e-12 relative) plus
one rounding of each factor to the stored dtype (2⁻¹¹ fp16, 2⁻⁸ bf16 relative per factor).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loratools.formats.io import load_lora, save_lora
from loratools.ops.rank_rule import RankRule
from loratools.ops.resize import resize, resize_lora
from loratools.synthetic import TINY, make_lora

ROOT = Path(__file__).resolve().parents[1]
# two factors each rounded once to the stored dtype: 2·2⁻¹¹ (fp16), 2·2⁻⁸ (bf16); fp32: 2·2⁻²⁴ + slack
TOL = {torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8, torch.float32: 1e-6}


def _delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[f"{name}.lora_up.weight"].double().flatten(1) @ tensors[f"{name}.lora_down.weight"].double().flatten(
        1
    )


def _torch_resize(src: Path, out: Path, rule: RankRule, family: object) -> None:
    lora = load_lora(src, family)  # type: ignore[arg-type]
    resized, _ = resize_lora(lora, rule)
    save_lora(resized, out, "kohya")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rule", [RankRule(rank=2), RankRule(sv_fro=0.9), RankRule(sv_ratio=3.0)], ids=str)
def test_numpy_resize_matches_torch_path(tmp_path: Path, family: str, dtype: torch.dtype, rule: RankRule) -> None:
    spec = TINY[family]
    src = save_lora(
        make_lora(spec, rank=4, conv=True, dtype=dtype, alphas="varied"), tmp_path / "in.safetensors", "kohya"
    )
    resize(src, tmp_path / "np.safetensors", rule=rule, family=spec)
    _torch_resize(src, tmp_path / "torch.safetensors", rule, spec)
    got, want = load_file(tmp_path / "np.safetensors"), load_file(tmp_path / "torch.safetensors")
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        if key.endswith(".alpha"):
            assert torch.equal(got[key], tensor), key
    for key in [k for k in want if k.endswith("lora_up.weight")]:
        name = key.removesuffix(".lora_up.weight")
        assert (
            float((_delta(got, name) - _delta(want, name)).norm())
            <= TOL[dtype] * float(_delta(want, name).norm()) + 1e-30
        ), name
    with safe_open(tmp_path / "np.safetensors", "pt") as a, safe_open(tmp_path / "torch.safetensors", "pt") as b:
        meta_a, meta_b = a.metadata(), b.metadata()
    assert {k: v for k, v in meta_a.items() if not k.startswith("sshs_")} == {
        k: v for k, v in meta_b.items() if not k.startswith("sshs_")
    }


def test_resize_of_plain_lora_never_imports_torch(tmp_path: Path) -> None:
    src = save_lora(make_lora(TINY["sd1"], rank=4, conv=True), tmp_path / "in.safetensors", "kohya")
    code = (
        "import sys; from loratools.ops.resize import resize; "
        f"resize({str(src)!r}, {str(tmp_path / 'out.safetensors')!r}, rank=2, family='sd1'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
