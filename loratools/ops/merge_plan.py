"""The plan of a merge, unmerge or checkpoint rewrite, from headers alone — torch is never imported.

What is patched (LoRA modules matched to base tensors, block and component weights, the
refusals), every output file's entries and dtypes, its exact size and the match report all follow
from the base's header and the LoRAs' headers: a kohya/LyCORIS or peft ``.safetensors`` LoRA is
read by the readers themselves over header views (formats/scan.py ``header_lora``), its factors
checked for NaN/inf with numpy. So ``merge --dry-run`` answers without torch's 1–3 s import, and
a real merge plans while torch imports in another thread (cli/merge_cmd.py). ops/merge.py is the
engine: it loads the factors, computes ΔW and writes what this plan says.

Where the headers cannot tell, torch is imported after all (and the answer is the same): LoRA
dialects whose reading needs the values (cloneofsimo, pickles, peft folders, FLUX.1 spellings),
an output in another layout (fused tensors' shapes come from the key map's join), and
``--device auto`` or ``cuda`` on a machine with an NVIDIA driver (whether CUDA works is torch's
answer).
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, LoratoolsError
from ..families import FAMILIES, keymap
from ..families.configs import diffusers_configs
from ..families.detect import Detection, detect
from ..families.keymap import KeyMap
from ..families.spec import DENOISERS, DIFFUSERS_FOLDERS, FamilySpec
from ..formats.adapters import Full, LoraFile
from ..formats.flux import is_control_lora
from ..formats.lookalike import check_not_lfs_pointer
from ..formats.resolve import claimed_family
from ..formats.scan import ParamRef, header_lora
from ..io.atomic import check_destination
from ..io.checkpoint import DIFFUSERS_COMPONENTS, SAFETENSORS_SUFFIX, WEIGHT_NAMES, Checkpoint, open_checkpoint
from ..io.files import regular_file, same_path
from ..io.hub import resolve
from ..io.measure import Tally, active, text_bytes, tree_bytes
from ..io.safetensors import FLOAT_DTYPES, TensorInfo, file_size
from ..io.source import Source, open_source
from .blocks import DEFAULT_TOOL, BlockWeights, block_keys, parse_block_weights, unused_blocks
from .checkpoint import (
    CanonicalSource,
    PipelineFiles,
    config_text,
    output_dtype_name,
    parse_dtype_name,
    pipeline_files,
    pipeline_texts,
    plan_layout,
    planned_info,
    target_layout,
)
from .hashes import sha256_file
from .provenance import FOLDER_FILE as PROVENANCE_FILE
from .provenance import KEY as PROVENANCE_KEY
from .provenance import MODELSPEC_HASH, dumps, input_record, provenance

if TYPE_CHECKING:
    import torch

SCHEMA = "loratools.merge/1"
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without torch


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
def component_of(canonical: str) -> str:
    return canonical.split(".", 1)[0]


# a share of ΔW lost to rounding above which a merge warns (an fp16 or fp32 output never does)


def _load_for(lora_input: LoraInput, found: Detection) -> LoraFile:
    """The LoRA read against the base's family; a LoRA of another family is refused by name."""
    if isinstance(lora_input.source, LoraFile):
        lora = lora_input.source
        if lora.family_name != found.family.name:
            raise InputError(f"{lora_input.name}: a {lora.family_title} LoRA; the base is {found.family.title}")
        return lora
    spec = found.family
    try:
        lora = read_lora(lora_input.source, spec, require_fit=True)  # _match decides
    except InputError as first:
        other = _own_family(lora_input.source)
        if other is not None and other.name != spec.name:
            raise InputError(
                f"{Path(lora_input.name).name}: a {other.title} LoRA; the base is {spec.title}",
                hint="merge LoRAs into a checkpoint of the family they were trained for",
            ) from None
        raise first from None
    if is_control_lora(lora):
        raise InputError(
            f"{Path(lora_input.name).name}: a FLUX.1 control LoRA (BFL Canny/Depth: it widens img_in and "
            "replaces norm scales, which no LoRA merge can do); merging it is not supported yet",
            hint="load it as a LoRA in ComfyUI or diffusers' FluxControlPipeline",
        )
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
        lora = read_lora(path)
    except LoratoolsError:
        return None
    if not all(adapter_finite(a) for a in lora.adapters.values()):
        return None  # load_lora refuses NaN/inf factors, so such a LoRA resolves to nothing
    return lora.family if lora.adapters else None


