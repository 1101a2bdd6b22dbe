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

import json
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import InputError, LoratoolsError, OutputError
from ..families import FAMILIES, keymap
from ..families.configs import diffusers_configs
from ..families.detect import Detection, detect
from ..families.keymap import KeyMap
from ..families.spec import DENOISERS, DIFFUSERS_FOLDERS, FamilySpec
from ..formats.adapters import Full, LoraFile, all_finite, apply_dora, is_finite
from ..formats.io import load_lora
from ..formats.resolve import claimed_family
from ..io.atomic import AtomicFolder, check_destination
from ..io.checkpoint import DIFFUSERS_COMPONENTS, SAFETENSORS_SUFFIX, WEIGHT_NAMES, Checkpoint, open_checkpoint
from ..io.files import same_path
from ..io.hub import resolve
from ..io.measure import active, text_bytes, tree_bytes
from ..io.safetensors import FLOAT_DTYPES, StreamingWriter, TensorInfo, file_size
from ..io.source import Source, open_source
from .blocks import DEFAULT_TOOL, BlockWeights, block_keys, parse_block_weights, unused_blocks
from .checkpoint import (
    CanonicalSource,
    PipelineFiles,
    config_text,
    output_dtype_name,
    parse_dtype,
    pipeline_files,
    pipeline_texts,
    plan_layout,
    planned_info,
    target_layout,
    write_folder,
)
from .delta import DEFAULT_BUDGET, DeltaEngine, Job, Term
from .hashes import sha256_file
from .provenance import FOLDER_FILE as PROVENANCE_FILE
from .provenance import KEY as PROVENANCE_KEY
from .provenance import MODELSPEC_HASH, dumps, input_record, provenance
from .rescale import rescale_adapter

SCHEMA = "loratools.merge/1"
FP16_MAX = 65504.0
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
Progress = Callable[[int], None]


# -- what to merge ------------------------------------------------------------------------------------
@dataclass
class LoraInput:
    """One LoRA to merge and how strongly.

    ``weight`` scales every module; ``unet``/``text`` replace it for the U-Net / the text encoders,
    ``te1``/``te2`` for one text encoder (SDXL's CLIP-L / OpenCLIP-bigG, FLUX.1's CLIP-L / T5);
    ``blocks`` (a preset such as ``OUTALL`` or a vector, tagged ``@lbw``/``@inspire``/``@lycoris``
    for the tool whose numbering it uses, ``blocks_from`` when untagged) multiplies per block
    (docs/FORMATS.md §13). Negative values subtract the LoRA.
    """

    source: str | Path | LoraFile
    weight: float = 1.0
    unet: float | None = None
    text: float | None = None
    blocks: str | BlockWeights | None = None
    te1: float | None = None
    te2: float | None = None
    blocks_from: str = DEFAULT_TOOL

    @property
    def name(self) -> str:
        if isinstance(self.source, LoraFile):
            return self.source.path or "<LoraFile>"
        return str(self.source)


def parse_lora_arg(text: str, blocks_from: str = DEFAULT_TOOL) -> LoraInput:
    """``PATH``, ``PATH:WEIGHT`` or ``PATH:key=value,…`` with keys ``w``, ``unet``, ``te``, ``te1``,
    ``te2``, ``lbw``.

    ``lbw`` takes a preset name or a comma-separated vector (the commas that follow it belong to
    it), optionally tagged ``@TOOL``; ``blocks_from`` is the tool of an untagged one. A ``:`` that
    starts no valid weight spec is part of the path (``hf://…``, ``C:\\…``).
    """
    path, sep, spec = text.rpartition(":")
    if not sep or not spec or Path(text).exists():
        return LoraInput(text, blocks_from=blocks_from)
    try:
        return LoraInput(path, weight=float(spec), blocks_from=blocks_from)
    except ValueError:
        pass
    if "=" not in spec:
        return LoraInput(text, blocks_from=blocks_from)
    fields: dict[str, list[str]] = {}
    current = None
    for token in spec.split(","):
        if "=" in token:
            current, value = (s.strip() for s in token.split("=", 1))
            fields[current.lower()] = [value]
        elif current is not None:
            fields[current.lower()].append(token.strip())
    known = {"w", "weight", "unet", "te", "text", "te1", "te2", "lbw", "blocks"}
    unknown = set(fields) - known
    if unknown:
        raise InputError(
            f"{text}: unknown LoRA option {', '.join(sorted(unknown))} (use w=, unet=, te=, te1=, te2=, lbw=)"
        )

    def number(*keys: str) -> float | None:
        for key in keys:
            if key in fields:
                try:
                    return float(fields[key][0])
                except ValueError:
                    raise InputError(f"{text}: {key}={fields[key][0]!r} is not a number") from None
        return None

    blocks = fields.get("lbw") or fields.get("blocks")
    weight = number("w", "weight")
    return LoraInput(
        path,
        weight=1.0 if weight is None else weight,
        unet=number("unet"),
        text=number("te", "text"),
        blocks=",".join(blocks) if blocks else None,
        te1=number("te1"),
        te2=number("te2"),
        blocks_from=blocks_from,
    )


