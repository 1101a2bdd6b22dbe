"""The factor-space SVD of a plain LoRA product ``up @ down`` on numpy — the torch route's twin.

The same op sequence as :func:`loratools.ops.lowrank.product_svd` (Gram matrices in float64,
Cholesky of ``upᵀ·up``, ``eigh`` of the r×r core ``Lᵀ·G_d·L``, or both Grams factored by
``eigh`` when ``up`` is rank-deficient; a dense SVD when r exceeds a dimension), so the ranks
chosen, the singular values and the truncated ΔW agree with the torch route to float64
rounding (numpy's and torch's BLAS/LAPACK sum in different orders; see
``tests/test_numpy_path.py`` for the bound and its reasoning). It exists so that resize and blend
of plain LoRAs never pay ``import torch`` (0.9–1.1 s of a 2.2 s resize, issue 18).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

EPS64 = float(np.finfo(np.float64).eps)
TINY64 = float(np.finfo(np.float64).tiny)


@dataclass
class NumpySVD:
    """The SVD of ``up @ down`` in factor space (see :class:`loratools.ops.lowrank.ProductSVD`)."""

    up: np.ndarray  # (out, k) float64
    down: np.ndarray  # (k, in) float64
    singular_values: np.ndarray  # (k,) float64, largest first
    chol: np.ndarray | None = None
    vectors: np.ndarray | None = None
    right: np.ndarray | None = None
    dense: tuple[np.ndarray, np.ndarray] | None = None  # (U·S, Vh) of a dense SVD

    def truncated(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(U_j·S_j, V_jᵀ)`` in float64: the optimal rank-j approximation ``up_j @ down_j``."""
        if self.dense is not None:
            return self.dense[0][:, :j], self.dense[1][:j]
        if self.chol is not None and self.vectors is not None:
            e = self.vectors[:, :j]
            s_vt = (e.T @ self.chol.T) @ self.down
            # up·L⁻ᵀ·E (the torch route's solve_triangular)
            u = self.up @ _solve_upper(self.chol.T, e)
            s = self.singular_values[:j]
            inv = np.where(s > 0, 1.0 / np.maximum(s, TINY64), 0.0)
            return u * s, s_vt * inv[:, None]
        assert self.right is not None
        v = self.down.T @ self.right[:, :j]
        return self.up @ (self.down @ v), v.T


def _solve_upper(upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``upper⁻¹·rhs`` (r×r): LAPACK gesv — L is well conditioned here (cond < 1e6, checked), so a
    general solve is as accurate as a triangular one, and scipy's import is not paid for it."""
    return np.linalg.solve(upper, rhs)


def _sqrt_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lam, vec = np.linalg.eigh(gram)
    floor = float(np.abs(lam).max()) * gram.shape[0] * EPS64
    lam = np.where(lam > floor, lam, 0.0)
    return np.sqrt(lam)[:, None] * vec.T, vec, lam


def product_svd(up: np.ndarray, down: np.ndarray) -> NumpySVD:
    """The singular values of ``up @ down`` and the k×k maps to its singular vectors; float64.

    Mirrors :func:`loratools.ops.lowrank.product_svd` step for step (see there for the maths).
    """
    up, down = up.astype(np.float64, copy=False), down.astype(np.float64, copy=False)
    gram_up = up.T @ up
    gram_down = down @ down.T
    if not np.isfinite(np.trace(gram_up) + np.trace(gram_down)):
        raise InputError("its factors hold NaN or inf")
    try:
        chol = np.linalg.cholesky(gram_up)
    except np.linalg.LinAlgError:
        chol = None
    if chol is not None and float(chol.diagonal().min()) > float(chol.diagonal().max()) * 1e-6:
        t = chol.T @ gram_down @ chol
        lam, vec = np.linalg.eigh((t + t.T) / 2)
        lam, vec = lam[::-1], vec[:, ::-1]
        lam = np.where(lam > float(lam[0]) * lam.size * EPS64, lam, 0.0)
        return NumpySVD(up, down, np.sqrt(lam), chol=chol, vectors=np.ascontiguousarray(vec))
    ru, _, _ = _sqrt_factor(gram_up)
    rv, ev, lv = _sqrt_factor(gram_down)
    _, s, vch = np.linalg.svd(ru @ rv.T)
    inv = np.where(lv > 0, 1.0 / np.sqrt(np.maximum(lv, TINY64)), 0.0)
    return NumpySVD(up, down, s, right=(ev * inv) @ vch.T)


def matrix_svd(up: np.ndarray, down: np.ndarray) -> NumpySVD:
    """The SVD of ``up @ down``: in factor space when the inner width is below both dimensions,
    else of the dense product (no larger than the factors then), as :func:`.lowrank.matrix_svd`."""
    if up.shape[1] > min(up.shape[0], down.shape[1]):
        dense = up.astype(np.float64) @ down.astype(np.float64)
        if not np.isfinite(dense).all():
            raise InputError("its factors hold NaN or inf")
        u, s, vh = np.linalg.svd(dense, full_matrices=False)
        return NumpySVD(up, down, s, dense=(u * s, vh))
    return product_svd(up, down)
