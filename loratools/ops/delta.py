"""The ΔW engine: weight updates of many modules at once, batched by shape, on CPU or GPU.

A merge patches hundreds of modules, most of them plain low-rank ones whose shapes repeat (every
``to_q`` of a block level has the same ``(out, in, rank)``). Computing them one ``up @ down`` at a
time wastes most of the time on dispatch; here the modules of one shape are stacked and patched with
one ``baddbmm`` — ``W' = W + U·D`` for the whole group, the add fused into the matmul. Several LoRAs
on one module are one product too: their factors are concatenated along the rank axis,
``[s₁U₁ | s₂U₂] @ [D₁; D₂] = s₁U₁D₁ + s₂U₂D₂``, so N LoRAs cost one matmul of rank Σrᵢ.

Everything is float32: factors and base weights are upcast, the sum is rounded once, to the output
dtype. LoHa products are batched too; LoKr, Tucker and full-diff modules are rare enough to go one
at a time. DoRA is applied last, per module, because its magnitude renormalises the whole row.

On a GPU the base weights travel in their file dtype (half the bytes of fp32) through pinned host
memory, ΔW never leaves the device, and the patched weight comes back already rounded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import threads
from ..errors import InputError
from ..formats.adapters import Adapter, Full, LoHa, LowRank, apply_dora

DEFAULT_BUDGET = 128 * 2**20  # bytes of float32 work per window (and per batched matmul)


@dataclass(frozen=True)
class Term:
    """One adapter's contribution to one tensor: ``strength · ΔW`` (``bias``: Full.diff_b to the bias)."""

    adapter: Adapter
    strength: float
    bias: bool = False

    @property
    def is_dora(self) -> bool:
        return not self.bias and getattr(self.adapter, "dora_scale", None) is not None


@dataclass
class Job:
    """A tensor to patch: its current value (any float dtype, canonical shape) and the terms to add."""

    weight: torch.Tensor
    terms: Sequence[Term]
    out_dtype: torch.dtype | None = None  # None: the weight's own dtype
    reuse: bool = False  # the weight's memory is the caller's to give: same-dtype results are written into it


# dtypes with at most 8 mantissa bits: rounding W + ΔW to them can lose a visible share of a
# small ΔW (an fp8 e4m3 weight moves in steps of 1/8 of its magnitude), so merges report it.
COARSE_DTYPES = frozenset(
    d
    for d in (torch.bfloat16, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
    if d is not None
)


def _sq_distance(exact: torch.Tensor, other: torch.Tensor) -> float:
    """‖exact − other‖_F² in float64 (``other`` upcast on ``exact``'s device, any shape of the same size)."""
    diff = exact.reshape(-1) - other.reshape(-1).to(exact.device, torch.float32)
    return float(torch.linalg.vector_norm(diff, dtype=torch.float64).square())


# elements per slice of the measured rounding: 1 MiB of float32 scratch, cache-resident, so the
# upcasts, differences and norms of a slice cost no trip to memory.
ROUND_CHUNK = 1 << 18


def round_measured(exact: torch.Tensor, base: torch.Tensor, dest: torch.Tensor) -> tuple[float, float]:
    """Rounds ``exact`` (float32) into ``dest`` and returns ``(‖dest − exact‖², ‖exact − base‖²)``.

    One pass over the tensors, slice by slice: each slice of ``base`` is read (upcast into a small
    scratch) before the same slice of ``dest`` is written, so ``dest`` may be ``base``'s own memory.
    The rounding is ``copy_``'s, bit for bit ``exact.to(dest.dtype)``. Each slice's squared norm
    is a float32 ``dot`` (BLAS, vectorised: 6× faster than ``vector_norm(dtype=float64)``, which
    converts every element) and the slices are summed in float64: the two figures are reported
    to three digits, and a 2^18-element float32 dot is good to ~1e-6 relative. All three tensors
    hold the same number of elements; ``dest`` is contiguous.
    """
    flat = exact.reshape(-1)
    old = base.reshape(-1)
    out = dest.view(-1)
    scratch = torch.empty(min(ROUND_CHUNK, flat.numel()), dtype=torch.float32, device=flat.device)
    lost = torch.zeros((), dtype=torch.float64, device=flat.device)
    delta = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), ROUND_CHUNK):
        stop = min(start + ROUND_CHUNK, flat.numel())
        piece, work = flat[start:stop], scratch[: stop - start]
        work.copy_(old[start:stop]).sub_(piece)  # −ΔW, read before dest (maybe base) is written
        delta += torch.dot(work, work)
        out[start:stop].copy_(piece)
        work.copy_(out[start:stop]).sub_(piece)
        lost += torch.dot(work, work)
    return float(lost), float(delta)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; ``"cuda"`` without a GPU is a one-line error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


