"""The torch-free resize path (ops/rank_numpy.py, ops/lowrank_np.py) against the torch path.

Oracle: the torch path itself (``resize_lora`` + ``save_lora``: the fallback every other input
takes), run on the same file. Both fix each singular pair's sign by one rule
(:mod:`loratools.ops.svd_sign`), so the files are compared byte for byte: keys, order, dtypes,
alphas, factors, metadata and the ``sshs_`` hashes. (Without the rule numpy's OpenBLAS and torch's
MKL returned opposite eigenvectors for about one module in three: equal ΔW, different bytes.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_real, real_lora

from loratools.formats.adapters import LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.ops.provenance import PendingRecord
from loratools.ops.rank_common import with_provenance
from loratools.ops.rank_rule import RankRule
from loratools.ops.resize import resize, resize_lora
from loratools.synthetic import TINY, make_lora

ROOT = Path(__file__).resolve().parents[1]
RULES = [RankRule(rank=2), RankRule(sv_fro=0.9), RankRule(sv_ratio=3.0), RankRule(sv_cumulative=0.6, max_rank=5)]


def _torch_resize(src: Path, out: Path, rule: RankRule, family: object) -> None:
    lora = load_lora(src, family)  # type: ignore[arg-type]
    resized, _ = resize_lora(lora, rule)
    record = PendingRecord("resize", [("input", src)], {"rule": rule.describe()}, lora.metadata)  # as resize() records
    save_lora(with_provenance(resized, record), out, "kohya")


def _both_paths(src: Path, tmp_path: Path, rule: RankRule, family: object) -> tuple[bytes, bytes]:
    resize(src, tmp_path / "np.safetensors", rule=rule, family=family)  # type: ignore[arg-type]
    _torch_resize(src, tmp_path / "torch.safetensors", rule, family)
    return (tmp_path / "np.safetensors").read_bytes(), (tmp_path / "torch.safetensors").read_bytes()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_numpy_resize_bytes_equal_torch_path(
    tmp_path: Path, family: str, rank: int, dtype: torch.dtype, rule: RankRule
) -> None:
    spec = TINY[family]
    lora = make_lora(spec, rank=rank, conv=True, dtype=dtype, alphas="varied", seed=rank)
    src = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    got, want = _both_paths(src, tmp_path, rule, spec)
    assert got == want


def _degenerate(spec: object) -> LoraFile:
    """Untrained modules (up = 0), a zero row and column, a rank-deficient up: the eigh route of
    product_svd, exact zeros in the output factors, σ = 0 pairs."""
    lora = make_lora(spec, rank=4, conv=True, seed=3)  # type: ignore[arg-type]
    for i, adapter in enumerate(lora.adapters.values()):
        assert isinstance(adapter, LowRank)
        if i % 4 == 0:
            adapter.up.zero_()
        elif i % 4 == 1:
            adapter.up[0] = 0
            adapter.down[:, 0] = 0
        elif i % 4 == 2:
            adapter.up[:, 1] = adapter.up[:, 0]  # up of rank 3: no Cholesky factor
    return lora


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_degenerate_modules_bytes_equal_torch_path(tmp_path: Path, rule: RankRule) -> None:
    src = save_lora(_degenerate(TINY["sd1"]), tmp_path / "in.safetensors", "kohya")
    got, want = _both_paths(src, tmp_path, rule, TINY["sd1"])
    assert got == want


@needs_real("catundchat_sd15", "pytorch_lora_weights.safetensors")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rule", [RankRule(rank=2), RankRule(sv_fro=0.95)], ids=str)
def test_real_lora_bytes_equal_torch_path(tmp_path: Path, dtype: torch.dtype, rule: RankRule) -> None:
    # a real trained SD1.5 LoRA (full widths), rewritten as kohya so the numpy path takes it
    lora = load_lora(real_lora("catundchat_sd15", "pytorch_lora_weights.safetensors"))
    src = save_lora(lora, tmp_path / "in.safetensors", "kohya", dtype=dtype)
    got, want = _both_paths(src, tmp_path, rule, lora.family)
    assert got == want


def test_resize_of_plain_lora_never_imports_torch(tmp_path: Path) -> None:
    src = save_lora(make_lora(TINY["sd1"], rank=4, conv=True), tmp_path / "in.safetensors", "kohya")
    code = (
        "import sys; from loratools.ops.resize import resize; "
        f"resize({str(src)!r}, {str(tmp_path / 'out.safetensors')!r}, rank=2, family='sd1'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