def module_strength(lora_input: LoraInput, module: str, blocks: BlockWeights | None, spec: FamilySpec) -> float:
    """The strength one module gets: weight, unet/te/te1/te2 overrides, times its block weight."""
    base = lora_input.weight
    component = component_of(module)
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


def not_applied(
    lora_input: LoraInput, lora: LoraFile, blocks: BlockWeights | None, match: LoraMatch, spec: FamilySpec
) -> list[dict[str, str]]:
    """What the LoRA (or its options) carries that this merge does not apply, with the reason."""
    items = [{"item": module, "reason": why} for module, why in match.unmatched.items()]
    present = {component_of(m) for m in lora.adapters}
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


@dataclass
class MatchPlan:
    terms: dict[str, list[PlannedTerm]]  # canonical tensor → terms
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
) -> MatchPlan:
    spec = found.family
    terms: dict[str, list[PlannedTerm]] = {}
    loras: list[LoraFile] = []
    matches: list[LoraMatch] = []
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
                match.unmatched[module] = f"the base has no {absent[0]} (no {component_of(module)} in this checkpoint?)"
                continue
            if not adapter_finite(adapter):
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
                terms.setdefault(target, []).append(PlannedTerm(len(loras), module, strength, bias=is_bias))
            component = component_of(module)
            match.patched[component] = match.patched.get(component, 0) + 1
        match.not_applied = not_applied(lora_input, lora, blocks, match, spec)
        loras.append(lora)
        matches.append(match)
    return MatchPlan(terms, loras, matches)


# -- the output plan -----------------------------------------------------------------------------------
@dataclass
class Entry:
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
    dtype: str | None,
    terms: Mapping[str, list[PlannedTerm]],
    prefix: str,
) -> list[Entry]:
    entries = []
    for key, parts in plan.items():
        info = planned_info(src, parts, layout, prefix + key, dtype)
        entries.append(Entry(key, prefix + key, parts, src.home[parts[0]], info, any(p in terms for p in parts)))
    return entries


def modelspec_hash_key(metadata: Mapping[str, str] | None) -> str | None:
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


@dataclass
class OutFile:
    """One output weight file and what goes into it."""

    rel: str  # its path inside the output folder ("" when the output is a single file)
    prefix: str  # the checkpoint-name prefix of its keys ("unet." …; "" for a single file)
    entries: list[Entry]
    metadata: dict[str, str] | None


@dataclass
class Outputs:
    """Every output file, and for a folder written in the base's own layout, the rest of the base."""

    files: list[OutFile]
    kind: str  # "file", "same_folder" (the base's folder, file for file) or "new_folder"
    copies: list[str] = field(default_factory=list)  # the base folder's other files, carried verbatim
    indexes: dict[str, dict[str, object]] = field(default_factory=dict)  # shard indexes rewritten (new sizes)
    not_carried: dict[str, str] = field(default_factory=dict)  # base folder files left out → why
    extra_files: dict[str, str] = field(default_factory=dict)  # written at the folder's root (provenance)
    pipeline: PipelineFiles | None = None  # a new folder's scheduler and tokenizers


def index_text(index: Mapping[str, object]) -> str:
    """A rewritten shard index (``*.index.json``) as the output gets it."""
    return json.dumps(index, indent=2) + "\n"


def _output_sizes(outputs: Outputs, ckpt: Checkpoint, found: Detection) -> dict[str, int]:
    """Every file of the output (path inside it, "" for a single file) → its bytes, from the plan.

    Weight files are measured by the writer's own header builder (io/safetensors.py
    ``build_header``, the ModelSpec hash placeholder included); a folder's other files are the
    texts :func:`_write` and ``write_folder`` write, or the files they copy."""
    sizes = {
        f.rel: file_size({e.key: e.info for e in f.entries}, f.metadata, modelspec_hash_key(f.metadata))
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
                {e.key: e.info for e in f.entries}, f.metadata, modelspec_hash_key(f.metadata)
            )
    sizes.update((rel, tree_bytes(ckpt.path / rel)) for rel in outputs.copies)
    sizes.update((rel, text_bytes(index_text(index))) for rel, index in outputs.indexes.items())
    sizes.update((rel, text_bytes(text)) for rel, text in outputs.extra_files.items())
    return sizes


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
    dtype: str | None,
    terms: Mapping[str, list[PlannedTerm]],
) -> list[Entry]:
    """One output file in the base's own layout: its names, spelling, order; only dtypes may change."""
    entries = []
    for name in names:
        info = ckpt.info(name)
        parts = [w.canonical for w in km.lookup(layout, name)]
        out = TensorInfo(output_dtype_name(info, dtype), info.shape)
        entries.append(Entry(name[len(prefix) :], name, parts, name, out, any(p in terms for p in parts)))
    return entries


