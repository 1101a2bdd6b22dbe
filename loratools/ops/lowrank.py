"""Low-rank algebra in factor space: exact SVDs of products without forming dense matrices.

For ``ΔW = U @ V`` with inner width k, the SVD of ΔW is the SVD of a k×k core. With the Gram
matrices ``UᵀU = Eu Λu Euᵀ`` and ``VVᵀ = Ev Λv Evᵀ``, ``U = Qu·Ru`` and ``Vᵀ = Qv·Rv`` with
``Ru = Λu^½ Euᵀ``, ``Rv = Λv^½ Evᵀ`` and orthonormal ``Qu``, ``Qv``, so ``ΔW = Qu (Ru Rvᵀ) Qvᵀ``
and the SVD of the k×k core ``Ru Rvᵀ`` gives ΔW's singular values and vectors. Cost
O((out+in)·k²) instead of O(out·in·min(out,in)), computed in float64, and the truncation is the
optimal one (Eckart–Young). The Gram route is used instead of Householder QR because it is all
matrix products (QR of a 10240×128 factor was 5–10× slower than its Gram matrix on the 2-core
reference box), and float64 keeps it accurate for the factors LoRAs have.

LoHa and LoKr have exact low-rank factorizations too (Khatri–Rao and Kronecker structure).

Rank choice (:class:`RankRule`) reproduces the *meanings* of kohya-ss/sd-scripts
networks/resize_lora.py's dynamic methods and avoids their edge bugs; see :meth:`RankRule.choose`.
Dense matrices that are not low-rank products (a fine-tuned checkpoint's weight difference) go
through :func:`randomized_svd` (Halko, Martinsson & Tropp 2011: oversampling + power iterations),
or an exact SVD when the matrix is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ..errors import InputError
from ..formats.adapters import Adapter, LowRank
from .rank_rule import TIE, RankChoice, RankRule, choose_rank, kept_fraction, lost_fraction  # noqa: F401 (re-exported)
from .svd_sign import pair_factors

F64 = torch.float64


@dataclass
class Factored:
    """``ΔW ≈ up @ down`` with the singular values of ΔW, largest first.

    ``up = U·diag(S)`` and ``down = Vᵀ`` (all singular values in up, as kohya writes them).
    """

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in·kh·kw)
    singular_values: torch.Tensor  # (k,) float64

    def truncated(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-j factors ``(U_j·S_j, V_jᵀ)``."""
        return self.up[:, :j], self.down[:j]


def _sqrt_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R, E, λ)`` with ``RᵀR = gram``, ``R = diag(√λ) Eᵀ``; eigenvalues below rounding set to 0."""
    lam, vec = torch.linalg.eigh(gram)
    # eigh's rounding is ~eps·λmax per eigenvalue; anything below k·eps·λmax is a zero direction
    floor = float(lam.abs().max()) * gram.shape[0] * torch.finfo(gram.dtype).eps
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    return lam.sqrt()[:, None] * vec.t(), vec, lam


@dataclass
class ProductSVD:
    """The SVD of ``ΔW = up @ down`` held in factor space; :meth:`truncated` builds the top-j factors.

    Two k×k maps lead from the factors to the singular vectors (see :func:`product_svd`): the
    Cholesky route keeps ``chol`` (L) and ``vectors`` (E) with ``U = up·L⁻ᵀ·E`` and
    ``S·Vᵀ = Eᵀ·Lᵀ·down``; the eigh route keeps ``right`` with ``V = downᵀ·right``. Only the j
    columns asked for are ever multiplied out.
    """

    up: torch.Tensor  # (out, k) float64
    down: torch.Tensor  # (k, in) float64
    singular_values: torch.Tensor  # (k,) float64, largest first
    chol: torch.Tensor | None = None  # (k, k) lower: up·upᵀ Gram = L·Lᵀ
    vectors: torch.Tensor | None = None  # (k, k): eigenvectors of Lᵀ·G_d·L, largest first
    right: torch.Tensor | None = None  # (k, k): V = downᵀ·right

    def truncated(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_j·S_j, V_jᵀ)`` in float64: the optimal rank-j approximation ``up_j @ down_j``."""
        if self.chol is not None and self.vectors is not None:
            e = self.vectors[:, :j]
            s_vt = (e.t() @ self.chol.t()) @ self.down  # Uᵀ·ΔW = S·Vᵀ, no inverse needed
            u = self.up @ torch.linalg.solve_triangular(self.chol.t(), e, upper=True)  # up·L⁻ᵀ·E
            s = self.singular_values[:j]
            inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(F64).tiny), torch.zeros_like(s))
            return u * s, s_vt * inv[:, None]
        v = self.down.t() @ self.right[:, :j]  # type: ignore[index]  # (in, j) orthonormal right vectors
        return self.up @ (self.down @ v), v.t()  # ΔW·V = U·S


