"""Independent references for the rank-surgery tests: numpy full SVDs of dense ΔW and the rule
meanings written out over plain float64 arrays (no loratools code)."""

from __future__ import annotations

import numpy as np
import torch

TEST_TIE = 1e-12  # the tests' own tie tolerance for targets placed exactly on a boundary


def dense(delta: torch.Tensor) -> np.ndarray:
    """ΔW as a float64 (out, in·kh·kw) numpy matrix."""
    return delta.detach().to(torch.float64).reshape(delta.shape[0], -1).numpy()


def truncation(matrix: np.ndarray, k: int) -> np.ndarray:
    """The rank-k truncated SVD of a dense matrix (numpy LAPACK, float64)."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖_F / ‖b‖_F (absolute when b is zero)."""
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def rule_rank(s: np.ndarray, rule: str, target: float) -> int:
    """The rank each rule's stated meaning gives for singular values ``s`` (largest first), ≥ 1."""
    s = np.asarray(s, dtype=np.float64)
    if rule == "sv_ratio":  # keep σᵢ > σ₀/R
        return max(1, int(np.sum(s * target > s[0] * (1 + TEST_TIE))))
    if rule == "sv_cumulative":  # smallest k with Σ_{i<k} σᵢ ≥ C·Σσ
        frac = np.cumsum(s) / s.sum()
    elif rule == "sv_fro":  # smallest k with ‖ΔW_k‖_F ≥ F·‖ΔW‖_F
        frac = np.sqrt(np.cumsum(s**2) / np.sum(s**2))
    else:
        raise ValueError(rule)
    return int(np.argmax(frac >= target * (1 - TEST_TIE))) + 1 if np.any(frac >= target * (1 - TEST_TIE)) else len(s)


def hadamard(n: int) -> np.ndarray:
    """An n×n orthonormal Hadamard matrix (n a power of two): entries ±1/√n, exact in binary floats."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def designed_factors(out: int, inp: int, sigmas: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``up (out, r)``, ``down (r, in)`` with ``up @ down`` having exactly the singular values ``sigmas``.

    Columns come from Hadamard matrices with rows permuted and signs flipped at random: exactly
    orthonormal in float32, so the singular values are exact to the last bit and targets placed on
    a boundary stay on it.
    """
    rng = np.random.default_rng(seed)
    r = len(sigmas)
    hu = hadamard(out)[rng.permutation(out)][:, rng.permutation(out)[:r]] * rng.choice([-1.0, 1.0], size=r)
    hv = hadamard(inp)[rng.permutation(inp)][:, rng.permutation(inp)[:r]]
    up = torch.tensor(hu * np.asarray(sigmas), dtype=torch.float32)
    down = torch.tensor(hv.T, dtype=torch.float32)
    return up, down