# -- the report ------------------------------------------------------------------------------------
@dataclass
class LoraMatch:
    """How one LoRA matched the base."""

    path: str
    format: str
    family: str
    weight: float
    unet: float
    text: float
    blocks: str | None
    modules: int  # adapters read from the file
    patched: dict[str, int] = field(default_factory=dict)  # component → modules patched
    unmatched: dict[str, str] = field(default_factory=dict)  # LoRA module → why it patches nothing
    zero_weight: int = 0  # modules matched but given weight 0 (a block or component switched off)
    warnings: list[str] = field(default_factory=list)
    te1: float | None = None  # a te1= weight, where given
    te2: float | None = None
    not_applied: list[dict[str, str]] = field(default_factory=list)  # {"item", "reason"}: carried, not applied


@dataclass
class MergeReport:
    """What a merge or unmerge did (or, with ``dry_run``, would do)."""

    operation: str
    base: str
    output: str | None
    family: str
    layout: str
    output_layout: str
    device: str
    dry_run: bool
    loras: list[LoraMatch] = field(default_factory=list)
    patched: dict[str, int] = field(default_factory=dict)  # component → tensors patched
    tensors: int = 0
    raw_copied: int = 0
    tensor_bytes: int = 0
    output_bytes: int = 0
    dtype_plan: dict[str, int] = field(default_factory=dict)  # "F16→F16" → tensors
    dropped: dict[str, str] = field(default_factory=dict)  # base tensor with no place in the output → why
    missing: dict[str, str] = field(default_factory=dict)  # output tensor that could not be filled → why
    not_carried: dict[str, str] = field(default_factory=dict)  # base folder file not carried as it was → why
    files_carried: int = 0  # non-weight files of a base folder copied verbatim
    verified: list[dict[str, object]] = field(default_factory=list)
    residual: dict[str, dict[str, float]] = field(default_factory=dict)  # unmerge --base: component → errors
    # bf16/fp8 outputs: component → how much of ΔW the rounded weights lost (see ops/delta.COARSE_DTYPES)
    rounding: dict[str, dict[str, object]] = field(default_factory=dict)
    provenance: dict[str, object] = field(default_factory=dict)  # what the output records it was made from
    notes: list[str] = field(default_factory=list)  # what a new pipeline folder lacks or took from elsewhere
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unmatched(self) -> int:
        return sum(len(m.unmatched) for m in self.loras)

    def to_dict(self) -> dict[str, object]:
        return {"schema": SCHEMA, **asdict(self)}


# -- matching LoRAs to the base -------------------------------------------------------------------------
def _component(canonical: str) -> str:
    return canonical.split(".", 1)[0]


# a share of ΔW lost to rounding above which a merge warns (an fp16 or fp32 output never does)
ROUNDING_WARN = 0.05


def _report_rounding(report: MergeReport, rounding: Mapping[str, tuple[float, float, torch.dtype]]) -> None:
    """Per component: ``lost`` = ‖round(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F over its patched tensors,
    and the worst tensor; a warning where more than :data:`ROUNDING_WARN` of ΔW is lost."""
    sums: dict[str, list[float]] = {}
    worst: dict[str, tuple[float, str]] = {}
    dtypes: dict[str, set[torch.dtype]] = {}
    for name, (lost_sq, delta_sq, dtype) in rounding.items():
        component = _component(name)
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