def product_svd(up: torch.Tensor, down: torch.Tensor) -> ProductSVD:
    """The singular values of ``up @ down`` and the k×k maps to its singular vectors; float64.

    Gram route: ``upᵀ·up = L·Lᵀ`` (Cholesky) gives ``up = Q·Lᵀ`` with orthonormal ``Q = up·L⁻ᵀ``,
    so ``ΔW·ΔWᵀ = Q·(Lᵀ·G_d·L)·Qᵀ`` with ``G_d = down·downᵀ``; the eigen-decomposition of that k×k
    matrix gives σ² and the left singular vectors ``Q·E``. A rank-deficient ``up`` (an untrained
    module has ``up = 0``) has no Cholesky factor; then both Gram matrices are factored by eigh
    (zero directions dropped) and the k×k core ``R_u·R_dᵀ`` is SVD'd.
    """
    up, down = up.to(F64), down.to(F64)
    gram_up = up.t() @ up
    gram_down = down @ down.t()
    # every factor entry is squared into one diagonal entry (float64 cannot overflow on squares of
    # float32 values), so this O(k) test finds any NaN/inf the O(n·k) elementwise one would
    if not bool(torch.isfinite(gram_up.diagonal().sum() + gram_down.diagonal().sum())):
        raise InputError("its factors hold NaN or inf")
    chol, info = torch.linalg.cholesky_ex(gram_up)
    if int(info) == 0 and float(chol.diagonal().min()) > float(chol.diagonal().max()) * 1e-6:
        # well conditioned (cond(up) < 1e6, so cond(Gram) < 1e12 in float64): eigh of Lᵀ·G_d·L = E·Σ²·Eᵀ
        t = chol.t() @ gram_down @ chol
        lam, vec = torch.linalg.eigh((t + t.t()) / 2)
        lam, vec = lam.flip(0), vec.flip(1)
        # σ² below eigh's rounding (k·eps·σ₀²) is a zero singular value, not a tiny one
        lam = torch.where(lam > float(lam[0]) * lam.numel() * torch.finfo(F64).eps, lam, torch.zeros_like(lam))
        return ProductSVD(up, down, lam.sqrt(), chol=chol, vectors=vec)
    ru, _, _ = _sqrt_factor(gram_up)
    rv, ev, lv = _sqrt_factor(gram_down)
    _, s, vch = torch.linalg.svd(ru @ rv.t())
    # V = Qv·Vc with Qv = downᵀ·Ev·Λv^-½ (zero directions of down dropped: ΔW has no energy there)
    inv = torch.where(lv > 0, lv.clamp_min(torch.finfo(F64).tiny).rsqrt(), torch.zeros_like(lv))
    return ProductSVD(up, down, s, right=(ev * inv) @ vch.t())


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Factored:
    """SVD of ``up @ down`` (up ``(out, k)``, down ``(k, in)``) through the k×k core; float64.

    A truncation of the result to its first j columns/rows is the optimal rank-j approximation.
    Never forms the dense ``out × in`` matrix unless k exceeds ``min(out, in)``, where the dense
    matrix is no larger than the factors. (:func:`product_svd` builds only the columns needed.)
    """
    k = up.shape[1]
    if k > min(up.shape[0], down.shape[1]):  # wider than the matrix: the dense matrix is the small one
        u, s, vh = torch.linalg.svd(up.to(F64) @ down.to(F64), full_matrices=False)
        return Factored(u * s, vh, s)
    core = product_svd(up, down)
    new_up, new_down = core.truncated(k)
    return Factored(new_up, new_down, core.singular_values)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    power_iterations: int = 2,
    seed: int = 0,
) -> Factored:
    """The top ``rank`` (+ oversampling) singular triplets of a dense matrix, randomized.

    Halko, Martinsson & Tropp (2011), Alg. 4.4: a Gaussian sketch ``Y = A·Ω`` of width
    ``l = rank + oversample``, ``power_iterations`` rounds of ``Y = A·(Aᵀ·Q)`` with
    re-orthonormalization between (so the small singular values do not drown the subspace), then
    the exact SVD of the small ``l × n`` projection ``QᵀA``. Returns ``l`` triplets (callers
    truncate); when ``l`` is not much smaller than the matrix the exact SVD is used instead.
    Matrix products run in the matrix's dtype (float32), the small SVD in float64.
    """
    a = matrix if matrix.is_floating_point() else matrix.float()
    m, n = a.shape
    width = min(rank + oversample, m, n)
    if 2 * width >= min(m, n):  # a sketch would cost as much as the exact SVD
        u, s, vh = torch.linalg.svd(a.to(F64), full_matrices=False)
        return Factored(u * s, vh, s)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(a.t() @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = (q.t() @ a).to(F64)  # (width, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return Factored((q.to(F64) @ ub) * s, vh, s)


def _pair_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·S, Vh)`` of ``up @ down`` by :func:`svd_of_product` (a LoKr half stored low-rank)."""
    factored = svd_of_product(up, down)
    return factored.up, factored.down


def factorize(
    adapter: Adapter, *, include_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """An exact ``ΔW = up @ down`` (float32; float64 for float64 factors) and ΔW's shape, for any kind.

    ``include_scale=False`` leaves a plain LoRA's ``alpha/r`` out and returns its factors as stored
    (their own dtype; ``up @ down`` is then the raw product); other kinds always include their scale.
    Each kind's :meth:`~loratools.formats.adapters.AdapterKind.product_factors` does the work
    (LoHa: Khatri–Rao, rank ≤ r²; LoKr: Kronecker of each half's SVD, the low-rank halves through
    :func:`svd_of_product`); Tucker and full diffs give the dense ΔW (``down`` None then).
    A DoRA module raises InputError: its ΔW depends on the base weight.
    """
    if adapter.dora_scale is not None:
        raise InputError("a DoRA module's ΔW depends on the base weight; merge it into a checkpoint instead")
    return adapter.product_factors(include_scale, svd=_pair_svd)


SVD = Union[ProductSVD, Factored]  # noqa: UP007 (a runtime alias)


def matrix_svd(up: torch.Tensor, down: torch.Tensor | None) -> SVD:
    """The SVD of ``up @ down`` — in factor space when the inner width is below both dimensions —
    or of ``up`` itself when ``down`` is None (a dense ΔW)."""
    if down is None or up.shape[1] > min(up.shape[0], down.shape[1]):  # dense, or no larger than the factors
        dense = up.to(F64) if down is None else up.to(F64) @ down.to(F64)
        if not bool(torch.isfinite(dense).all()):
            raise InputError("its factors hold NaN or inf")
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        return Factored(u * s, vh, s)
    return product_svd(up, down)


def adapter_svd(adapter: Adapter, *, include_scale: bool = True) -> tuple[SVD, tuple[int, ...]]:
    """The SVD of an adapter's ΔW (see :func:`factorize` for ``include_scale``) and ΔW's shape.

    Raises InputError for a DoRA module or factors holding NaN/inf.
    """
    up, down, shape = factorize(adapter, include_scale=include_scale)
    return matrix_svd(up, down), shape


def factored_svd(adapter: Adapter, *, include_scale: bool = True) -> tuple[Factored, tuple[int, ...]]:
    """The full SVD of an adapter's ΔW as :class:`Factored` (every singular triplet built)."""
    svd, shape = adapter_svd(adapter, include_scale=include_scale)
    if isinstance(svd, Factored):
        return svd, shape
    up, down = svd.truncated(int(svd.singular_values.numel()))
    return Factored(up, down, svd.singular_values), shape


