"""Rank rules and the factor-space SVD against numpy full SVDs of the dense matrices.

Each dynamic rule is checked at its edges on factors whose singular values are exact by
construction (Hadamard columns), against the rule's meaning written out in ``rank_oracles``.
Several cases are ones kohya-ss/sd-scripts networks/resize_lora.py gets wrong (noted per test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rank_oracles import dense, designed_factors, rel_err, rule_rank, singular_values, truncation

from loratools.errors import InputError
from loratools.ops.lowrank import (
    RankRule,
    kept_fraction,
    lost_fraction,
    matrix_svd,
    product_svd,
    randomized_svd,
    svd_of_product,
)

SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5]  # Σσ = 15.5, Σσ² = 85.25


@pytest.mark.parametrize(
    ("out", "inp", "k"),
    [(64, 48, 8), (48, 64, 8), (40, 40, 40), (30, 200, 16), (200, 30, 16), (16, 12, 20), (1, 50, 3), (50, 1, 3)],
)
def test_product_svd_matches_numpy(out: int, inp: int, k: int) -> None:
    """Every truncation of the factor-space SVD equals numpy's truncated SVD of the dense product."""
    g = torch.Generator().manual_seed(out * 1000 + inp)
    up, down = torch.randn(out, k, generator=g), torch.randn(k, inp, generator=g)
    matrix = dense(up.double() @ down.double())
    svd = matrix_svd(up, down)
    np.testing.assert_allclose(svd.singular_values.numpy(), singular_values(matrix)[: svd.singular_values.numel()],
                               rtol=1e-9, atol=1e-9 * singular_values(matrix)[0])  # fmt: skip
    for j in range(1, min(out, inp, k) + 1):
        a, b = svd.truncated(j)
        if j < min(out, inp, k):  # a gap is needed for a unique truncation; random spectra have one
            assert rel_err((a @ b).numpy(), truncation(matrix, j)) < 1e-9, j


def test_product_svd_rank_deficient_and_zero() -> None:
    """An up factor with zero columns (untrained directions) and an all-zero up take the eigh route."""
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(30, 6, generator=g), torch.randn(6, 20, generator=g)
    up[:, 2] = 0
    up[:, 4] = up[:, 0]  # duplicate direction: rank 4
    matrix = dense(up.double() @ down.double())
    core = product_svd(up, down)
    assert core.chol is None  # Cholesky refused: the eigh route ran
    assert int((core.singular_values > 1e-9).sum()) == 4
    for j in (1, 2, 3, 4):
        a, b = core.truncated(j)
        assert rel_err((a @ b).numpy(), truncation(matrix, j)) < 1e-9
    zero = product_svd(torch.zeros(30, 6), down)
    assert float(zero.singular_values.max()) == 0.0
    a, b = zero.truncated(2)
    assert torch.count_nonzero(a @ b) == 0


def test_svd_of_product_full_factors() -> None:
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(70, 9, generator=g), torch.randn(9, 33, generator=g)
    f = svd_of_product(up, down)
    assert rel_err((f.up @ f.down).numpy(), dense(up.double() @ down.double())) < 1e-12


# --- rules at their edges -----------------------------------------------------------------------


def designed() -> torch.Tensor:
    up, down = designed_factors(64, 32, SIGMAS, seed=3)
    return matrix_svd(up, down).singular_values


CASES = [
    # (rule, target, expected rank)
    ("sv_ratio", 1.0, 1),  # only σ₀ (kohya < PR #2194 kept 2: count(σ > σ₀) + 1 clamped up)
    ("sv_ratio", 4.0, 2),  # σ₀/σ₂ = 4 exactly: not < 4, so σ₂ is dropped (strict, as kohya)
    ("sv_ratio", 4.0001, 3),
    ("sv_ratio", 1e6, 5),  # more than there are: all 5, never an index past the end
    ("sv_cumulative", 0.5, 1),  # σ₀ alone is 51.6%: rank 1 (kohya before PR #2194 kept 2: +1 twice, index ≥ 1)
    ("sv_cumulative", 12 / 15.5, 2),  # exactly (8+4)/Σσ: reached at k=2
    ("sv_cumulative", 12 / 15.5 + 1e-6, 3),
    ("sv_cumulative", 1.0, 5),
    ("sv_fro", 0.8, 1),  # √(64/85.25) = 0.866 ≥ 0.8
    ("sv_fro", (80 / 85.25) ** 0.5, 2),  # exactly on the boundary
    ("sv_fro", (80 / 85.25) ** 0.5 + 1e-7, 3),
    ("sv_fro", 1.0, 5),
]


@pytest.mark.parametrize(("rule", "target", "expected"), CASES)
def test_dynamic_rules_at_edges(rule: str, target: float, expected: int) -> None:
    s = designed()
    assert rule_rank(np.array(SIGMAS), rule, target) == expected  # the oracle agrees with the table
    choice = RankRule(**{rule: target}).choose(s)
    assert choice.rank == expected
    assert choice.limited_by is None