def _load_for(lora_input: LoraInput, found: Detection) -> LoraFile:
    """The LoRA read against the base's family; a LoRA of another family is refused by name."""
    if isinstance(lora_input.source, LoraFile):
        lora = lora_input.source
        if lora.family_name != found.family.name:
            raise InputError(f"{lora_input.name}: a {lora.family_title} LoRA; the base is {found.family.title}")
        return lora
    spec = found.family
    try:
        lora = load_lora(lora_input.source, family=spec, allow_nonfinite=True, require_fit=True)  # _match decides
    except InputError as first:
        other = _own_family(lora_input.source)
        if other is not None and other.name != spec.name:
            raise InputError(
                f"{Path(lora_input.name).name}: a {other.title} LoRA; the base is {spec.title}",
                hint="merge LoRAs into a checkpoint of the family they were trained for",
            ) from None
        raise first from None
    misses = list(lora.unmatched)  # names the family lacks, or shapes that do not fit it
    if len(misses) > len(lora.adapters):
        other = _own_family(lora_input.source)
        claim = (
            f"a {other.title} LoRA? " if other is not None and other.name != spec.name else "a LoRA for another model? "
        )
        raise InputError(
            f"{Path(lora_input.name).name}: {len(misses)} of its {len(misses) + len(lora.adapters)} modules do not "
            f"fit {spec.title} (e.g. {misses[0]}); {claim}The base is {spec.title}",
            hint="merge LoRAs into a checkpoint of the family they were trained for",
        )
    if lora.unmatched:
        other = _own_family(lora_input.source)
        if other is None:
            # shapes alone cannot tell (a LoRA of test-sized or unusual widths): what the file
            # claims decides, as it does for people — a LoRA that says SDXL is not merged into SD 1.x
            claimed = claimed_family(lora.metadata)[0]
            other = FAMILIES[claimed] if claimed is not None else None
        if other is not None and other.name != spec.name:
            raise InputError(
                f"{Path(lora_input.name).name}: looks like a {other.title} LoRA ({len(lora.unmatched)} of its modules "
                f"do not fit {spec.title}); the base is {spec.title}",
                hint="merge LoRAs into a checkpoint of the family they were trained for",
            )
    return lora


def _own_family(path: str | Path) -> FamilySpec | None:
    """The family a LoRA resolves to by itself (full-size families), None if none fits."""
    try:
        lora = load_lora(path)
    except LoratoolsError:
        return None
    return lora.family if lora.adapters else None


def module_strength(lora_input: LoraInput, module: str, blocks: BlockWeights | None, spec: FamilySpec) -> float:
    """The strength one module gets: weight, unet/te/te1/te2 overrides, times its block weight."""
    base = lora_input.weight
    component = _component(module)
    if component in DENOISERS:  # the U-Net or a DiT's transformer
        base = lora_input.unet if lora_input.unet is not None else base
    else:
        base = lora_input.text if lora_input.text is not None else base
        own = lora_input.te1 if component == "te1" else lora_input.te2 if component == "te2" else None
        base = own if own is not None else base
    if blocks is not None:
        base *= blocks.ratio(block_keys(module, spec))
    return base


def check_text_weights(lora_input: LoraInput, spec: FamilySpec) -> None:
    """A te2= weight for a family with one text encoder is refused in one line."""
    if lora_input.te2 is not None and "te2" not in spec.text_components:
        raise InputError(
            f"{Path(lora_input.name).name}: te2= is for a second text encoder; {spec.title} has one (use te= or te1=)"
        )


def _not_applied(
    lora_input: LoraInput, lora: LoraFile, blocks: BlockWeights | None, match: LoraMatch, spec: FamilySpec
) -> list[dict[str, str]]:
    """What the LoRA (or its options) carries that this merge does not apply, with the reason."""
    items = [{"item": module, "reason": why} for module, why in match.unmatched.items()]
    present = {_component(m) for m in lora.adapters}
    for key in ("te1", "te2"):
        value = getattr(lora_input, key)
        if value is not None and key not in present:
            items.append({"item": f"{key}={value:g}", "reason": f"the LoRA has no {key} modules"})
    if blocks is not None:
        for block in unused_blocks(blocks, list(lora.adapters), spec):
            items.append(
                {"item": f"block {block}={blocks.weights[block]:g}", "reason": "the LoRA has no modules in this block"}
            )
    return items


def per_module_options(lora_input: LoraInput) -> bool:
    """Whether the input weighs modules differently (``unet``/``te``/``te1``/``te2``/``lbw``)."""
    options = (lora_input.unet, lora_input.text, lora_input.te1, lora_input.te2, lora_input.blocks)
    return any(o is not None for o in options)


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


@dataclass
class _Plan:
    terms: dict[str, list[Term]]  # canonical tensor → terms
    loras: list[LoraFile]
    matches: list[LoraMatch]