def canonical_pairs(
    up: torch.Tensor, down: torch.Tensor, singular_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loratools.ops.svd_sign.canonical_pairs` on torch factors (the rule decided on numpy
    copies, applied here): the numpy path's sign and zero rule, so both store the same bytes."""
    factors = pair_factors(up.detach().cpu().numpy(), singular_values.detach().cpu().numpy())
    factor = torch.from_numpy(factors).to(device=up.device, dtype=up.dtype)
    return up * factor + 0.0, down * factor[:, None] + 0.0


def lowrank_from(
    svd: SVD,
    k: int,
    shape: tuple[int, ...],
    *,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    canonical: bool = False,
) -> LowRank:
    """The top-k truncation as a LoRA module: ``alpha`` defaults to k (scale 1).

    Conv modules (4-D ``shape``) get the LoCon shapes ``down (k, in, kh, kw)``, ``up (out, k, 1, 1)``.
    ``canonical`` fixes each singular pair's sign (and zeroes σ = 0 pairs) by :func:`canonical_pairs` (resize does, so its
    torch and numpy paths write the same file).
    """
    up, down = svd.truncated(k)
    if canonical:
        up, down = canonical_pairs(up, down, svd.singular_values)
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    out_dtype = dtype or torch.float32
    return LowRank(up.contiguous().to(out_dtype), down.contiguous().to(out_dtype), float(k if alpha is None else alpha))


def to_lowrank(
    adapter: Adapter,
    *,
    rank: int | None = None,
    error: float | None = None,
    dtype: torch.dtype | None = None,
    max_rank: int | None = None,
) -> tuple[LowRank, float]:
    """The best rank-k LoRA approximation of any adapter, and its relative Frobenius error.

    The result has ``alpha = k`` (scale 1, singular values in ``up``); conv modules get the
    LoCon shapes ``down (k, in, kh, kw)``, ``up (out, k, 1, 1)``. ``max_rank`` caps k (the error
    returned is then the error at the cap).
    """
    svd, shape = adapter_svd(adapter)
    k = choose_rank(svd.singular_values, rank=rank, error=error)
    if max_rank is not None:
        k = min(k, max_rank)
    return lowrank_from(svd, k, shape, dtype=dtype), lost_fraction(svd.singular_values, k)
