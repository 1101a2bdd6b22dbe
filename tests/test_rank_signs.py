"""The sign rule (ops/svd_sign.py): a decomposition whose singular pairs come with flipped signs
gives the same stored factors, bit for bit, on every route of both SVD implementations.

Oracle: the flipped decomposition is built by negating pairs of the unflipped one (exact), and
ΔW is checked against torch's own dense product of the input factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratools.ops import lowrank, lowrank_np
from loratools.ops.svd_sign import SIGN_TIE, canonical_pairs, left_signs

# (out, rank, in, how up is made): the Cholesky route, the eigh route (rank-deficient up), dense
CASES = {
    "cholesky": (40, 6, 30, "random"),
    "eigh": (40, 6, 30, "deficient"),
    "dense": (5, 6, 30, "random"),
    "zero-up": (40, 4, 30, "zero"),
}


def _factors(case: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    out, rank, inp, how = CASES[case]
    rng = np.random.default_rng(seed)
    up, down = rng.standard_normal((out, rank)), rng.standard_normal((rank, inp))
    if how == "deficient":
        up[:, 1] = up[:, 0]
    elif how == "zero":
        up[:] = 0
    return up, down


def _flips(count: int, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed + 100).random(count) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_flipped_pairs_give_identical_factors(case: str, seed: int, k: int) -> None:
    up, down = _factors(case, seed)
    svd = lowrank_np.matrix_svd(up, down)
    left, right = svd.truncated(k)
    flips = _flips(k, seed)
    want_up, want_down = canonical_pairs(left, right, svd.singular_values)
    got_up, got_down = canonical_pairs(left * flips, right * flips[:, None], svd.singular_values)
    assert want_up.tobytes() == got_up.tobytes() and want_down.tobytes() == got_down.tobytes()
    # the torch twin applies the same rule to the same numbers
    t_up, t_down = lowrank.canonical_pairs(
        torch.from_numpy(left * flips), torch.from_numpy(right * flips[:, None]), torch.from_numpy(svd.singular_values)
    )
    assert t_up.numpy().tobytes() == want_up.tobytes() and t_down.numpy().tobytes() == want_down.tobytes()
    # ΔW is the truncation's: pairs negated together, σ = 0 pairs carry nothing
    assert np.allclose(want_up @ want_down, left @ right, rtol=0, atol=1e-12 * max(1.0, np.abs(left @ right).max()))


@pytest.mark.parametrize("case", ["cholesky", "eigh"])
def test_torch_decomposition_agrees_after_the_rule(case: str) -> None:
    # torch's MKL and numpy's OpenBLAS may return either sign: after the rule both agree to rounding
    up, down = _factors(case, 7)
    np_svd = lowrank_np.matrix_svd(up, down)
    t_svd = lowrank.matrix_svd(torch.from_numpy(up), torch.from_numpy(down))
    a = canonical_pairs(*np_svd.truncated(3), np_svd.singular_values)
    b = lowrank.canonical_pairs(*t_svd.truncated(3), t_svd.singular_values)
    for x, y in zip(a, b, strict=True):
        assert np.allclose(x, y.numpy(), rtol=0, atol=1e-10)
    dense = (torch.from_numpy(up) @ torch.from_numpy(down)).numpy()
    s = np.linalg.svd(dense, compute_uv=False)[:3]  # numpy's dense SVD as the oracle for σ
    assert np.allclose(np.linalg.norm(a[0], axis=0), s, rtol=1e-10)


def test_largest_entry_is_positive() -> None:
    left = np.array([[0.1, -3.0, 0.0], [-2.0, 1.0, 0.0], [1.5, 2.9, 0.0]])
    assert left_signs(left).tolist() == [-1.0, -1.0, 1.0]  # all-zero column: +1


@pytest.mark.parametrize("order", [1.0, -1.0])
def test_a_tie_broken_by_rounding_picks_the_same_entry(order: float) -> None:
    # two entries equal in exact arithmetic, opposite signs, one rounding apart in either order:
    # the first near-largest entry decides, not whichever rounding made larger
    a = 0.7
    b = np.nextafter(a, 2.0) if order > 0 else np.nextafter(a, 0.0)
    assert abs(b - a) / a < SIGN_TIE
    assert left_signs(np.array([[a], [-b], [0.1]])).tolist() == [1.0]
    assert left_signs(np.array([[-a], [b], [0.1]])).tolist() == [-1.0]


def test_zero_singular_pairs_are_stored_as_zeros() -> None:
    up, down = _factors("zero-up", 0)
    svd = lowrank_np.matrix_svd(up, down)
    new_up, new_down = canonical_pairs(*svd.truncated(2), svd.singular_values)
    assert not new_up.any() and not new_down.any()
    assert not np.signbit(new_up).any() and not np.signbit(new_down).any()  # +0.0, never -0.0
