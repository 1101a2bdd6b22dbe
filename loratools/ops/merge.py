"""Bake LoRAs into a checkpoint, or take them back out, streamed from file to file.

The base is never loaded whole. Its tensors are walked in output order: an untouched tensor is
copied as raw bytes; a patched one is read, patched in float32 by the ΔW engine together with its
neighbours (one batched matmul per shape), rounded once to its own dtype (or ``dtype``) and
written. A second thread computes the next window while this one writes, so the arithmetic hides
behind the I/O. Peak memory is two windows, never the checkpoint.

``unmerge`` is the same walk with every strength negated: in float32, ``(W + ΔW) − ΔW`` returns W up
to the rounding of the merged file.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError, OutputError
from ..families import keymap
from ..families.detect import Detection, detect
from ..families.keymap import KeyMap
from ..formats.adapters import Full, LoraFile, all_finite, apply_dora
from ..formats.io import load_lora
from ..formats.scan import ParamRef
from ..io.atomic import AtomicFolder
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.safetensors import StreamingWriter
from ..io.source import Source
from .blocks import parse_block_weights
from .checkpoint import CanonicalSource, write_folder
from .delta import DEFAULT_BUDGET, DeltaEngine, Job, Term
from .merge_plan import (
    SCHEMA,
    Entry,
    Executor,
    LoraInput,
    LoraMatch,
    MergeReport,
    Outputs,
    Planned,
    PlannedTerm,
    Request,
    check_text_weights,
    component_of,
    index_text,
    modelspec_hash_key,
    module_strength,
    parse_lora_arg,
    per_module_options,
    run,
)
from .rescale import rescale_adapter

__all__ = [
    "SCHEMA",
    "LoraInput",
    "LoraMatch",
    "MergeReport",
    "check_text_weights",
    "merge",
    "module_strength",
    "parse_lora_arg",
    "per_module_options",
    "rewrite",
    "unmerge",
    "weighted_lora",
]

FP16_MAX = 65504.0
Progress = Callable[[int], None]

ROUNDING_WARN = 0.05


def _report_rounding(report: MergeReport, rounding: Mapping[str, tuple[float, float, torch.dtype]]) -> None:
    """Per component: ``lost`` = ‖round(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F over its patched tensors,
    and the worst tensor; a warning where more than :data:`ROUNDING_WARN` of ΔW is lost."""
    sums: dict[str, list[float]] = {}
    worst: dict[str, tuple[float, str]] = {}
    dtypes: dict[str, set[torch.dtype]] = {}
    for name, (lost_sq, delta_sq, dtype) in rounding.items():
        component = component_of(name)
        dtypes.setdefault(component, set()).add(dtype)
        total = sums.setdefault(component, [0.0, 0.0])
        total[0] += lost_sq
        total[1] += delta_sq
        share = math.sqrt(lost_sq / delta_sq) if delta_sq else 0.0
        if share >= worst.get(component, (-1.0, ""))[0]:
            worst[component] = (share, name)
    for component, (lost_sq, delta_sq) in sums.items():
        lost = math.sqrt(lost_sq / delta_sq) if delta_sq else 0.0
        share, name = worst[component]
        stored = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes[component]))
        report.rounding[component] = {"dtype": stored, "lost": lost, "worst": name, "worst_lost": share}
        if lost > ROUNDING_WARN:
            better = (
                "--dtype fp32 keeps all of it"
                if dtypes[component] == {torch.bfloat16}
                else "--dtype bf16 keeps most of it, --dtype fp32 all"
            )
            report.warnings.append(
                f"rounding the merged {component} to {stored} loses {lost:.1%} of ΔW "
                f"(worst {name}: {share:.1%}); {better}"
            )


def weighted_lora(lora_input: LoraInput, lora: LoraFile) -> LoraFile:
    """``lora`` with each module's ΔW scaled by the strength ``lora_input`` gives it, ``weight``
    included (what blend adds for a ``PATH:unet=…,lbw=…`` input); modules at strength 1 are kept
    as they are."""
    spec = lora.family
    if spec is None:
        raise InputError(f"{Path(lora_input.name).name}: per-module weights need a LoRA of a known family")
    check_text_weights(lora_input, spec)
    blocks = lora_input.blocks
    if isinstance(blocks, str):
        blocks = parse_block_weights(blocks, spec, lora_input.blocks_from)
    adapters = {}
    for module, adapter in lora.adapters.items():
        strength = module_strength(lora_input, module, blocks, spec)
        adapters[module] = adapter if strength == 1.0 else rescale_adapter(adapter, strength)[0]
    return replace(lora, adapters=adapters)


def _windows(entries: Sequence[Entry], budget: int) -> list[list[Entry]]:
    """Consecutive runs of entries whose patched tensors hold at most ``budget`` bytes of float32."""
    windows: list[list[Entry]] = [[]]
    load = 0
    for entry in entries:
        cost = entry.info.numel * 4 if entry.patched else 0
        if cost and load and load + cost > budget:
            windows.append([])
            load = 0
        windows[-1].append(entry)
        load += cost
    return [w for w in windows if w]


# -- the walk ---------------------------------------------------------------------------------------------
@dataclass
class _Residual:
    sq_diff: float = 0.0
    sq_base: float = 0.0
    max_abs: float = 0.0


class _Merger:
    """Computes the patched tensors of a window (in a worker thread) and writes windows in order."""

    def __init__(
        self,
        ckpt: Checkpoint,
        km: KeyMap,
        layout: str,
        out_layout: str,
        terms: Mapping[str, list[Term]],
        engine: DeltaEngine,
        report: MergeReport,
        progress: Progress | None,
        base: tuple[CanonicalSource, str] | None,
    ) -> None:
        self.ckpt, self.km, self.layout, self.out_layout = ckpt, km, layout, out_layout
        self.terms, self.engine, self.report, self.progress = terms, engine, report, progress
        self.reader = CanonicalSource(ckpt, km, layout)  # the worker's own (its decode cache is not shared)
        self.writer_source = CanonicalSource(ckpt, km, layout)
        self.base = base
        # Tensors read from safetensors are fresh buffers, ours to round the result into; a pickle's
        # tensors are the loaded state dict itself and must stay as they are.
        self.reusable = all(ckpt.raw(key) is not None for key in ckpt)
        self.residual: dict[str, _Residual] = {}
        self.overflow: list[tuple[str, torch.dtype]] = []  # tensors the merge itself made NaN/inf
        self.carried: list[str] = []  # patched tensors whose base already held NaN/inf
        self.late: Callable[[], list[tuple[str, str]]] | None = None  # header values known at the end

    def compute(self, window: Sequence[Entry]) -> dict[str, torch.Tensor]:
        jobs: dict[str, Job] = {}
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for entry in window:
            if not entry.patched:
                continue
            parts = {p: self.reader.canonical(p) for p in entry.parts}
            pieces[entry.layout_key] = parts
            for p, tensor in parts.items():
                if p in self.terms:
                    jobs[p] = Job(tensor, self.terms[p], entry.info.torch_dtype, reuse=self.reusable)
        patched = self.engine.patch(jobs)
        out = {}
        for entry in window:
            if not entry.patched:
                continue
            dtype = entry.info.torch_dtype
            parts = {p: patched[p] if p in patched else t.to(dtype) for p, t in pieces[entry.layout_key].items()}
            for p in parts:
                if p in patched:
                    self._check(p, patched[p])
            out[entry.layout_key] = self.km.join(self.out_layout, entry.layout_key, parts).contiguous()
        if self.overflow:
            name, dtype = self.overflow[0]
            if all(d == torch.float16 for _, d in self.overflow):
                raise InputError(
                    f"the merge overflows float16 in {len(self.overflow)} tensors (e.g. {name}); nothing was written",
                    hint="lower the LoRA weights, or write --dtype bf16 / fp32",
                )
            raise InputError(
                f"the merge gives NaN or inf in {len(self.overflow)} tensors (e.g. {name}, "
                f"{str(dtype).removeprefix('torch.')}): ΔW overflows; nothing was written",
                hint="check the LoRAs' alphas and weights",
            )
        return out

    def _check(self, name: str, result: torch.Tensor) -> None:
        # Every patched result is checked, whatever its dtype: a float32 ΔW can overflow as well as
        # a float16 sum, and a non-finite weight must never be written silently. NaN/inf that the
        # base already held are carried (it is the base's) and said.
        if result.is_floating_point() and not all_finite(result):
            if self._base_finite(name):
                self.overflow.append((name, result.dtype))
            else:
                self.carried.append(name)
        if self.base is not None:
            source, _ = self.base
            reference = source.canonical(name).to(torch.float32)
            diff = result.to(torch.float32) - reference.reshape(result.shape)
            stats = self.residual.setdefault(component_of(name), _Residual())
            stats.sq_diff += float(diff.double().square().sum())
            stats.sq_base += float(reference.double().square().sum())
            stats.max_abs = max(stats.max_abs, float(diff.abs().max()) if diff.numel() else 0.0)

    def _base_finite(self, name: str) -> bool:
        """Whether the base tensor is free of NaN/inf (read again: the patch may have reused its memory)."""
        key = self.reader.home[name]
        return all_finite(self.km.split(self.layout, key, self.ckpt.read(key))[name])

    def write_file(
        self,
        path: Path,
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None,
        overwrite: bool,
        check: Callable[[Path], None] | None = None,
    ) -> None:
        plan = {e.key: e.info for e in entries}
        windows = _windows(entries, self.engine.budget) or [[]]
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-delta") as pool,
            StreamingWriter(
                path,
                plan,
                metadata,
                overwrite=overwrite,
                check=check,
                data_hash_key=modelspec_hash_key(metadata),
                late=self.late,
            ) as writer,
        ):
            ahead: Future[dict[str, torch.Tensor]] = pool.submit(self.compute, windows[0])
            try:
                for i, window in enumerate(windows):
                    done = ahead.result()
                    if i + 1 < len(windows):
                        ahead = pool.submit(self.compute, windows[i + 1])
                    for entry in window:
                        self._write_entry(writer, entry, done)
                    del done
            except BaseException:
                ahead.cancel()
                raise

    def _write_entry(self, writer: StreamingWriter, entry: Entry, done: Mapping[str, torch.Tensor]) -> None:
        report = self.report
        if entry.patched:
            writer.write(entry.key, done[entry.layout_key])
            for p in entry.parts:
                if p in self.terms:
                    component = component_of(p)
                    report.patched[component] = report.patched.get(component, 0) + 1
        else:
            raw = self.ckpt.raw(entry.source)
            same = raw is not None and entry.source == entry.layout_key and self.layout == self.out_layout
            if same and self.ckpt.info(entry.source).dtype == entry.info.dtype:
                writer.copy_raw(entry.key, raw[0], raw[1])  # type: ignore[index]
                report.raw_copied += 1
            elif not entry.parts:
                writer.write(entry.key, self.ckpt.read(entry.source).to(entry.info.torch_dtype).contiguous())
            else:
                parts = {p: self.writer_source.canonical(p) for p in entry.parts}
                tensor = self.km.join(self.out_layout, entry.layout_key, parts)
                writer.write(entry.key, tensor.to(entry.info.torch_dtype).contiguous())
        report.tensors += 1
        report.tensor_bytes += entry.info.nbytes
        if self.progress:
            self.progress(entry.info.nbytes)


# -- verification -----------------------------------------------------------------------------------------
def _sample(names: Sequence[str], count: int) -> list[str]:
    if count >= len(names):
        return list(names)
    step = len(names) / count
    return [names[int(i * step)] for i in range(count)]


def _reference(weight: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """W + Σ strength·ΔW one module at a time in float64 (no batching, no fusing): the check's side."""
    result = weight.to(torch.float64)
    for term in terms:
        if term.is_dora:
            continue
        a = term.adapter
        if term.bias:
            assert isinstance(a, Full) and a.diff_b is not None  # bias terms come only from Full.diff_b
            delta = a.diff_b
        else:
            delta = a.delta()
        result = result + delta.to(torch.float64).reshape(result.shape) * term.strength
    for term in terms:
        if term.is_dora:
            result = apply_dora(result.to(torch.float32), term.adapter, term.strength).to(torch.float64)
    return result


def _verifier(
    km: KeyMap,
    out_layout: str,
    source: CanonicalSource,
    terms: Mapping[str, list[Term]],
    count: int,
    report: MergeReport,
) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        names = _sample(sorted(terms), count)
        with open_checkpoint(path) as written:
            out = CanonicalSource(written, km, out_layout)
            for name in names:
                if name not in out.home:
                    continue
                got = out.canonical(name)
                expected = _reference(source.canonical(name), terms[name]).to(got.dtype).to(torch.float64)
                got64 = got.to(torch.float64)
                err = float((got64 - expected).abs().max()) if got.numel() else 0.0
                # float32 vs float64 summation may round the last bit differently: allow one ulp.
                ulp = torch.finfo(got.dtype).eps * max(float(expected.abs().max()), torch.finfo(got.dtype).tiny)
                ok = err <= 2 * ulp
                report.verified.append({"tensor": name, "max_abs_error": err, "ok": ok})
        bad = [v for v in report.verified if not v["ok"]]
        if bad:
            raise OutputError(
                f"verification failed: {bad[0]['tensor']} differs from W + ΔW by {bad[0]['max_abs_error']:.3g}; "
                "nothing was written"
            )

    return check


# -- the operations ---------------------------------------------------------------------------------------
def merge(
    base: str | Path | Source,
    loras: Sequence[LoraInput | str | Path | LoraFile],
    output: str | Path | None,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    device: str = "auto",
    strict: bool = False,
    dry_run: bool = False,
    verify: int = 0,
    skip_nonfinite: bool = False,
    overwrite: bool = False,
    budget: int = DEFAULT_BUDGET,
    progress: Progress | None = None,
    tokenizers_from: str | Path | None = None,
) -> MergeReport:
    """Bake ``loras`` into the checkpoint ``base`` and write the result to ``output``.

    ``loras``: :class:`LoraInput` (weight, U-Net/text weights, block weights) or plain paths
    (weight 1). ``layout``: ``"single"`` or ``"diffusers"`` (default: the base's). ``dtype``:
    output float dtype (default: each tensor's own). ``device``: ``"auto"`` | ``"cpu"`` | ``"cuda"``.
    ``strict``: refuse if any LoRA module patches nothing. ``dry_run``: plan only, write nothing.
    ``verify``: recompute this many patched tensors from the written file before it is renamed
    into place. ``tokenizers_from``: where a diffusers folder made from a single file takes its
    tokenizers (docs/FORMATS.md §5.6). Returns a :class:`MergeReport`; on any error nothing is
    left at ``output``.
    """
    return _run(
        "merge",
        base,
        loras,
        output,
        layout=layout,
        dtype=dtype,
        family=family,
        device=device,
        strict=strict,
        dry_run=dry_run,
        verify=verify,
        skip_nonfinite=skip_nonfinite,
        overwrite=overwrite,
        budget=budget,
        progress=progress,
        tokenizers_from=tokenizers_from,
    )


def unmerge(
    merged: str | Path | Source,
    loras: Sequence[LoraInput | str | Path | LoraFile],
    output: str | Path | None,
    *,
    base: str | Path | None = None,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    device: str = "auto",
    strict: bool = False,
    dry_run: bool = False,
    verify: int = 0,
    skip_nonfinite: bool = False,
    overwrite: bool = False,
    budget: int = DEFAULT_BUDGET,
    progress: Progress | None = None,
    tokenizers_from: str | Path | None = None,
) -> MergeReport:
    """Subtract ``loras`` (with the weights they were merged at) from ``merged``, in float32.

    With ``base`` (the original checkpoint, any layout), the report's ``residual`` gives per
    component the max abs and relative Frobenius difference of the patched tensors from it.
    Same options as :func:`merge`; DoRA modules cannot be unmerged (their renormalisation loses
    the norm) and are refused.
    """
    return _run(
        "unmerge",
        merged,
        loras,
        output,
        layout=layout,
        dtype=dtype,
        family=family,
        device=device,
        strict=strict,
        dry_run=dry_run,
        verify=verify,
        skip_nonfinite=skip_nonfinite,
        overwrite=overwrite,
        budget=budget,
        progress=progress,
        original=base,
        tokenizers_from=tokenizers_from,
    )


def rewrite(
    base: str | Path | Source,
    output: str | Path | None,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    dry_run: bool = False,
    verify: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    tokenizers_from: str | Path | None = None,
) -> MergeReport:
    """A merge with no LoRAs: ``base`` written to ``output`` in ``layout`` and/or ``dtype``.

    The one executor behind :func:`merge`, :func:`unmerge` and checkpoint conversion: the same
    plan (what is copied as raw bytes, what is cast, what is rebuilt across layouts, what has no
    place in the target and why), the same folder preservation, the same ``dry_run``.
    """
    return _run(
        "convert",
        base,
        [],
        output,
        layout=layout,
        dtype=dtype,
        family=family,
        device="cpu",
        strict=False,
        dry_run=dry_run,
        verify=verify,
        skip_nonfinite=False,
        overwrite=overwrite,
        budget=DEFAULT_BUDGET,
        progress=progress,
        tokenizers_from=tokenizers_from,
    )


def _run(
    operation: str,
    base_path: str | Path | Source,
    lora_items: Sequence[LoraInput | str | Path | LoraFile],
    output: str | Path | None,
    *,
    layout: str | None,
    dtype: str | torch.dtype | None,
    family: str | None,
    device: str,
    strict: bool,
    dry_run: bool,
    verify: int,
    skip_nonfinite: bool,
    overwrite: bool,
    budget: int,
    progress: Progress | None,
    original: str | Path | None = None,
    tokenizers_from: str | Path | None = None,
) -> MergeReport:
    def make() -> Executor:
        return executor(device, budget, family=family, verify=verify, overwrite=overwrite, progress=progress)

    return run(
        operation,
        base_path,
        lora_items,
        output,
        layout=layout,
        dtype=dtype,
        family=family,
        device=device,
        strict=strict,
        dry_run=dry_run,
        skip_nonfinite=skip_nonfinite,
        overwrite=overwrite,
        tokenizers_from=tokenizers_from,
        original=original,
        executor=make,
    )


def executor(
    device: str = "auto",
    budget: int = DEFAULT_BUDGET,
    *,
    family: str | None = None,
    verify: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Executor:
    """What writes a plan (ops/merge_plan.py ``run``): :func:`execute` with a ΔW engine on
    ``device`` (its errors, e.g. no CUDA, raised here) and these options."""
    engine = DeltaEngine(device, budget)

    def write(req: Request, planned: Planned) -> MergeReport:
        return execute(req, planned, engine, family=family, verify=verify, overwrite=overwrite, progress=progress)

    return write


def execute(
    req: Request,
    planned: Planned,
    engine: DeltaEngine,
    *,
    family: str | None = None,
    verify: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Write what ``planned`` says (ops/merge_plan.py ``plan``, from headers): the LoRAs' factors
    loaded, ΔW computed by ``engine``, the output streamed and put in place; ``planned.ckpt``
    must still be open. ``family``/``verify``/``overwrite``/``progress`` as for :func:`merge`."""
    ckpt = planned.ckpt
    report = planned.report
    terms = _terms(planned, req.inputs)
    found, km, source, out_layout = planned.found, planned.km, planned.source, planned.out_layout
    base_source = None
    base_ckpt = None
    if req.original is not None:
        base_ckpt = open_checkpoint(req.original)
        base_found = detect(base_ckpt.shapes(), base_ckpt.metadata, family=family)
        if base_found.family.name != found.family.name:
            raise InputError(
                f"{req.original}: a {base_found.family.title} checkpoint; the merged one is {found.family.title}"
            )
        base_source = (CanonicalSource(base_ckpt, keymap(base_found.family), base_found.layout), base_found.layout)
    try:
        merger = _Merger(ckpt, km, found.layout, out_layout, terms, engine, report, progress, base_source)
        merger.late = planned.late
        check = _verifier(km, out_layout, source, terms, verify, report) if verify else None
        assert req.out_path is not None
        _write(merger, req.out_path, planned.outputs, ckpt, found, source, overwrite, check)
    finally:
        if base_ckpt is not None:
            base_ckpt.close()
    if merger.carried:
        report.warnings.append(
            f"{len(merger.carried)} patched tensors already hold NaN or inf in the base (e.g. "
            f"{merger.carried[0]}); the output carries them"
        )
    for component, stats in merger.residual.items():
        rel = math.sqrt(stats.sq_diff / stats.sq_base) if stats.sq_base else 0.0
        report.residual[component] = {"max_abs": stats.max_abs, "relative": rel}
    _report_rounding(report, engine.rounding)
    return report


def _loaded(lora: LoraFile, lora_input: LoraInput, found: Detection) -> LoraFile:
    """The LoRA the plan read, with its factors as tensors: a plan from the header is read again
    by ``load_lora`` (the same readers, so the same modules), a LoraFile given is itself."""
    if isinstance(lora_input.source, LoraFile):
        return lora_input.source
    if not any(isinstance(v, ParamRef) for a in lora.adapters.values() for v in vars(a).values()):
        return lora  # read by load_lora already (a dialect the header cannot tell)
    return load_lora(lora_input.source, family=found.family, allow_nonfinite=True, require_fit=True)


def _terms(planned: Planned, inputs: Sequence[LoraInput]) -> dict[str, list[Term]]:
    """The plan's terms over the LoRAs' tensors (each LoRA read once, only if it patches)."""
    used = {t.lora for terms in planned.terms.values() for t in terms}
    loras = {i: _loaded(planned.loras[i], inputs[i], planned.found) for i in sorted(used)}

    def term(t: PlannedTerm) -> Term:
        adapter = loras[t.lora].adapters.get(t.module)
        if adapter is None:  # the readers are one code path; a file changed since the plan was read
            raise InputError(f"{Path(inputs[t.lora].name).name}: {t.module} vanished while it was read")
        return Term(adapter, t.strength, bias=t.bias)

    return {target: [term(t) for t in terms] for target, terms in planned.terms.items()}


def _write(
    merger: _Merger,
    out_path: Path,
    outputs: Outputs,
    ckpt: Checkpoint,
    found: Detection,
    source: CanonicalSource,
    overwrite: bool,
    check: Callable[[Path], None] | None,
) -> None:
    if outputs.kind == "file":
        (one,) = outputs.files
        merger.write_file(out_path, one.entries, one.metadata, overwrite, check)
        return
    if outputs.kind == "same_folder":
        with AtomicFolder(out_path, overwrite=overwrite) as tmp:
            for rel in outputs.copies:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ckpt.path / rel, tmp / rel)  # follows links (a hub cache's blobs)
            for out in outputs.files:
                (tmp / out.rel).parent.mkdir(parents=True, exist_ok=True)
                merger.write_file(tmp / out.rel, out.entries, out.metadata, False)
            for rel, index in outputs.indexes.items():
                (tmp / rel).write_text(index_text(index))
            for rel, text in outputs.extra_files.items():
                (tmp / rel).write_text(text)
            if check is not None:
                check(tmp)
        return
    by_prefix = {out.prefix: out for out in outputs.files}

    def write_file(path: Path, plan: dict[str, list[str]], prefix: str) -> None:
        out = by_prefix[prefix]
        merger.write_file(path, out.entries, out.metadata, False)

    def finish(tmp: Path) -> None:
        for rel, text in outputs.extra_files.items():
            (tmp / rel).write_text(text)
        if check is not None:
            check(tmp)

    write_folder(source, out_path, found, write_file, overwrite=overwrite, check=finish, extras=outputs.pipeline)