def _same_folder(
    ckpt: Checkpoint, km: KeyMap, layout: str, dtype: str | None, terms: Mapping[str, list[PlannedTerm]]
) -> Outputs:
    """A diffusers base rewritten file for file: every weight file at its own path (a pickle
    becomes safetensors beside it), shard indexes and every other file of the folder carried."""
    root = ckpt.path
    read = set(ckpt.files)
    outputs = Outputs([], "same_folder")
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
        outputs.files.append(OutFile(rel.as_posix(), prefix, entries, metadata))
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
    dtype: str | None,
    terms: Mapping[str, list[PlannedTerm]],
    report: MergeReport,
) -> Outputs:
    """Every output file's entries, in write order."""
    if out_layout == found.layout:
        if ckpt.container == "single_file":
            entries = _file_entries(ckpt, km, out_layout, ckpt.keys(), "", dtype, terms)
            return Outputs([OutFile("", "", entries, ckpt.metadata or None)], "file")
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
        return Outputs([OutFile("", "", entries, ckpt.metadata or None)], "file")
    files: list[OutFile] = []
    for folder in dict.fromkeys(k.split(".", 1)[0] for k in plan):
        prefix = f"{folder}."
        inner = {k[len(prefix) :]: v for k, v in plan.items() if k.startswith(prefix)}
        entries = _planned_entries(source, inner, out_layout, dtype, terms, prefix)
        files.append(OutFile(folder, prefix, entries, {"format": "pt"}))
    return Outputs(files, "new_folder")


# -- reading LoRAs from their headers --------------------------------------------------------------------
# numpy's view of each safetensors float dtype; bf16 and fp8 have none and are judged by their bits
_NUMPY_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
# bits that are all set exactly in NaN/inf: (mask, value) on the unsigned integer of the element
_NONFINITE_BITS = {"BF16": ("<u2", 0x7F80, 0x7F80), "F8_E5M2": ("u1", 0x7C, 0x7C), "F8_E4M3": ("u1", 0x7F, 0x7F)}


def _ref_finite(ref: ParamRef) -> bool:
    """No NaN or inf in the stored tensor ``ref`` points at (read with numpy; e4m3fn has no inf,
    its NaN is every exponent and mantissa bit set)."""
    import numpy as np

    if not ref.is_floating_point() or ref.path is None or not ref.numel():
        return True
    dtype = ref.info.dtype
    if dtype in _NUMPY_FLOATS:
        values = np.fromfile(ref.path, dtype=_NUMPY_FLOATS[dtype], count=ref.numel(), offset=ref.offset)
        return bool(np.isfinite(values).all())
    code, mask, bits = _NONFINITE_BITS[dtype]
    raw = np.fromfile(ref.path, dtype=code, count=ref.numel(), offset=ref.offset)
    return not bool(((raw & mask) == bits).any())


def adapter_finite(adapter: object) -> bool:
    """Whether every floating-point factor of ``adapter`` is free of NaN and inf: header views are
    read with numpy, tensors checked by formats/adapters.py ``is_finite`` (the same answer)."""
    refs = [v for v in vars(adapter).values() if isinstance(v, ParamRef)]
    if refs:
        return all(_ref_finite(ref) for ref in refs)
    from ..formats.adapters import is_finite

    return is_finite(adapter)  # type: ignore[arg-type]


def read_lora(path: str | Path, family: FamilySpec | None = None, *, require_fit: bool = False) -> LoraFile:
    """``load_lora(path, family, allow_nonfinite=True, require_fit=…)`` from the header where the
    dialect allows (its factors :class:`ParamRef` views), else ``load_lora`` itself."""
    local = Path(resolve(path))
    if local.is_file():  # load_lora's own first refusals, in its order
        if regular_file(local).st_size == 0:
            raise InputError(f"{local.name}: empty file")
        check_not_lfs_pointer(local)
        lora = header_lora(local, family, require_fit=require_fit)
        if lora is not None:
            return lora
    from ..formats.io import load_lora  # a dialect whose reading needs the values

    return load_lora(path, family, allow_nonfinite=True, require_fit=require_fit)


