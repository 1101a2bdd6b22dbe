"""How many singular values to keep: :class:`RankRule` and the retained/lost fractions — no torch.

The rules work on a 1-D array of singular values (numpy, or a torch tensor, converted without a
copy), in float64, so the numpy path of resize/blend (:mod:`.lowrank_np`) and the torch path
(:mod:`.lowrank`) choose by one code. :mod:`.lowrank` re-exports every name here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

ArrayLike = Any  # a numpy array or a torch tensor of singular values


def as_float64(values: ArrayLike) -> np.ndarray:
    """A float64 numpy view/copy of a numpy array or (CPU or not) torch tensor."""
    detach = getattr(values, "detach", None)
    if detach is not None:  # a torch tensor: its float64 CPU copy as numpy (torch already loaded)
        import torch

        return detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


# Two fractions closer than this (relative) count as equal when a rule compares a retained fraction
# with its target: singular values computed in float64 from float32/fp16 factors carry rounding
# far below it, so a target that sits exactly on a boundary (0.75 of [4, 2, 1, 1]) is decided the
# way the rule reads, not by the last bit of a sum.
TIE = 1e-9


@dataclass(frozen=True)
class RankChoice:
    """The rank a rule chose, and what limited it (None: the rule itself)."""

    rank: int
    limited_by: str | None = None  # "max-rank", "min-rank", "available" (fewer values than asked), "zero"


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: one fixed rank, or one dynamic rule with optional bounds.

    - ``rank`` N (``conv_rank`` for k×k conv modules, default N): keep N.
    - ``sv_ratio`` R ≥ 1: keep every σᵢ with ``σ₀/σᵢ < R``, i.e. ``σᵢ > σ₀/R`` (kohya's sv_ratio).
    - ``sv_cumulative`` C ∈ (0, 1]: the smallest k with ``Σ_{i<k} σᵢ ≥ C·Σσ`` (kohya's sv_cumulative).
    - ``sv_fro`` F ∈ (0, 1]: the smallest k with ``‖ΔW_k‖_F ≥ F·‖ΔW‖_F``, i.e.
      ``Σ_{i<k} σᵢ² ≥ F²·Σσ²`` (kohya's sv_fro).
    - ``error`` E ∈ [0, 1): the smallest k with ``‖ΔW − ΔW_k‖_F ≤ E·‖ΔW‖_F`` (``convert --to-lora``).

    Dynamic results are clamped to ``[min_rank, max_rank]``; every result is at least 1 and at most
    the number of singular values there are.
    """

    rank: int | None = None
    conv_rank: int | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None
    sv_cumulative: float | None = None
    error: float | None = None
    min_rank: int | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "sv_ratio", "sv_fro", "sv_cumulative", "error") if getattr(self, n) is not None]
        if len(given) != 1:
            flags = "--rank N, --sv-ratio R, --sv-fro F or --sv-cumulative C"
            if not given:
                raise InputError(f"give a rank rule: {flags}")
            raise InputError(
                f"give one rank rule, not {' and '.join('--' + g.replace('_', '-') for g in given)}",
                hint="bound a dynamic rule with --min-rank/--max-rank",
            )
        for name in ("rank", "conv_rank", "min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"--{name.replace('_', '-')} must be a whole number ≥ 1, got {value!r}")
        if self.conv_rank is not None and self.rank is None:
            raise InputError("--conv-rank goes with --rank (dynamic rules apply to conv modules too)")
        if self.rank is not None and (self.min_rank is not None or self.max_rank is not None):
            raise InputError("--min-rank/--max-rank bound a dynamic rule; with --rank N the rank is N")
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise InputError(f"--min-rank {self.min_rank} is above --max-rank {self.max_rank}")
        if self.sv_ratio is not None and not (self.sv_ratio >= 1 and math.isfinite(self.sv_ratio)):
            raise InputError(f"--sv-ratio is the largest kept σ₀/σᵢ and must be ≥ 1, got {self.sv_ratio}")
        for name in ("sv_fro", "sv_cumulative"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise InputError(f"--{name.replace('_', '-')} is a fraction in (0, 1], got {value}")
        if self.error is not None and not 0 <= self.error < 1:
            raise InputError(f"--error must be in [0, 1), got {self.error}")

    @property
    def dynamic(self) -> str | None:
        """The dynamic rule's name, or None for a fixed rank."""
        for name in ("sv_ratio", "sv_fro", "sv_cumulative", "error"):
            if getattr(self, name) is not None:
                return name
        return None

    @property
    def needs_full_spectrum(self) -> bool:
        """sv_cumulative compares with Σσ over *every* singular value, which no sketch gives."""
        return self.sv_cumulative is not None

    def sketch_rank(self, conv: bool = False) -> int | None:
        """The most singular values this rule can keep (None: unbounded, needs them all)."""
        if self.rank is not None:
            return self.conv_rank if conv and self.conv_rank is not None else self.rank
        return self.max_rank

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}" + (f" (conv {self.conv_rank})" if self.conv_rank is not None else "")
        name = self.dynamic or ""
        text = f"{name.replace('_', '-')} {getattr(self, name):g}"
        bounds = [f"min {self.min_rank}" if self.min_rank else "", f"max {self.max_rank}" if self.max_rank else ""]
        bounds = [b for b in bounds if b]
        return text + (f" ({', '.join(bounds)})" if bounds else "")

    def choose(
        self, singular_values: ArrayLike, *, conv: bool = False, total_energy: float | None = None
    ) -> RankChoice:
        """The rank to keep for these singular values (largest first).

        ``total_energy``: ``‖ΔW‖_F²`` when ``singular_values`` are only the top of the spectrum (a
        randomized sketch); sv_fro and error then compare with the true total.

        Compared with kohya-ss/sd-scripts networks/resize_lora.py (``rank_resize``,
        ``index_sv_*``), the rules mean the same but these edge bugs are avoided:

        - off by one: releases before PR #2194 returned ``searchsorted(…) + 1`` and then added 1
          again (and sv_ratio ``count + 1``), keeping one singular value more than the rule says;
        - rank 1: the index was clamped to ``[1, len−1]``, so a rule satisfied by one singular
          value still kept two; here rank 1 is a valid answer;
        - fewer singular values than asked: ``new_rank`` was capped only by the requested rank, not
          by ``len(S)`` (IndexError, PR #2422), and a fixed rank above a LoRA's rank was padded with
          noise directions of the dense SVD while alpha = scale·new_rank; here the rank is capped
          at the singular values there are and reported as ``limited_by="available"``;
        - zero matrices: ``σ₀ ≤ 1e-6`` (an absolute threshold on the *unscaled* product) made any
          small-valued module rank 1; here only an exactly zero ΔW is "zero" (rank 1 kept, nothing
          lost), and sv_fro/sv_cumulative never divide 0 by 0.
        """
        s = np.maximum(as_float64(singular_values).reshape(-1), 0.0)
        available = int(s.size)
        if available == 0:
            raise InputError("no singular values to choose from")
        if not bool(np.isfinite(s).all()):
            raise InputError("singular values are not finite: the factors hold NaN/inf")
        if self.rank is not None:
            asked = self.conv_rank if conv and self.conv_rank is not None else self.rank
            return RankChoice(asked, None) if asked <= available else RankChoice(available, "available")
        if float(s[0]) == 0.0:
            return RankChoice(min(self.min_rank or 1, available), "zero")
        k = self._dynamic_rank(s, available, total_energy)
        limited: str | None = None
        if self.max_rank is not None and k > self.max_rank:
            k, limited = self.max_rank, "max-rank"
        if self.min_rank is not None and k < self.min_rank:
            k, limited = self.min_rank, "min-rank"
        if k > available:
            k, limited = available, "available"
        return RankChoice(max(1, k), limited)

    def _dynamic_rank(self, s: np.ndarray, available: int, total_energy: float | None) -> int:
        energy = s * s
        total = float(energy.sum()) if total_energy is None else max(float(total_energy), float(energy.sum()))
        if self.sv_ratio is not None:
            threshold = float(s[0]) / self.sv_ratio
            # strictly above σ₀/R (kohya: S > max/target); a tie within TIE is not above
            return max(1, int((s > threshold * (1 + TIE)).sum()))
        if self.sv_cumulative is not None:
            fractions = np.cumsum(s) / float(s.sum())
            return _first_reaching(fractions, self.sv_cumulative, available)
        if self.sv_fro is not None:
            fractions = np.cumsum(energy) / total
            return _first_reaching(fractions, self.sv_fro**2, available)
        # error E: smallest k with tail energy ≤ E²·total; the tail is summed from the small end
        # so that it is exact for the values that decide it
        tail = np.cumsum(energy[::-1])[::-1]  # tail[i] = Σ_{j≥i} σⱼ²
        missing = total - float(energy.sum())  # energy beyond a sketch
        bound = self.error**2 * total * (1 + TIE)  # type: ignore[operator]
        for k in range(1, available + 1):
            rest = (float(tail[k]) if k < available else 0.0) + missing
            if rest <= bound:
                return k
        return available


def _first_reaching(fractions: np.ndarray, target: float, available: int) -> int:
    """The smallest k ≥ 1 with ``fractions[k-1] ≥ target`` (ties within TIE count as reached)."""
    reached = np.flatnonzero(fractions >= target * (1 - TIE))
    return int(reached[0]) + 1 if reached.size else available


def choose_rank(singular_values: ArrayLike, *, rank: int | None = None, error: float | None = None) -> int:
    """Rank to keep: ``rank`` (capped by what exists), or the smallest whose relative Frobenius
    error ``‖ΔW − ΔW_k‖ / ‖ΔW‖`` is at most ``error``. At least 1."""
    if rank is None and error is None:
        raise InputError("give a rank or an error bound")
    rule = RankRule(rank=rank) if rank is not None else RankRule(error=error)
    return rule.choose(singular_values).rank


def kept_fraction(singular_values: ArrayLike, k: int, total_energy: float | None = None) -> float:
    """``‖ΔW_k‖_F / ‖ΔW‖_F`` for the top-k truncation (1.0 for a zero matrix: nothing is lost)."""
    energy = as_float64(singular_values).reshape(-1) ** 2
    total = float(energy.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(float(energy[:k].sum()) / total))


def lost_fraction(singular_values: ArrayLike, k: int, total_energy: float | None = None) -> float:
    """``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` for the top-k truncation, summed from the small end (0.0 for a zero matrix)."""
    energy = as_float64(singular_values).reshape(-1) ** 2
    kept = float(energy[:k].sum())
    total = float(energy.sum()) if total_energy is None else max(float(total_energy), kept)
    if total <= 0.0:
        return 0.0
    rest = float(energy[k:].sum()) + (total - float(energy.sum()) if total_energy is not None else 0.0)
    return min(1.0, math.sqrt(max(0.0, rest) / total))


def rank_tally(ranks: Iterable[int | None]) -> dict[str, int]:
    """How many modules have each rank, ranks ascending, full modules (rank None) last as "full".

    The one spelling of a report's ``ranks_after`` (resize and blend, human and --json): a full
    diff has no rank, and "None" as a JSON key read like a missing value.
    """
    counts = Counter(ranks)
    tally = {str(rank): counts[rank] for rank in sorted(r for r in counts if r is not None)}
    if None in counts:
        tally["full"] = counts[None]
    return tally
