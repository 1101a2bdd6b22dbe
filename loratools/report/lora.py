"""What ``inspect`` says about a LoRA, as plain data (schema ``loratools.inspect.lora/1``).

A ``.safetensors`` LoRA in kohya/LyCORIS or diffusers/peft naming is described from its header
(:func:`loratools.formats.scan.scan_lora`: no torch, a few hundred microseconds of alpha reads);
other dialects (cloneofsimo lists and safeloras, pickles, peft folders) are read in full. ``read``
says which. ``--norms`` adds ‖ΔW‖_F per module and per group, computed in factor space
(:mod:`loratools.ops.norms`); ``--hashes`` the file hashes and the check of stored ``sshs_*``
values (:mod:`loratools.ops.hashes`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..families import FAMILIES
from ..formats.keys import EMBED_FLAG, is_embedding_key
from ..formats.lookalike import check_not_lfs_pointer, flatten_embedding
from ..formats.names import name_tables
from ..formats.resolve import claimed_family
from ..formats.verdict import sd_verdict, unknown_verdict
from ..io.safetensors import TORCH_NAMES, TensorInfo
from ..io.source import PICKLE, SAFETENSORS, Source, open_source
from ..ops.progress import Progress
from ..ops.provenance import KEY as PROVENANCE_KEY
from ..ops.provenance import read_provenance

if TYPE_CHECKING:
    from ..formats.scan import LoraScan
from .facts import LIST_LIMIT, hash_facts, key_facts
from .tree import Leaf, Node, build_tree

LORA_SCHEMA = "loratools.inspect.lora/1"
TOP_TAGS = 15  # tags kept from ss_tag_frequency
# sd-scripts metadata worth a line of its own (docs/FORMATS.md §1.4); the rest stays in `metadata`
TRAINING_KEYS = (
    "ss_output_name",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_resolution",
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_epoch",
    "ss_steps",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_mixed_precision",
    "ss_clip_skip",
    "ss_seed",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_training_comment",
)


@dataclass
class ModuleFacts:
    """One adapter as inspect shows it."""

    module: str  # canonical name
    kind: str  # lora, locon, loha, lokr, full, dora, tucker
    rank: int | None
    alpha: float | None
    scale: float
    shape: list[int]  # the ΔW shape
    dtype: str
    norm: float | None = None  # ‖ΔW‖_F with --norms (factor space)


@dataclass
class EmbeddingFacts:
    """A textual-inversion embedding found in the file."""

    name: str
    shape: list[int]
    dtype: str
    vectors: int  # tokens it occupies
    width: int  # the text-encoder width it is for (768 CLIP-L, 1024 OpenCLIP-H, 1280 bigG)


@dataclass
class LoraReport:
    """Everything ``inspect`` says about a LoRA."""

    path: str
    format: str
    family: str
    family_title: str
    metadata_claims: str | None
    file_bytes: int
    modules: int
    components: dict[str, int]
    kinds: dict[str, int]
    ranks: dict[str, int]  # rank → module count
    alphas: dict[str, int]
    parameters: int
    dtypes: dict[str, int]
    embeddings: list[str]
    metadata: dict[str, str]
    warnings: list[str]
    unmatched: dict[str, str]
    module_facts: list[ModuleFacts]
    # added in issue 7 (still /1: fields are only ever added)
    read: str = "header"  # "header": names/shapes/alphas only; "tensors": the file was loaded
    family_mismatch: bool = False  # metadata claims another family than the shapes show
    tensors: int = 0  # stored tensors, alphas and embeddings included
    file_dtypes: dict[str, int] = field(default_factory=dict)  # every stored tensor, safetensors names
    embedding_facts: list[EmbeddingFacts] = field(default_factory=list)
    metadata_summary: dict[str, Any] = field(default_factory=dict)
    tree: list[Node] = field(default_factory=list)
    norms: dict[str, Any] | None = None  # --norms: {total, components{}, method}
    hashes: dict[str, object] | None = None  # --hashes
    keys: list[dict[str, object]] | None = None  # --keys
    # added in issue 13: the family as a report (formats.verdict.ModelVerdict.to_dict())
    model: dict[str, str] = field(default_factory=dict)
    loads_in: list[str] = field(default_factory=list)  # issue 19: one entry per target (loratools.check)
    provenance: dict[str, object] | None = None  # issue 14: a loratools.provenance record (ops/provenance.py)

    def to_dict(self) -> dict[str, object]:
        # field by field rather than dataclasses.asdict, whose recursive deep copy of ~1,000
        # module facts costs more than the rest of a header-only inspect
        data: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["module_facts"] = [{**vars(f), "shape": list(f.shape)} for f in self.module_facts]
        data["embedding_facts"] = [{**vars(e), "shape": list(e.shape)} for e in self.embedding_facts]
        data["tree"] = [node.to_dict() for node in self.tree]
        for name in ("components", "kinds", "ranks", "alphas", "dtypes", "metadata", "unmatched", "file_dtypes"):
            data[name] = dict(getattr(self, name))
        data["embeddings"] = list(self.embeddings)
        data["warnings"] = list(self.warnings)
        data["metadata_summary"] = json.loads(json.dumps(self.metadata_summary))
        return {"schema": LORA_SCHEMA, "kind": "lora", **data}


# --- facts from a full load (torch) --------------------------------------------------------------


def _facts_of_loaded(lora: Any) -> tuple[list[ModuleFacts], Counter[str], int]:
    facts = []
    dtypes: Counter[str] = Counter()
    for module, adapter in lora.adapters.items():
        tensors = [v for v in vars(adapter).values() if hasattr(v, "dtype") and hasattr(v, "numel")]
        for t in tensors:
            dtypes[str(t.dtype).removeprefix("torch.")] += 1
        facts.append(
            ModuleFacts(
                module,
                adapter.label,
                adapter.rank,
                adapter.alpha if adapter.rank else None,
                adapter.scale,
                list(adapter.delta_shape()),
                str(tensors[0].dtype).removeprefix("torch."),
            )
        )
    return facts, dtypes, sum(a.parameters() for a in lora.adapters.values())


# --- metadata -------------------------------------------------------------------------------------


def _tag_counts(metadata: Mapping[str, str]) -> Counter[str]:
    """Caption tags summed over datasets: ``ss_tag_frequency`` or the per-dataset ``ss_datasets``."""
    counts: Counter[str] = Counter()
    sources: list[object] = []
    for key in ("ss_tag_frequency", "ss_datasets"):
        raw = metadata.get(key)
        if not raw:
            continue
        try:
            sources.append(json.loads(raw))
        except ValueError:
            continue
    for source in sources:
        frequencies: list[object] = []
        if isinstance(source, dict):
            frequencies = list(source.values())
        elif isinstance(source, list):  # ss_datasets: [{"tag_frequency": {dir: {tag: n}}, …}, …]
            frequencies = [
                freq for ds in source if isinstance(ds, dict) for freq in (ds.get("tag_frequency") or {}).values()
            ]
        for tags in frequencies:
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, int | float):
                        counts[str(tag).strip()] += int(n)
    return counts


def _readable_time(value: str) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value)))
    except (ValueError, OverflowError, OSError):
        return value


def summarize_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The metadata people look for: training facts, top caption tags, modelspec, merge history."""
    training = {}
    for key in TRAINING_KEYS:
        if key in metadata and metadata[key] not in ("", "None"):
            value = metadata[key]
            training[key] = _readable_time(value) if key.endswith("_at") else value
    tags = _tag_counts(metadata)
    modelspec = {
        k.removeprefix("modelspec."): (v if len(v) <= 200 else f"<{len(v)} characters>")
        for k, v in metadata.items()
        if k.startswith("modelspec.")
    }
    merged = metadata.get("merged_from") or metadata.get("modelspec.merged_from")
    shown = {
        *TRAINING_KEYS,
        "ss_tag_frequency",
        "ss_datasets",
        "merged_from",
        "sshs_model_hash",
        "sshs_legacy_hash",
        PROVENANCE_KEY,  # shown in its own block
        *(k for k in metadata if k.startswith("modelspec.")),
    }
    return {
        "training": training,
        "tags": {"total": sum(tags.values()), "distinct": len(tags), "top": tags.most_common(TOP_TAGS)},
        "modelspec": modelspec,
        "merged_from": merged,
        "stored_hashes": {k: metadata[k] for k in ("sshs_model_hash", "sshs_legacy_hash") if k in metadata},
        "other_keys": len([k for k in metadata if k not in shown and metadata[k] != EMBED_FLAG]),
    }