def cpu_threads(jobs: Mapping[str, Job]) -> int:
    """Intra-op threads for one CPU call (loratools/threads.py decides from the free cores).

    The batched products split along the output rows, never along the rank, and the rest is
    elementwise, so their bits are the same on any thread count; a DoRA row norm is a reduction
    whose order could follow the threads, so a call with DoRA terms runs on one thread.
    """
    if any(t.is_dora for job in jobs.values() for t in job.terms):
        return 1
    flops = 0
    for job in jobs.values():
        out, inp = _flat(job.weight.shape)
        flops += out * inp * max(1, sum(int(getattr(t.adapter, "rank", 1) or 1) for t in job.terms))
    return threads.gemm_threads(flops)


def _flat(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), math.prod(int(s) for s in shape[1:]) if len(shape) > 1 else 1


def _lowrank_factors(terms: Sequence[Term], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(U, D)`` with ``U @ D = Σ strength·scale·up@down`` over plain LowRank terms, or None."""
    plain = [
        t for t in terms if isinstance(t.adapter, LowRank) and t.adapter.mid is None and not t.is_dora and not t.bias
    ]
    if not plain:
        return None
    out, inp = _flat(shape)
    ups, downs = [], []
    for term in plain:
        a = term.adapter
        assert isinstance(a, LowRank)
        down = a.down.reshape(a.rank, -1)
        if down.shape[1] != inp or a.up.shape[0] != out:
            raise InputError(f"a rank-{a.rank} factor pair of ΔW {a.delta_shape()} does not fit a weight {shape}")
        ups.append(a.up.to(torch.float32).reshape(out, a.rank) * (a.scale * term.strength))
        downs.append(down.to(torch.float32))
    if len(ups) == 1:
        return ups[0], downs[0]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _is_batched_loha(term: Term) -> bool:
    a = term.adapter
    return isinstance(a, LoHa) and a.t1 is None and not term.is_dora and not term.bias


def _single_delta(term: Term, shape: tuple[int, ...]) -> torch.Tensor:
    """One term's ΔW (float32, flattened to (out, in·k·k)) the unbatched way."""
    a = term.adapter
    if term.bias:
        assert isinstance(a, Full) and a.diff_b is not None
        delta = a.diff_b.to(torch.float32)
    else:
        delta = a.delta()
    if delta.numel() != math.prod(shape):
        raise InputError(f"a {a.kind} ΔW {tuple(delta.shape)} does not fit a weight {shape}")
    return delta.reshape(_flat(shape)) * term.strength


@dataclass
class _Group:
    """Jobs sharing one factor shape, computed by one batched matmul per chunk."""

    names: list[str] = field(default_factory=list)
    lefts: list[torch.Tensor] = field(default_factory=list)
    rights: list[torch.Tensor] = field(default_factory=list)
    extra: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # LoHa's second product


class DeltaEngine:
    """Computes ΔW and patched weights for many tensors, batched by shape, within a memory budget.

    ``device``: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``. ``budget``: bytes of
    float32 work per batched matmul; larger groups are split into chunks.
    """

    def __init__(self, device: str | torch.device | None = "auto", budget: int = DEFAULT_BUDGET) -> None:
        self.device = resolve_device(device)
        self.budget = max(int(budget), 1)
        self.cuda = self.device.type == "cuda"
        # float32 scratch reused from call to call: fresh buffers this large come from mmap, and
        # faulting their pages in costs as much as the upcast that fills them.
        self._workspace = torch.empty(0, dtype=torch.float32, device=self.device)
        # name → (‖rounded − exact‖², ‖ΔW‖², dtype) of every patched tensor rounded to a dtype with at
        # most 8 mantissa bits (bf16, fp8): how much of ΔW the stored weights kept.
        self.rounding: dict[str, tuple[float, float, torch.dtype]] = {}

    # -- public ------------------------------------------------------------------------------------
    def deltas(
        self, jobs: Mapping[str, tuple[tuple[int, ...], Sequence[Term]]], *, on_device: bool = False
    ) -> dict[str, torch.Tensor]:
        """ΔW (float32, in each given shape) of every job: ``name → (shape, terms)``; on the CPU
        unless ``on_device``."""
        zeros = {
            name: Job(torch.zeros((), dtype=torch.float32).expand(shape), terms, torch.float32)
            for name, (shape, terms) in jobs.items()
        }
        return self._run(zeros, add_base=False, to_host=not on_device)

    def patch(self, jobs: Mapping[str, Job]) -> dict[str, torch.Tensor]:
        """``W + Σ strength·ΔW`` for every job, rounded once to its output dtype, on the CPU.

        DoRA terms are applied after the additive ones, in the order given.
        """
        return self._run(jobs, add_base=True)

    # -- the work -----------------------------------------------------------------------------------
    def _run(self, jobs: Mapping[str, Job], add_base: bool, to_host: bool = True) -> dict[str, torch.Tensor]:
        if not self.cuda:
            with threads.torch_threads(cpu_threads(jobs)):
                return self._compute(jobs, add_base, to_host)
        # The merge math is float32: TF32 tensor-core matmuls (10-bit mantissa) are switched off
        # for the call, whatever the process enabled.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return self._compute(jobs, add_base, to_host)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def _compute(self, jobs: Mapping[str, Job], add_base: bool, to_host: bool) -> dict[str, torch.Tensor]:
        groups: dict[tuple, _Group] = defaultdict(_Group)
        rest: dict[str, list[Term]] = {}
        for name, job in jobs.items():
            shape = tuple(job.weight.shape)
            additive = [t for t in job.terms if not t.is_dora]
            factors = _lowrank_factors(additive, shape)
            if factors is not None:
                u, d = factors
                rows, cols = _flat(shape)
                group = groups[("lowrank", rows, cols, u.shape[1])]
                group.names.append(name)
                group.lefts.append(u)
                group.rights.append(d)
            for term in additive:
                if _is_batched_loha(term):
                    a = term.adapter
                    assert isinstance(a, LoHa)
                    rows, cols = _flat(shape)
                    key = ("loha", rows, cols, a.w1b.shape[0], a.w2b.shape[0])
                    group = groups[key]
                    group.names.append(name)
                    group.lefts.append(a.w1a.to(torch.float32).reshape(rows, -1) * (a.scale * term.strength))
                    group.rights.append(a.w1b.to(torch.float32).reshape(a.w1b.shape[0], -1))
                    group.extra.append(
                        (a.w2a.to(torch.float32).reshape(rows, -1), a.w2b.to(torch.float32).reshape(a.w2b.shape[0], -1))
                    )
                elif factors is None or not (
                    isinstance(term.adapter, LowRank) and term.adapter.mid is None and not term.bias
                ):
                    rest.setdefault(name, []).append(term)

        # float32 accumulators (flattened to 2-D) on the device. A job whose only additive work is one
        # low-rank product starts life inside its group's batch buffer: W is upcast straight into it
        # and the matmul adds onto it in place (no separate ΔW tensor, no extra pass).
        in_groups: dict[str, int] = defaultdict(int)
        for group in groups.values():
            for name in group.names:
                in_groups[name] += 1
        owned = {
            name
            for key, group in groups.items()
            if key[0] == "lowrank"
            for name in group.names
            if in_groups[name] == 1 and name not in rest
        }
        acc: dict[str, torch.Tensor] = {}
        for name, job in jobs.items():
            if name not in owned:
                acc[name] = self._start(job.weight, add_base)

        # Results of owned jobs live in the workspace until they are rounded below, so the arena
        # holds all of them; it only grows (the merge keeps a call within its window budget).
        arena = self._arena(sum(math.prod(_flat(jobs[n].weight.shape)) for n in owned))
        for key, group in groups.items():
            arena = self._run_group(
                key, group, acc, {n: jobs[n].weight for n in group.names if n in owned}, add_base, arena
            )
        for name, terms in rest.items():
            shape = tuple(jobs[name].weight.shape)
            for term in terms:
                acc[name] += _single_delta(term, shape).to(self.device)

        out: dict[str, torch.Tensor] = {}
        for name, job in jobs.items():
            shape = tuple(job.weight.shape)
            result = acc.pop(name).reshape(shape)
            for term in job.terms:
                if term.is_dora:
                    if not add_base:
                        raise InputError("a DoRA module's ΔW depends on the base weight; it can only be merged")
                    result = apply_dora(result, term.adapter, term.strength)
            dtype = job.out_dtype or job.weight.dtype
            measured = add_base and dtype in COARSE_DTYPES
            reuse = job.reuse and not self.cuda and dtype == job.weight.dtype and job.weight.is_contiguous()
            if measured and not self.cuda:
                # Rounding and measuring in one pass over cache-sized slices (issue 18 item 5: the
                # whole-tensor form, two more float32 passes and float64 norms, cost more than the rest
                # of a bf16 merge together); into the weight's own pages when they are ours to give.
                dest = job.weight if reuse else torch.empty(job.weight.shape, dtype=dtype)
                lost_sq, delta_sq = round_measured(result, job.weight, dest)
                self.rounding[name] = (lost_sq, delta_sq, dtype)
                out[name] = dest
                continue
            delta_sq = _sq_distance(result, job.weight) if measured else 0.0  # before W's memory is reused
            if reuse:
                # Rounding into the weight's own (already faulted-in) pages instead of fresh ones.
                out[name] = job.weight.view(result.shape).copy_(result).view(job.weight.shape)
            else:
                out[name] = self._finish(result, dtype, to_host)
            if measured:  # rounded again here: on a GPU the copy above is still in flight
                self.rounding[name] = (_sq_distance(result, result.to(dtype)), delta_sq, dtype)
        if self.cuda and to_host:
            torch.cuda.current_stream(self.device).synchronize()  # the pinned copies have landed
        return out

    def _arena(self, numel: int) -> torch.Tensor:
        if self._workspace.numel() < numel:
            self._workspace = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._workspace[:numel]

    def _upload(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight flattened to 2-D on the device, still in its own dtype."""
        flat = weight.reshape(_flat(weight.shape))
        if self.cuda:
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return flat

    def _start(self, weight: torch.Tensor, add_base: bool) -> torch.Tensor:
        if not add_base:
            return torch.zeros(_flat(weight.shape), dtype=torch.float32, device=self.device)
        return self._upload(weight).to(torch.float32, copy=True)

    def _finish(self, result: torch.Tensor, dtype: torch.dtype, to_host: bool) -> torch.Tensor:
        rounded = result.to(dtype, copy=True)  # never hand out a view of the reused workspace
        if self.cuda and to_host:
            host = torch.empty(rounded.shape, dtype=dtype, pin_memory=True)
            host.copy_(rounded, non_blocking=True)  # queued behind the compute; synchronised once in _run
            return host
        return rounded

    def _run_group(
        self,
        key: tuple,
        group: _Group,
        acc: dict[str, torch.Tensor],
        owned: Mapping[str, torch.Tensor],
        add_base: bool,
        arena: torch.Tensor,
    ) -> torch.Tensor:
        """Runs one group; owned jobs' buffers are carved from the front of ``arena``, the rest is returned."""
        kind, out, inp = key[0], key[1], key[2]
        per_item = out * inp * 4 * (2 if kind == "loha" else 1)
        chunk = max(1, self.budget // max(per_item, 1))
        for start in range(0, len(group.names), chunk):
            names = group.names[start : start + chunk]
            lefts = self._to_device(torch.stack(group.lefts[start : start + chunk]))
            rights = self._to_device(torch.stack(group.rights[start : start + chunk]))
            if kind == "lowrank":
                if all(name in owned for name in names):
                    size = len(names) * out * inp
                    buffer, arena = arena[:size].view(len(names), out, inp), arena[size:]
                else:
                    buffer = torch.empty((len(names), out, inp), dtype=torch.float32, device=self.device)
                for i, name in enumerate(names):
                    if name in owned and add_base:
                        buffer[i].copy_(self._upload(owned[name]))
                    else:
                        buffer[i].zero_()
                buffer.baddbmm_(lefts, rights)  # W + U·D, the whole chunk in one call
                for i, name in enumerate(names):
                    if name in owned:
                        acc[name] = buffer[i]
                    else:
                        acc[name] += buffer[i]
            else:  # LoHa: (w1a·s @ w1b) ⊙ (w2a @ w2b)
                second_l = self._to_device(torch.stack([e[0] for e in group.extra[start : start + chunk]]))
                second_r = self._to_device(torch.stack([e[1] for e in group.extra[start : start + chunk]]))
                products = torch.bmm(lefts, rights).mul_(torch.bmm(second_l, second_r))
                for i, name in enumerate(names):
                    acc[name] += products[i]
        return arena

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)