def _match(
    inputs: Sequence[LoraInput],
    found: Detection,
    km: KeyMap,
    home: Mapping[str, str],
    *,
    sign: float,
    skip_nonfinite: bool,
) -> _Plan:
    spec = found.family
    terms: dict[str, list[Term]] = {}
    loras, matches = [], []
    for lora_input in inputs:
        lora = _load_for(lora_input, found)
        check_text_weights(lora_input, spec)
        blocks = lora_input.blocks
        if isinstance(blocks, str):
            blocks = parse_block_weights(blocks, spec, lora_input.blocks_from)
        match = LoraMatch(
            path=lora_input.name,
            format=lora.source_format,
            family=lora.family_name,  # == found.family.name: _load_for refuses any other family
            weight=lora_input.weight,
            unet=lora_input.unet if lora_input.unet is not None else lora_input.weight,
            text=lora_input.text if lora_input.text is not None else lora_input.weight,
            blocks=blocks.source if blocks else None,
            modules=len(lora.adapters),
            unmatched=dict(lora.unmatched),
            # the match report lists unmatched modules itself; the reader's copies would repeat them
            warnings=[w for w in lora.warnings if "not matched" not in w],
            te1=lora_input.te1,
            te2=lora_input.te2,
        )
        for module, adapter in lora.adapters.items():
            targets = [(f"{module}.weight", False)]
            if isinstance(adapter, Full) and adapter.diff_b is not None:
                targets.append((f"{module}.bias", True))
            absent = [t for t, _ in targets if t not in home]
            if absent and absent[0].endswith(".bias") and f"{module}.weight" in home:
                match.unmatched[module] = f"a bias difference, but the base's {module} has no bias"
                continue
            if absent:
                match.unmatched[module] = f"the base has no {absent[0]} (no {_component(module)} in this checkpoint?)"
                continue
            if not is_finite(adapter):
                if not skip_nonfinite:
                    raise InputError(
                        f"{Path(lora_input.name).name}: module {module} has NaN or inf factors",
                        hint="--skip-nonfinite leaves such modules out",
                    )
                match.unmatched[module] = "NaN or inf in its factors (skipped)"
                continue
            strength = sign * module_strength(lora_input, module, blocks, spec)
            if strength == 0.0:
                match.zero_weight += 1
                continue
            if getattr(adapter, "dora_scale", None) is not None and strength != 1.0:
                raise InputError(
                    f"{Path(lora_input.name).name}: {module} is a DoRA module; only weight 1 is defined for it "
                    "(LyCORIS and ComfyUI disagree elsewhere, docs/FORMATS.md §4.7)"
                    + ("; a DoRA merge cannot be undone" if sign < 0 else "")
                )
            for target, is_bias in targets:
                terms.setdefault(target, []).append(Term(adapter, strength, bias=is_bias))
            component = _component(module)
            match.patched[component] = match.patched.get(component, 0) + 1
        match.not_applied = _not_applied(lora_input, lora, blocks, match, spec)
        loras.append(lora)
        matches.append(match)
    return _Plan(terms, loras, matches)


# -- the output plan -----------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One tensor of one output file."""

    key: str  # name inside the output file
    layout_key: str  # name in the output layout (diffusers: with its folder prefix)
    parts: list[str]  # canonical tensors it is built from (empty: copied as it is)
    source: str  # source key of the first part, or of the tensor itself
    info: TensorInfo  # output dtype and shape
    patched: bool


def _planned_entries(
    src: CanonicalSource,
    plan: Mapping[str, list[str]],
    layout: str,
    dtype: torch.dtype | None,
    terms: Mapping[str, list[Term]],
    prefix: str,
) -> list[_Entry]:
    entries = []
    for key, parts in plan.items():
        info = planned_info(src, parts, layout, prefix + key, dtype)
        entries.append(_Entry(key, prefix + key, parts, src.home[parts[0]], info, any(p in terms for p in parts)))
    return entries


def _windows(entries: Sequence[_Entry], budget: int) -> list[list[_Entry]]:
    """Consecutive runs of entries whose patched tensors hold at most ``budget`` bytes of float32."""
    windows: list[list[_Entry]] = [[]]
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

    def compute(self, window: Sequence[_Entry]) -> dict[str, torch.Tensor]:
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
            stats = self.residual.setdefault(_component(name), _Residual())
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
        entries: Sequence[_Entry],
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
                data_hash_key=_modelspec_hash_key(metadata),
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

    def _write_entry(self, writer: StreamingWriter, entry: _Entry, done: Mapping[str, torch.Tensor]) -> None:
        report = self.report
        if entry.patched:
            writer.write(entry.key, done[entry.layout_key])
            for p in entry.parts:
                if p in self.terms:
                    component = _component(p)
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


def _modelspec_hash_key(metadata: Mapping[str, str] | None) -> str | None:
    """``modelspec.hash_sha256`` when the file speaks SAI ModelSpec (has ``modelspec.*`` keys).

    sd-scripts defines the value as ``"0x"`` + SHA-256 over every tensor's bytes in turn, each the
    data section of a one-tensor safetensors serialization, i.e. its raw bytes
    (kohya-ss/sd-scripts: library/sai_model_spec.py (precalculate_safetensors_hashes); its own
    ``build_metadata`` leaves the call commented out and ``update_hash_sha256`` unimplemented).
    Taken over the tensors in the order the file stores them, that is the SHA-256 of the file's
    data section, computed while the tensors stream out (io/safetensors.py StreamingWriter)."""
    if metadata and any(k.startswith("modelspec.") for k in metadata):
        return MODELSPEC_HASH
    return None


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