# --- embeddings -----------------------------------------------------------------------------------


def _embedding_facts(embeddings: Mapping[str, TensorInfo | Any]) -> list[EmbeddingFacts]:
    out = []
    for name, value in embeddings.items():
        shape = [int(d) for d in value.shape]
        dtype = value.dtype if isinstance(value, TensorInfo) else str(value.dtype).removeprefix("torch.")
        width = shape[-1] if shape else 0
        vectors = math.prod(shape[:-1]) if len(shape) > 1 else 1
        out.append(EmbeddingFacts(name, shape, dtype, vectors, width))
    return out


def _family_of_embeddings(facts: list[EmbeddingFacts]) -> str | None:
    """SDXL embeddings carry clip_l + clip_g; otherwise the width names the text encoder."""
    names = {f.name.rsplit(".", 1)[-1] for f in facts}
    if {"clip_l", "clip_g"} <= names or {"text_encoders_0", "text_encoders_1"} <= names:
        return "sdxl"
    widths = {f.width for f in facts}
    for family in ("sd1", "sd2"):
        if widths == {FAMILIES[family].texts[0].hidden}:
            return family
    return None


def _embedding_file(source: Source) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The tensors of a file that holds textual-inversion embeddings and nothing else (the
    source's own header or unpickled object: nothing is read a second time)."""
    if source.kind == SAFETENSORS:
        try:
            header = source.header()
        except Exception:  # not readable as safetensors: the reader gives its own one-line error
            return None
        tensors: dict[str, Any] = dict(header.tensors)
        metadata = header.metadata
    elif source.kind == PICKLE:
        from ..io.pickle import split_tensors

        try:
            obj, _ = source.unpickled()
        except Exception:
            return None
        obj = flatten_embedding(obj)
        if not isinstance(obj, dict):
            return None
        tensors, _ = split_tensors(obj)
        metadata = {}
    else:
        return None
    if tensors and all(is_embedding_key(k, metadata) for k in tensors):
        return tensors, metadata
    return None


# --- the report -----------------------------------------------------------------------------------


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _counts(values: list[Any], *, fmt: Any) -> dict[str, int]:
    ordered = sorted(Counter(values).items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    return {fmt(k): v for k, v in ordered}


def inspect_lora(
    path: str | os.PathLike[str] | Source,
    *,
    family: str | None = None,
    norms: bool = False,
    hashes: bool = False,
    keys: bool = False,
    loads_in: bool = True,
    tree: bool = True,
    progress: Progress | None = None,
) -> LoraReport:
    """Describe a LoRA: format, family from shapes vs metadata claims, ranks, alphas, layout tree.

    Header-only (no torch) for kohya/LyCORIS and diffusers/peft ``.safetensors`` files unless
    ``norms`` is asked for. ``path`` may be an ``hf://`` reference. ``loads_in=False`` leaves out
    the per-target load summary (the loratools.check tables: most of a header-only report's time)
    and ``tree=False`` the layout tree (the next largest part); a census row uses neither.
    ``path`` may be a :class:`~loratools.io.source.Source` already opened: every step below
    reads that one source (a pickle is unpickled once for the whole report). ``progress`` is
    told each step's total and advanced as it goes (:mod:`loratools.ops.progress`): bytes hashed
    with ``hashes``, modules done with ``norms``.
    """
    from ..formats.scan import scan_lora

    source = open_source(path)
    local = source.path
    if not local.exists():
        from ..errors import InputError

        raise InputError(f"{local}: no such file or folder")
    check_not_lfs_pointer(local)
    scan = scan_lora(source, family)
    only_embeddings = None if scan is not None else _embedding_file(source)
    if only_embeddings is not None:
        return _embedding_report(str(path), local, *only_embeddings, hashes=hashes, keys=keys, progress=progress)
    all_keys: list[dict[str, object]] = []
    module_norms: dict[str, float] | None = None
    embeddings: dict[str, TensorInfo | Any]  # header infos or loaded tensors
    if scan is not None:
        facts = [
            ModuleFacts(m.module, m.kind, m.rank, m.alpha, m.scale, list(m.shape), m.dtype)
            for m in scan.modules.values()
        ]
        stored_dtypes = Counter(
            ref.info.dtype for m in scan.modules.values() for k, ref in m.params.items() if k != "alpha"
        )
        dtypes: Counter[str] = Counter({_torch_name(d): n for d, n in stored_dtypes.items()})
        per_module = {m.module: m.parameters for m in scan.modules.values()}
        parameters = sum(per_module.values())
        fmt, spec, metadata, verdict = scan.format, scan.family, scan.metadata, scan.verdict
        warnings, unmatched, embeddings = scan.warnings, scan.unmatched, dict(scan.embeddings)
        stored = dict(scan.header.tensors) if scan.header is not None else {}
        read = "header"
        if norms:
            from ..ops.norms import scan_norms

            module_norms = scan_norms(scan, progress)
    else:
        from ..formats.io import load_lora

        lora = load_lora(source, family)
        facts, dtypes, parameters = _facts_of_loaded(lora)
        per_module = {name: a.parameters() for name, a in lora.adapters.items()}
        fmt, spec, metadata, verdict = lora.source_format, lora.family, lora.metadata, lora.verdict
        warnings, unmatched, embeddings = lora.warnings, lora.unmatched, dict(lora.embeddings)
        stored = _stored_tensors(source)
        read = "tensors"
        if norms:
            from ..ops.norms import adapters_norms

            module_norms = adapters_norms(lora.adapters, progress)
    if module_norms is not None:
        broken = sorted(m for m, v in module_norms.items() if not math.isfinite(v))
        if broken:  # NaN/inf factors: no number to show, and JSON has none for them
            warnings = [
                *warnings,
                f"{len(broken)} modules hold NaN or inf factors (e.g. {broken[0]}); their ‖ΔW‖ is left out",
            ]
            module_norms = {m: v for m, v in module_norms.items() if math.isfinite(v)}
        for f in facts:
            f.norm = module_norms.get(f.module)
    assert verdict is not None  # the scan and the readers always say what model it is
    claim, key = claimed_family(metadata)
    # the model's own order; with no family map, the file's (the tree follows the names' own dots)
    order = {name: i for i, name in enumerate(name_tables(spec).modules)} if spec is not None else {}
    leaves = sorted(facts, key=lambda f: order.get(f.module, len(order)))
    # with no family map the components are the tree's top nodes, so the tree is built anyway
    layout = (
        build_tree(
            (Leaf(f.module, f.kind, f.rank, f.alpha, f.norm, per_module.get(f.module, 0)) for f in leaves),
            fold=module_norms is None,
            generic=spec is None,
        )
        if tree or spec is None or module_norms is not None
        else []
    )
    if keys:
        all_keys = [key_facts(k, i) for k, i in stored.items()]
    norm_summary = None
    if module_norms is not None:
        norm_summary = {
            "method": "factor space: ‖s·U V‖_F² = s²·Σ(UᵀU)⊙(V Vᵀ); LoHa/LoKr via exact factorizations",
            "total": math.sqrt(sum(v * v for v in module_norms.values())),
            "components": {n.key: n.norm for n in layout},
            "dora_note": "DoRA modules: norm of the low-rank update before magnitude rescaling"
            if any(f.kind.endswith("dora") for f in facts)
            else None,
        }
    return LoraReport(
        path=str(path),
        format=fmt,
        family=verdict.family,
        family_title=verdict.title,
        metadata_claims=f"{claim} ({key}={metadata.get(key or '', 'True')})" if claim else None,
        file_bytes=_size(local),
        modules=len(facts),
        components={n.key: n.modules for n in layout}
        if spec is None
        else dict(Counter(f.module.split(".", 1)[0] for f in facts)),
        kinds=dict(Counter(f.kind for f in facts)),
        ranks=_counts([f.rank for f in facts], fmt=str),
        alphas={f"{k:g}" if k is not None else "none": v for k, v in Counter(f.alpha for f in facts).items()},
        parameters=parameters,
        dtypes=dict(dtypes),
        embeddings=list(embeddings),
        metadata=dict(metadata),
        warnings=list(warnings),
        unmatched=dict(list(unmatched.items())[:LIST_LIMIT]),
        module_facts=facts,
        read=read,
        family_mismatch=claim is not None and claim != verdict.family,
        tensors=len(stored),
        file_dtypes=dict(Counter(str(i.dtype) for i in stored.values())),
        embedding_facts=_embedding_facts(embeddings),
        metadata_summary=summarize_metadata(metadata),
        tree=layout if tree else [],
        norms=norm_summary,
        hashes=hash_facts(local, progress) if hashes and local.is_file() else None,
        keys=all_keys if keys else None,
        model=verdict.to_dict(),
        loads_in=_loads_in(source, family, scan) if loads_in else [],
        provenance=read_provenance(metadata, local if local.is_dir() else None),
    )


def _torch_name(dtype: str) -> str:
    return TORCH_NAMES[dtype]


def _stored_tensors(source: Source) -> dict[str, TensorInfo]:
    """Every stored tensor of a LoRA read through torch, for --keys and the tensor count (from the
    source's header or its one unpickled object)."""
    from ..io.checkpoint import open_checkpoint

    path = source.path
    if path.is_dir():
        out: dict[str, TensorInfo] = {}
        for weights in sorted(path.rglob("adapter_model.*")):
            with open_checkpoint(weights) as ckpt:
                prefix = f"{weights.parent.relative_to(path)}/" if weights.parent != path else ""
                out.update({prefix + k: ckpt.info(k) for k in ckpt})
        return out
    if source.kind == SAFETENSORS:
        return dict(source.header().tensors)
    from ..io.pickle import split_tensors
    from ..io.safetensors import dtype_name

    obj, _ = source.unpickled()
    if isinstance(obj, list):
        return {
            f"[{i}]": TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for i, t in enumerate(obj) if hasattr(t, "dtype")
        }
    if isinstance(obj, dict):
        tensors, _ = split_tensors(obj)
        return {k: TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    return {}


def _embedding_report(
    shown: str,
    path: Path,
    tensors: dict[str, Any],
    metadata: dict[str, str],
    *,
    hashes: bool,
    keys: bool,
    progress: Progress | None = None,
) -> LoraReport:
    """A file of textual-inversion embeddings only: reported as such, with no modules."""
    from ..io.safetensors import dtype_name

    facts = _embedding_facts(tensors)
    family = _family_of_embeddings(facts)
    spec = FAMILIES[family] if family else None
    infos = {
        k: v if isinstance(v, TensorInfo) else TensorInfo(dtype_name(v.dtype), tuple(v.shape))
        for k, v in tensors.items()
    }
    claim, key = claimed_family(metadata)
    if spec is not None:
        verdict = sd_verdict(
            spec.name, spec.title, full_size=True, note=f"embeddings for {spec.title} (by their width)"
        )
    else:
        verdict = unknown_verdict(tensors)
    return LoraReport(
        path=shown,
        format="textual-inversion",
        family=spec.name if spec else "unknown",
        family_title=spec.title if spec else "unknown model",
        metadata_claims=f"{claim} ({key}={metadata.get(key or '', 'True')})" if claim else None,
        file_bytes=_size(path),
        modules=0,
        components={},
        kinds={},
        ranks={},
        alphas={},
        parameters=sum(math.prod(f.shape) for f in facts),
        dtypes=dict(Counter(_torch_name(i.dtype) for i in infos.values())),
        embeddings=list(tensors),
        metadata=dict(metadata),
        warnings=[
            f"a textual-inversion embedding ({', '.join(list(tensors)[:3])}), not a LoRA: "
            "it is loaded by the pipeline's textual-inversion loader, not merged"
        ],
        unmatched={},
        module_facts=[],
        read="header" if all(isinstance(v, TensorInfo) for v in tensors.values()) else "tensors",
        family_mismatch=claim is not None and family is not None and claim != family,
        tensors=len(infos),
        file_dtypes=dict(Counter(i.dtype for i in infos.values())),
        embedding_facts=facts,
        metadata_summary=summarize_metadata(metadata),
        hashes=hash_facts(path, progress) if hashes and path.is_file() else None,
        keys=[key_facts(k, i) for k, i in infos.items()] if keys else None,
        model=verdict.to_dict(),
        provenance=read_provenance(metadata),
    )


def _loads_in(source: Source, family: str | None, scan: LoraScan | None) -> list[str]:
    """The per-target "loads in" summary (loratools.check tables, header-only; a pickle or peft
    folder is viewed through the same opened source, and the header scan made above is reused)."""
    from ..check import loads_in

    return loads_in(source, family, scan=scan)