def planned_device(device: str) -> str:
    """The device ΔW would be computed on, as ops/delta.py ``resolve_device`` names it: without
    torch where the answer is certain (CPU asked for; ``auto`` on Linux with no NVIDIA driver)."""
    if device == "cpu":
        return "cpu"
    gpus = Path("/proc/driver/nvidia/gpus")
    if device == "auto" and sys.platform.startswith("linux") and not (gpus.is_dir() and any(gpus.iterdir())):
        return "cpu"
    from .delta import resolve_device

    return str(resolve_device(device))


def hash_while_writing(path: Path) -> tuple[str, Callable[[], list[tuple[str, str]]]]:
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


def filling(
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


# -- the plan --------------------------------------------------------------------------------------------
@dataclass
class PlannedTerm:
    """One LoRA module's contribution to one base tensor: ``loras[lora].adapters[module]`` at
    ``strength`` (``bias``: a Full's diff_b to the bias); the engine makes it a delta.Term."""

    lora: int
    module: str
    strength: float
    bias: bool = False


@dataclass
class Request:
    """A merge's arguments, checked before the base is opened."""

    operation: str
    opened: Source
    inputs: list[LoraInput]
    out_path: Path | None
    original: str | Path | None
    dry_run: bool
    measured: Tally | None  # inside a CLI dry run of convert: where the sizes are recorded
    dtype: str | None  # the output float dtype's safetensors name; None: each tensor's own


@dataclass
class Planned:
    """Everything the engine needs from the plan (``ckpt`` stays the caller's to close)."""

    ckpt: Checkpoint
    found: Detection
    km: KeyMap
    source: CanonicalSource
    out_layout: str
    terms: dict[str, list[PlannedTerm]]
    loras: list[LoraFile]  # as read for the plan (header views, or the caller's LoraFile)
    outputs: Outputs
    report: MergeReport
    sizes: dict[str, int]
    late: Callable[[], list[tuple[str, str]]] | None = None  # the base's hash, for the writer to fill in


def request(
    operation: str,
    base_path: str | Path | Source,
    lora_items: Sequence[LoraInput | str | Path | LoraFile],
    output: str | Path | None,
    *,
    dry_run: bool,
    dtype: str | torch.dtype | None = None,
    original: str | Path | None = None,
) -> Request:
    """The arguments of a merge checked (a LoRA given, an output that is none of the inputs, the dtype)."""
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
    return Request(operation, opened, inputs, out_path, original, dry_run, measured, parse_dtype_name(dtype))


def plan(
    req: Request,
    ckpt: Checkpoint,
    *,
    layout: str | None,
    family: str | None,
    device: str,
    strict: bool,
    skip_nonfinite: bool,
    tokenizers_from: str | Path | None,
    hash_base: bool = False,
) -> Planned:
    """The plan of ``req`` over the open base ``ckpt``: matches, refusals, output files and sizes.

    ``device``: the name ΔW runs on (:func:`planned_device`). ``hash_base``: a real run's
    single-file output records a placeholder for the base's SHA-256, hashed in a thread while the
    output is written (``Planned.late`` fills it in); otherwise it is hashed now."""
    operation = req.operation
    base_path = req.opened.path
    found = detect(ckpt.shapes(), ckpt.metadata, family=family)
    km = keymap(found.family)
    out_layout = target_layout(found, layout)
    source = CanonicalSource(ckpt, km, found.layout)
    sign = -1.0 if operation == "unmerge" else 1.0
    matched = _match(req.inputs, found, km, source.home, sign=sign, skip_nonfinite=skip_nonfinite)
    report = MergeReport(
        operation,
        str(base_path),
        str(req.out_path) if req.out_path else None,
        found.family.name,
        found.layout,
        out_layout,
        device,
        req.dry_run,
        loras=matched.matches,
    )
    for match in matched.matches:
        report.warnings.extend(f"{Path(match.path).name}: {w}" for w in match.warnings)
    if strict and report.unmatched:
        first = next(m for m in matched.matches if m.unmatched)
        module, reason = next(iter(first.unmatched.items()))
        raise InputError(
            f"--strict: {report.unmatched} LoRA modules patch nothing (e.g. {Path(first.path).name}: "
            f"{module}: {reason})"
        )
    if not matched.terms and operation != "convert":
        raise InputError("none of the LoRAs' modules patch this checkpoint; nothing to do")
    for target in matched.terms:
        stored = ckpt.info(source.home[target]).dtype
        if stored not in FLOAT_DTYPES:  # W + ΔW would be truncated to integers without a word
            raise InputError(
                f"{base_path.name}: {target} is stored as {stored}; only floating-point weights can take a LoRA",
                hint="a damaged or quantized checkpoint",
            )

    outputs = _plan_files(ckpt, km, found, source, out_layout, req.dtype, matched.terms, report)
    if outputs.kind == "new_folder" and ckpt.container != "diffusers":
        outputs.pipeline = pipeline_files(found, tokenizers_from)
        report.notes = list(outputs.pipeline.notes)
    elif tokenizers_from is not None:
        raise InputError("--tokenizers-from applies only when a single file is written as a diffusers folder")
    late: Callable[[], list[tuple[str, str]]] | None = None
    if operation != "convert":
        digest = None
        if outputs.kind == "file" and not req.dry_run and ckpt.path.is_file() and hash_base:
            digest, late = hash_while_writing(ckpt.path)
        record = _provenance(operation, ckpt, req.inputs, matched.matches, digest)
        if late is not None:
            late = filling(late, record)
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
    return Planned(ckpt, found, km, source, out_layout, matched.terms, matched.loras, outputs, report, sizes, late)


def finish_dry_run(req: Request, planned: Planned, *, overwrite: bool) -> MergeReport:
    """The report of a dry run: what the output would hold; the destination checked as the real
    run checks it, and the sizes recorded where a CLI dry run measures."""
    report = planned.report
    for f in planned.outputs.files:
        for e in f.entries:
            report.tensors += 1  # what the output would hold
            report.tensor_bytes += e.info.nbytes
            for p in e.parts:
                if p in planned.terms:
                    report.patched[component_of(p)] = report.patched.get(component_of(p), 0) + 1
    out_path = req.out_path
    if out_path is not None:  # refuse what the real run would refuse
        check_destination(out_path, overwrite=overwrite)
    if req.measured is not None and out_path is not None:
        for inner, nbytes in planned.sizes.items():
            req.measured.add(out_path / inner if inner else out_path, nbytes)
    return report


Executor = Callable[[Request, Planned], MergeReport]  # writes a plan (ops/merge.py ``executor``)


def run(
    operation: str,
    base_path: str | Path | Source,
    lora_items: Sequence[LoraInput | str | Path | LoraFile],
    output: str | Path | None,
    *,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    device: str = "auto",
    strict: bool = False,
    dry_run: bool = False,
    skip_nonfinite: bool = False,
    overwrite: bool = False,
    tokenizers_from: str | Path | None = None,
    original: str | Path | None = None,
    executor: Callable[[], Executor] | None = None,
) -> MergeReport:
    """A merge, unmerge or rewrite (``operation``: "merge", "unmerge", "convert"): planned from
    headers, then — unless a dry run — written by the executor ``executor()`` returns, asked for
    only once the plan stands (so torch's import can run beside the planning: cli/merge_cmd.py).
    Options as for ops/merge.py ``merge``."""
    started = time.perf_counter()
    req = request(operation, base_path, lora_items, output, dry_run=dry_run, dtype=dtype, original=original)
    name = planned_device(device)
    with open_checkpoint(req.opened) as ckpt:  # a pickle the caller classified is not unpickled again
        planned = plan(
            req,
            ckpt,
            layout=layout,
            family=family,
            device=name,
            strict=strict,
            skip_nonfinite=skip_nonfinite,
            tokenizers_from=tokenizers_from,
            hash_base=not req.dry_run,
        )
        if req.dry_run:
            report = finish_dry_run(req, planned, overwrite=overwrite)
        else:
            if executor is None:
                raise TypeError("a real run needs an executor (ops/merge.py executor)")
            report = executor()(req, planned)
    report.seconds = time.perf_counter() - started
    return report