def _as_input(item: LoraInput | str | Path | LoraFile) -> LoraInput:
    if isinstance(item, LoraInput):
        lora_input = item
    elif isinstance(item, LoraFile | Path):
        lora_input = LoraInput(item)
    else:
        lora_input = parse_lora_arg(item)
    values = (("weight", lora_input.weight), ("unet", lora_input.unet), ("te", lora_input.text))
    for what, value in (*values, ("te1", lora_input.te1), ("te2", lora_input.te2)):
        # float32 is where ΔW is computed: a weight beyond its range is inf there, NaN stays NaN
        if value is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise InputError(f"{Path(lora_input.name).name}: {what} {value:g} is not a finite float32 number")
    return lora_input


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
    started = time.perf_counter()
    if not lora_items and operation != "convert":
        raise InputError("no LoRA given")
    opened = open_source(base_path)  # hf:// references become their cached local files
    base_path = opened.path
    if original is not None:
        original = resolve(original)
    # inside a dry run of the CLI (io/measure.py: convert of a checkpoint), plan and measure only
    measured = active() if output is not None else None
    dry_run = dry_run or measured is not None
    if output is None and not dry_run:
        raise InputError("no output given (use -o OUT, or --dry-run)")
    out_path = Path(output) if output is not None else None
    inputs = [_as_input(item) for item in lora_items]
    if out_path is not None:
        protected = [base_path, *(Path(i.name) for i in inputs)]
        if original is not None:
            protected.append(Path(original))
        if any(same_path(out_path, p) for p in protected):
            what = "the input" if operation == "convert" else "one of the inputs"
            raise InputError(f"{out_path}: output is {what}; write elsewhere")
    torch_dtype = parse_dtype(dtype)
    engine = DeltaEngine(device, budget)

    with open_checkpoint(opened) as ckpt:  # a pickle the caller classified is not unpickled again
        found = detect(ckpt.shapes(), ckpt.metadata, family=family)
        km = keymap(found.family)
        out_layout = target_layout(found, layout)
        source = CanonicalSource(ckpt, km, found.layout)
        sign = -1.0 if operation == "unmerge" else 1.0
        plan = _match(inputs, found, km, source.home, sign=sign, skip_nonfinite=skip_nonfinite)
        report = MergeReport(
            operation,
            str(base_path),
            str(out_path) if out_path else None,
            found.family.name,
            found.layout,
            out_layout,
            str(engine.device),
            dry_run,
            loras=plan.matches,
        )
        for match in plan.matches:
            report.warnings.extend(f"{Path(match.path).name}: {w}" for w in match.warnings)
        if strict and report.unmatched:
            first = next(m for m in plan.matches if m.unmatched)
            module, reason = next(iter(first.unmatched.items()))
            raise InputError(
                f"--strict: {report.unmatched} LoRA modules patch nothing (e.g. {Path(first.path).name}: "
                f"{module}: {reason})"
            )
        if not plan.terms and operation != "convert":
            raise InputError("none of the LoRAs' modules patch this checkpoint; nothing to do")
        for target in plan.terms:
            stored = ckpt.info(source.home[target]).dtype
            if stored not in FLOAT_DTYPES:  # W + ΔW would be truncated to integers without a word
                raise InputError(
                    f"{base_path.name}: {target} is stored as {stored}; only floating-point weights can take a LoRA",
                    hint="a damaged or quantized checkpoint",
                )

        outputs = _plan_files(ckpt, km, found, source, out_layout, torch_dtype, plan.terms, report)
        if outputs.kind == "new_folder" and ckpt.container != "diffusers":
            outputs.pipeline = pipeline_files(found, tokenizers_from)
            report.notes = list(outputs.pipeline.notes)
        elif tokenizers_from is not None:
            raise InputError("--tokenizers-from applies only when a single file is written as a diffusers folder")
        late: Callable[[], list[tuple[str, str]]] | None = None
        if operation != "convert":
            base_digest = None
            if outputs.kind == "file" and not dry_run and ckpt.path.is_file():
                base_digest, late = _hash_while_writing(ckpt.path)
            record = _provenance(operation, ckpt, inputs, plan.matches, base_digest)
            report.provenance = record
            if outputs.kind == "file":
                outputs.files[0].metadata = {**(outputs.files[0].metadata or {}), PROVENANCE_KEY: dumps(record)}
            else:
                outputs.extra_files[PROVENANCE_FILE] = json.dumps(record, indent=2) + "\n"
        report.not_carried = dict(outputs.not_carried)
        report.files_carried = len(outputs.copies) + len(outputs.indexes)
        sizes = _output_sizes(outputs, ckpt, found)
        report.output_bytes = sum(sizes.values())
        for f in outputs.files:
            for e in f.entries:
                before = ckpt.info(e.source).dtype if e.source in ckpt else e.info.dtype
                key = f"{before}→{e.info.dtype}"
                report.dtype_plan[key] = report.dtype_plan.get(key, 0) + 1
        if dry_run:
            for f in outputs.files:
                for e in f.entries:
                    report.tensors += 1  # what the output would hold
                    report.tensor_bytes += e.info.nbytes
                    for p in e.parts:
                        if p in plan.terms:
                            report.patched[_component(p)] = report.patched.get(_component(p), 0) + 1
            if out_path is not None:  # refuse what the real run would refuse
                check_destination(out_path, overwrite=overwrite)
            if measured is not None and out_path is not None:
                for inner, nbytes in sizes.items():
                    measured.add(out_path / inner if inner else out_path, nbytes)
            report.seconds = time.perf_counter() - started
            return report

        base_source = None
        base_ckpt = None
        if original is not None:
            base_ckpt = open_checkpoint(original)
            base_found = detect(base_ckpt.shapes(), base_ckpt.metadata, family=family)
            if base_found.family.name != found.family.name:
                raise InputError(
                    f"{original}: a {base_found.family.title} checkpoint; the merged one is {found.family.title}"
                )
            base_source = (CanonicalSource(base_ckpt, keymap(base_found.family), base_found.layout), base_found.layout)
        try:
            merger = _Merger(ckpt, km, found.layout, out_layout, plan.terms, engine, report, progress, base_source)
            if late is not None:
                merger.late = _filling(late, report.provenance)
            check = _verifier(km, out_layout, source, plan.terms, verify, report) if verify else None
            assert out_path is not None
            _write(merger, out_path, outputs, ckpt, found, source, overwrite, check)
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
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _OutFile:
    """One output weight file and what goes into it."""

    rel: str  # its path inside the output folder ("" when the output is a single file)
    prefix: str  # the checkpoint-name prefix of its keys ("unet." …; "" for a single file)
    entries: list[_Entry]
    metadata: dict[str, str] | None


