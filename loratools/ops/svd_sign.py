"""One sign for each singular pair, so two LAPACKs that agree on ΔW store the same factors.

A singular pair ``(u, v)`` is defined only up to sign: ``(−u, −v)`` gives the same ``σ·u·vᵀ``.
numpy's OpenBLAS/LAPACK and torch's MKL pick either at will (the same ``eigh`` of the same r×r
core returns opposite eigenvectors), so two paths with equal ΔW wrote different bytes. The rule
here fixes the sign from the pair itself: the **first entry of the left vector whose magnitude is
within** :data:`SIGN_TIE` **of the column's largest is made positive** (the right vector flips
with it). Taking the first near-largest entry, not the argmax, keeps the choice stable when two
entries tie in exact arithmetic and differ only by rounding between the paths. This module imports
numpy only, so the torch-free resize path uses it too (the torch path through
:func:`loratools.ops.lowrank.canonical_pairs`).
"""

from __future__ import annotations

import numpy as np

# Entries within this relative distance of a column's largest |x| count as tied for "largest":
# far above float64 rounding between two LAPACKs (~1e-13 relative here), far below real gaps.
SIGN_TIE = 2.0**-20


def left_signs(left: np.ndarray) -> np.ndarray:
    """±1.0 for each column of ``left`` (rows × j): the sign that makes its first entry within
    :data:`SIGN_TIE` of the column's largest magnitude positive (+1 for an all-zero column)."""
    left = np.asarray(left)
    if left.ndim != 2:
        raise ValueError(f"left factor must be 2-D, got shape {left.shape}")
    if left.shape[0] == 0 or left.shape[1] == 0:
        return np.ones(left.shape[1])
    magnitude = np.abs(left)
    peak = magnitude.max(axis=0)
    first = np.argmax(magnitude >= peak * (1.0 - SIGN_TIE), axis=0)  # argmax of bools: first True
    chosen = left[first, np.arange(left.shape[1])]
    return np.where(chosen < 0, -1.0, 1.0)


def canonical_pairs(up: np.ndarray, down: np.ndarray, singular_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(up, down)`` (``up = U·S`` columns, ``down = Vᵀ`` rows, j pairs) in the one stored form:

    - column j of ``up`` and row j of ``down`` negated where :func:`left_signs` says so (the same
      product ``up @ down``: negation is exact);
    - a pair with σ = 0 stored as zeros on both sides. Its right vector is any unit vector of a
      null space, which each LAPACK picks its own way (an untrained module, ``up = 0``, kept at
      rank 1); the Cholesky route of :func:`~loratools.ops.lowrank.product_svd` already gives zeros;
    - zeros as +0.0: a zero one path negated and the other did not would be −0.0 on one side only.
    """
    factors = pair_factors(up, singular_values)
    return up * factors + 0.0, down * factors[:, None] + 0.0


def pair_factors(up: np.ndarray, singular_values: np.ndarray) -> np.ndarray:
    """What :func:`canonical_pairs` multiplies pair j by: :func:`left_signs`, or 0.0 where σⱼ = 0."""
    return np.where(np.asarray(singular_values)[: up.shape[1]] > 0, left_signs(up), 0.0)