def test_kohya_off_by_one_would_fail() -> None:
    """kohya's rules before PR #2194: ``index = searchsorted(…) + 1`` clamped to [1, len−1], then
    ``new_rank = index + 1`` — so sv_fro 0.8 on these singular values gave rank 2, not 1."""
    s = np.array(SIGMAS)
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    kohya_index = min(max(int(np.searchsorted(cumulative, 0.8**2)) + 1, 1), len(s) - 1)
    assert kohya_index + 1 == 2  # what kohya wrote
    assert RankRule(sv_fro=0.8).choose(designed()).rank == 1  # what sv_fro 0.8 means


def test_fixed_rank_above_available_is_capped_and_reported() -> None:
    """A fixed rank above the singular values there are: capped, never padded with noise
    (kohya: IndexError, PR #2422, or noise directions of a dense SVD with alpha = scale·new_rank)."""
    choice = RankRule(rank=10).choose(designed())
    assert (choice.rank, choice.limited_by) == (5, "available")
    assert RankRule(rank=5).choose(designed()).limited_by is None


def test_bounds() -> None:
    s = designed()
    assert RankRule(sv_fro=1.0, max_rank=2).choose(s) == type(RankRule(rank=1).choose(s))(2, "max-rank")
    assert RankRule(sv_ratio=1.0, min_rank=3).choose(s).rank == 3
    assert RankRule(sv_ratio=1.0, min_rank=9).choose(s).rank == 5  # never more than exist
    assert RankRule(rank=3, conv_rank=1).choose(s, conv=True).rank == 1
    assert RankRule(rank=3, conv_rank=1).choose(s, conv=False).rank == 3


def test_zero_matrix_and_tiny_values() -> None:
    """Only an exactly zero ΔW is "zero"; kohya's absolute σ₀ ≤ 1e-6 test would make this tiny but
    real module rank 1."""
    zero = torch.zeros(4, dtype=torch.float64)
    for rule in (RankRule(sv_fro=0.9), RankRule(sv_cumulative=0.9), RankRule(sv_ratio=10)):
        assert rule.choose(zero).rank == 1 and rule.choose(zero).limited_by == "zero"
    assert kept_fraction(zero, 1) == 1.0 and lost_fraction(zero, 1) == 0.0
    tiny = designed() * 1e-9
    assert RankRule(sv_fro=0.99).choose(tiny).rank == rule_rank(np.array(SIGMAS) * 1e-9, "sv_fro", 0.99) == 3


def test_total_energy_of_a_sketch() -> None:
    """sv_fro on the top of a spectrum compares with the true total, not the sketch's."""
    s = designed()[:3]  # σ = 8, 4, 2 of a matrix whose Σσ² is 85.25
    assert RankRule(sv_fro=0.99).choose(s, total_energy=85.25).rank == 3
    assert RankRule(sv_fro=0.99).choose(s).rank == 3
    assert RankRule(sv_fro=0.95).choose(s, total_energy=85.25).rank == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a rank rule"),
        ({"rank": 4, "sv_fro": 0.9}, "one rank rule"),
        ({"rank": 0}, "≥ 1"),
        ({"rank": 4, "max_rank": 8}, "bound a dynamic rule"),
        ({"sv_ratio": 0.5}, "≥ 1"),
        ({"sv_fro": 0.0}, "(0, 1]"),
        ({"sv_cumulative": 1.5}, "(0, 1]"),
        ({"sv_fro": 0.9, "min_rank": 8, "max_rank": 4}, "above"),
        ({"conv_rank": 4, "sv_fro": 0.9}, "--conv-rank goes with --rank"),
    ],
)
def test_bad_rules_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as info:
        RankRule(**kwargs)
    assert "\n" not in str(info.value)


def test_randomized_svd_near_optimal() -> None:
    """A decaying spectrum: the sketch's rank-k error is within 1% of the optimal truncation's."""
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(600, 100, generator=g))
    v, _ = torch.linalg.qr(torch.randn(500, 100, generator=g))
    s = 0.93 ** torch.arange(100.0)
    matrix = (u * s) @ v.t() + 1e-4 * torch.randn(600, 500, generator=g)
    optimal = np.linalg.norm(dense(matrix) - truncation(dense(matrix), 20))
    sketch = randomized_svd(matrix, 20)
    assert sketch.singular_values.numel() == 36  # rank + oversampling
    a, b = sketch.truncated(20)
    assert np.linalg.norm(dense(matrix) - (a @ b).numpy()) <= 1.01 * optimal
    crude = randomized_svd(matrix, 20, oversample=0, power_iterations=0)  # the sketch alone: worse
    a, b = crude.truncated(20)
    assert np.linalg.norm(dense(matrix) - (a @ b).numpy()) > optimal


def test_randomized_svd_small_matrix_is_exact() -> None:
    g = torch.Generator().manual_seed(5)
    matrix = torch.randn(40, 30, generator=g)
    sketch = randomized_svd(matrix, 10)
    np.testing.assert_allclose(sketch.singular_values.numpy(), singular_values(dense(matrix)), rtol=1e-6)