@dataclass
class _Outputs:
    """Every output file, and for a folder written in the base's own layout, the rest of the base."""

    files: list[_OutFile]
    kind: str  # "file", "same_folder" (the base's folder, file for file) or "new_folder"
    copies: list[str] = field(default_factory=list)  # the base folder's other files, carried verbatim
    indexes: dict[str, dict[str, object]] = field(default_factory=dict)  # shard indexes rewritten (new sizes)
    not_carried: dict[str, str] = field(default_factory=dict)  # base folder files left out → why
    extra_files: dict[str, str] = field(default_factory=dict)  # written at the folder's root (provenance)
    pipeline: PipelineFiles | None = None  # a new folder's scheduler and tokenizers


def _index_text(index: Mapping[str, object]) -> str:
    """A rewritten shard index (``*.index.json``) as the output gets it."""
    return json.dumps(index, indent=2) + "\n"


def _output_sizes(outputs: _Outputs, ckpt: Checkpoint, found: Detection) -> dict[str, int]:
    """Every file of the output (path inside it, "" for a single file) → its bytes, from the plan.

    Weight files are measured by the writer's own header builder (io/safetensors.py
    ``build_header``, the ModelSpec hash placeholder included); a folder's other files are the
    texts :func:`_write` and ``write_folder`` write, or the files they copy."""
    sizes = {
        f.rel: file_size({e.key: e.info for e in f.entries}, f.metadata, _modelspec_hash_key(f.metadata))
        for f in outputs.files
    }
    if outputs.kind == "file":
        return sizes
    if outputs.kind == "new_folder":  # write_folder: weights under stems, configs, pipeline files
        sizes = {}
        configs = diffusers_configs(found.family)
        source_folder = ckpt.path if ckpt.container == "diffusers" else None
        if source_folder is not None:
            for item in source_folder.iterdir():
                if item.name not in DIFFUSERS_FOLDERS.values():
                    sizes[item.name] = tree_bytes(item)
        else:
            extras = outputs.pipeline if outputs.pipeline is not None else pipeline_files(found)
            sizes.update((rel, text_bytes(text)) for rel, text in pipeline_texts(found.family, extras).items())
            sizes.update((name, tree_bytes(folder)) for name, folder in extras.tokenizers.items())
        component_of = {folder: component for component, folder in DIFFUSERS_FOLDERS.items()}
        for f in outputs.files:
            copied = source_folder / f.rel / "config.json" if source_folder is not None else None
            config = tree_bytes(copied) if copied is not None and copied.exists() else None
            sizes[f"{f.rel}/config.json"] = text_bytes(config_text(configs[f.rel])) if config is None else config
            stem = WEIGHT_NAMES[0] if component_of[f.rel] in ("unet", "transformer", "vae") else WEIGHT_NAMES[1]
            sizes[f"{f.rel}/{stem}.safetensors"] = file_size(
                {e.key: e.info for e in f.entries}, f.metadata, _modelspec_hash_key(f.metadata)
            )
    sizes.update((rel, tree_bytes(ckpt.path / rel)) for rel in outputs.copies)
    sizes.update((rel, text_bytes(_index_text(index))) for rel, index in outputs.indexes.items())
    sizes.update((rel, text_bytes(text)) for rel, text in outputs.extra_files.items())
    return sizes


