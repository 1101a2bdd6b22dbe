"""The fused rounding-loss pass (ops/delta.round_measured) against float64 torch maths."""

from __future__ import annotations

import pytest
import torch

import loratools.ops.delta as delta

DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", [False, True], ids=["fresh", "into-base"])
@pytest.mark.parametrize("numel", [1, 37, 1000, 4099])
def test_round_measured_is_the_rounding_and_its_norms(
    dtype: torch.dtype, alias: bool, numel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delta, "ROUND_CHUNK", 256)  # several slices, the last one short
    generator = torch.Generator().manual_seed(numel)
    base = (torch.randn(numel, generator=generator) * 2).to(dtype)
    exact = base.float() + torch.randn(numel, generator=generator) * 0.05
    keep = base.clone()
    dest = base if alias else torch.empty(numel, dtype=dtype)
    lost, moved = delta.round_measured(exact.view(-1, 1), base, dest)
    assert torch.equal(dest.view(torch.uint8), exact.to(dtype).view(torch.uint8))  # bit for bit
    # float32 dots per slice, float64 across slices (ops/delta.round_measured): ~1e-6 relative
    assert lost == pytest.approx(float((dest.double() - exact.double()).square().sum()), rel=1e-5)
    assert moved == pytest.approx(float((exact.double() - keep.double()).square().sum()), rel=1e-5)