def _hash_while_writing(path: Path) -> tuple[str, Callable[[], list[tuple[str, str]]]]:
    """Starts the SHA-256 of the base file in a thread; returns a placeholder of its length and the
    ``late`` callable of :class:`StreamingWriter` that waits for it.

    Hashing the whole base before the first byte is written put a full read of it on the critical
    path (≈ 1.5 s for 2 GB, and for a 23.8 GB FLUX.1 file that does not fit in the page cache, a
    second pass over the disk); hashlib releases the GIL, so it runs beside the merge. The
    placeholder is random hex, so its first 10 digits (the AutoV2 entry) occur nowhere else.
    """
    placeholder = secrets.token_hex(32)
    done: Future[str] = Future()

    def run() -> None:
        try:
            done.set_result(sha256_file(path))
        except BaseException as exc:  # handed to the writer, which raises it
            done.set_exception(exc)

    # a daemon thread: a merge that fails early must not wait for the hash of a 24 GB file to exit
    threading.Thread(target=run, name="loratools-hash", daemon=True).start()

    def late() -> list[tuple[str, str]]:
        digest = done.result()
        return [(placeholder, digest), (placeholder[:10], digest[:10])]  # sha256 first, then autov2

    return placeholder, late


def _filling(
    late: Callable[[], list[tuple[str, str]]], record: Mapping[str, object] | None
) -> Callable[[], list[tuple[str, str]]]:
    """``late``, also putting the real values in the report's own copy of the provenance record."""

    def fill() -> list[tuple[str, str]]:
        pairs = late()
        base = record.get("base") if record is not None else None
        if isinstance(base, dict):
            values = dict(pairs)
            base.update(sha256=values[str(base["sha256"])], autov2=values[str(base["autov2"])])
        return pairs

    return fill


def _provenance(
    operation: str,
    ckpt: Checkpoint,
    inputs: Sequence[LoraInput],
    matches: Sequence[LoraMatch],
    base_digest: str | None = None,
) -> dict[str, object]:
    """Base and LoRAs with their hashes and the options they were applied with (``base_digest``:
    the base file's SHA-256, or a placeholder for it, when already known)."""
    if base_digest is None:
        base = input_record(ckpt.path, ckpt.files)
    else:  # input_record's own fields, in its order
        base = {"name": ckpt.path.name, "sha256": base_digest, "autov2": base_digest[:10]}
    loras = []
    for lora_input, match in zip(inputs, matches, strict=True):
        entry: dict[str, object] = {"name": Path(match.path).name}
        source = lora_input.source
        path = Path(source.path) if isinstance(source, LoraFile) and source.path else None
        if not isinstance(source, LoraFile):
            path = Path(resolve(source))
        if path is not None and path.exists():
            entry = input_record(path)
        entry.update(weight=match.weight, unet=match.unet, text=match.text, blocks=match.blocks, format=match.format)
        loras.append(entry)
    return provenance(operation, base, loras)


# Files in a component folder that hold weights (of some variant or framework). One the checkpoint
# was not read from would still hold the unpatched values after a merge, so it is not carried.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5", ".gguf")
_NOT_COPIED = (".git",)


def _file_entries(
    ckpt: Checkpoint,
    km: KeyMap,
    layout: str,
    names: Sequence[str],
    prefix: str,
    dtype: torch.dtype | None,
    terms: Mapping[str, list[Term]],
) -> list[_Entry]:
    """One output file in the base's own layout: its names, spelling, order; only dtypes may change."""
    entries = []
    for name in names:
        info = ckpt.info(name)
        parts = [w.canonical for w in km.lookup(layout, name)]
        out = TensorInfo(output_dtype_name(info, dtype), info.shape)
        entries.append(_Entry(name[len(prefix) :], name, parts, name, out, any(p in terms for p in parts)))
    return entries


def _same_folder(
    ckpt: Checkpoint, km: KeyMap, layout: str, dtype: torch.dtype | None, terms: Mapping[str, list[Term]]
) -> _Outputs:
    """A diffusers base rewritten file for file: every weight file at its own path (a pickle
    becomes safetensors beside it), shard indexes and every other file of the folder carried."""
    root = ckpt.path
    read = set(ckpt.files)
    outputs = _Outputs([], "same_folder")
    sizes: dict[Path, int] = {}
    for path in ckpt.files:
        rel = path.relative_to(root)
        prefix = f"{rel.parts[0]}."
        entries = _file_entries(ckpt, km, layout, ckpt.file_keys[path], prefix, dtype, terms)
        sizes[path] = sum(e.info.nbytes for e in entries)
        metadata = ckpt.file_metadata.get(path) or None
        if path.suffix != SAFETENSORS_SUFFIX:
            rel = rel.with_suffix(SAFETENSORS_SUFFIX)
            metadata = metadata or {"format": "pt"}
            outputs.not_carried[path.relative_to(root).as_posix()] = f"a pickle; written as {rel.as_posix()}"
        outputs.files.append(_OutFile(rel.as_posix(), prefix, entries, metadata))
    components = set(DIFFUSERS_COMPONENTS)
    for item in sorted(root.rglob("*")):
        rel = item.relative_to(root)
        if rel.parts[0] in _NOT_COPIED or item.is_dir() or item in read:
            continue
        name = rel.as_posix()
        in_component = len(rel.parts) > 1 and rel.parts[0] in components
        if in_component and item.name.endswith(".index.json"):
            try:
                index = json.loads(item.read_text())
                shards = {item.parent / s for s in index["weight_map"].values()}
            except (ValueError, KeyError, TypeError, AttributeError):
                shards = set()
            if shards and shards <= read:
                total = sum(sizes[s] for s in shards)
                meta = index.get("metadata")
                if isinstance(meta, dict) and meta.get("total_size") not in (None, total):
                    outputs.indexes[name] = {**index, "metadata": {**meta, "total_size": total}}
                    continue
            elif shards and terms:
                outputs.not_carried[name] = "the shard index of weights the checkpoint was not read from"
                continue
        elif in_component and item.suffix in WEIGHT_SUFFIXES and terms:
            outputs.not_carried[name] = (
                "weights the checkpoint was not read from (another variant or framework); they would still "
                "hold the unpatched values"
            )
            continue
        outputs.copies.append(name)
    return outputs


def _dropped_reason(km: KeyMap, layout: str, key: str, target: str) -> str:
    """Why a base tensor has no place in the target layout, in words."""
    if key.startswith("model_ema.") or key.startswith("ema_"):
        return "an EMA copy of the weights; the target layout keeps only the model itself"
    if key in km.extras:
        return "a training-time buffer (noise schedule, EMA bookkeeping) the target layout does not store"
    weights = km.lookup(layout, key)
    if not weights:
        return f"not a tensor of the {km.spec.title} architecture as loratools knows it, so it cannot be placed"
    return f"{weights[0].canonical} has no name in the {target} layout"


def _missing_reason(source: CanonicalSource, km: KeyMap, layout: str, key: str) -> str:
    absent = [w.canonical for w in km.lookup(layout, key) if w.canonical not in source.home]
    if absent:
        return f"the base has no {absent[0]}" + (
            f" (nor {len(absent) - 1} more of its parts)" if len(absent) > 1 else ""
        )
    return "the base cannot supply it"


def _plan_files(
    ckpt: Checkpoint,
    km: KeyMap,
    found: Detection,
    source: CanonicalSource,
    out_layout: str,
    dtype: torch.dtype | None,
    terms: Mapping[str, list[Term]],
    report: MergeReport,
) -> _Outputs:
    """Every output file's entries, in write order."""
    if out_layout == found.layout:
        if ckpt.container == "single_file":
            entries = _file_entries(ckpt, km, out_layout, ckpt.keys(), "", dtype, terms)
            return _Outputs([_OutFile("", "", entries, ckpt.metadata or None)], "file")
        return _same_folder(ckpt, km, out_layout, dtype, terms)
    target = "diffusers" if out_layout == "diffusers" else "single-file"
    report.dropped = {
        k: _dropped_reason(km, found.layout, k, target)
        for k in ckpt
        if not any(w.layout_name(out_layout) for w in km.lookup(found.layout, k))
    }
    plan, missing = plan_layout(source, out_layout, km.layout_keys(out_layout))
    report.missing = {k: _missing_reason(source, km, out_layout, k) for k in missing}
    if out_layout != "diffusers":
        entries = _planned_entries(source, plan, out_layout, dtype, terms, "")
        return _Outputs([_OutFile("", "", entries, ckpt.metadata or None)], "file")
    files: list[_OutFile] = []
    for folder in dict.fromkeys(k.split(".", 1)[0] for k in plan):
        prefix = f"{folder}."
        inner = {k[len(prefix) :]: v for k, v in plan.items() if k.startswith(prefix)}
        entries = _planned_entries(source, inner, out_layout, dtype, terms, prefix)
        files.append(_OutFile(folder, prefix, entries, {"format": "pt"}))
    return _Outputs(files, "new_folder")


def _write(
    merger: _Merger,
    out_path: Path,
    outputs: _Outputs,
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
                (tmp / rel).write_text(_index_text(index))
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
