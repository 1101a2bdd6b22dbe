"""Facts about files as plain data (dataclasses → dicts), rendered by the CLI or used by scripts.

The ``to_dict`` output is the ``--json`` schema; its ``schema`` field names the version. Fields are
only ever added within a version.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..families.detect import component_of_key, detect
from ..families.keymap import KeyMap
from ..families.spec import COMPONENT_ORDER, COMPONENT_TITLES
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.source import Source, open_source
from ..ops.progress import Progress, announce_total
from ..ops.provenance import read_provenance
from .facts import LIST_LIMIT, hash_facts, key_facts
from .tree import Leaf, Node, build_tree

CHECKPOINT_SCHEMA = "loratools.inspect.checkpoint/1"
_TITLES = {**COMPONENT_TITLES, "scheduler": "schedule buffers", "ema": "EMA"}


@dataclass
class ComponentFacts:
    """Counts for one part of a checkpoint."""

    name: str
    title: str
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)


@dataclass
class CheckpointReport:
    """Everything ``inspect`` says about a checkpoint."""

    path: str
    container: str  # "single_file" or "diffusers"
    file_format: str  # "safetensors", "pickle" or "mixed"
    file_bytes: int
    files: list[str]
    family: str
    family_title: str
    layout: str
    variant: str
    prediction: str
    architecture: dict[str, object]
    components: list[ComponentFacts]
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    missing: list[str]
    missing_count: int
    unknown: list[str]
    unknown_count: int
    shape_mismatches: list[str]
    notes: list[str]
    dropped_non_tensors: list[str]
    # added in issue 7 (still /1: fields are only ever added)
    read: str = "header"  # checkpoints are always described from headers
    hashes: list[dict[str, object]] | None = None  # --hashes: one entry per file (see ops/hashes.py)
    keys: list[dict[str, object]] | None = None  # --keys: every tensor {key, shape, dtype}
    tree: list[Node] = field(default_factory=list)  # modules by block; kinds = dtypes (see tree.py)
    # added in issue 14: what a loratools merge recorded it was made from (ops/provenance.py)
    provenance: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["tree"] = [node.to_dict() for node in self.tree]
        return {"schema": CHECKPOINT_SCHEMA, "kind": "checkpoint", **data}


def _file_format(files: list[Path]) -> str:
    kinds = {"safetensors" if f.suffix == ".safetensors" else "pickle" for f in files}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def inspect_checkpoint(
    path: str | os.PathLike[str] | Source,
    *,
    family: str | None = None,
    hashes: bool = False,
    keys: bool = False,
    progress: Progress | None = None,
) -> CheckpointReport:
    """Read a checkpoint's headers (never its tensor data) and describe it.

    ``hashes``: also hash every file (streamed, see :mod:`loratools.ops.hashes`); ``progress`` is
    told the bytes of all files as its total and advanced per chunk hashed. ``keys``: list every
    tensor with its shape and dtype. ``path`` may be an ``hf://`` reference or an opened
    :class:`~loratools.io.source.Source`.
    """
    with open_checkpoint(open_source(path)) as ckpt:
        found = detect(ckpt.shapes(), ckpt.metadata, family=family)
        km = found.keymap
        facts = {name: ComponentFacts(name, _TITLES[name]) for name in COMPONENT_ORDER}
        for key in ckpt:
            info = ckpt.info(key)
            part = facts[component_of_key(km, found.layout, key)]
            part.tensors += 1
            part.parameters += info.numel
            part.bytes += info.nbytes
            part.dtypes[info.dtype] = part.dtypes.get(info.dtype, 0) + 1
        components = [f for f in facts.values() if f.tensors]
        dtypes: Counter[str] = Counter()
        for f in components:
            dtypes.update(f.dtypes)
        spec = found.family
        architecture: dict[str, object] = spec.denoiser_facts()
        text_encoders: list[dict[str, object]] = [
            {
                "component": t.component,
                "hidden": t.hidden,
                "layers": t.layers if found.layout != "diffusers" else t.diffusers_layers,
            }
            for t in spec.texts
        ]
        if spec.t5 is not None:
            text_encoders.append({"component": spec.t5.component, "hidden": spec.t5.d_model, "layers": spec.t5.layers})
        architecture["text_encoders"] = text_encoders
        return CheckpointReport(
            path=str(path),
            container=ckpt.container,
            file_format=_file_format(ckpt.files),
            file_bytes=ckpt.size_bytes,
            files=[str(f) for f in ckpt.files],
            family=spec.name,
            family_title=spec.title,
            layout=found.layout,
            variant=found.variant,
            prediction=found.prediction,
            architecture=architecture,
            components=components,
            tensors=len(ckpt),
            parameters=sum(f.parameters for f in components),
            dtypes=dict(dtypes),
            metadata=dict(ckpt.metadata),
            missing=found.missing[:LIST_LIMIT],
            missing_count=len(found.missing),
            unknown=found.unknown[:LIST_LIMIT],
            unknown_count=len(found.unknown),
            shape_mismatches=found.shape_mismatches[:LIST_LIMIT],
            notes=found.notes,
            dropped_non_tensors=ckpt.dropped[:LIST_LIMIT],
            hashes=_hashes(ckpt.files, progress) if hashes else None,
            keys=[key_facts(k, ckpt.info(k)) for k in ckpt] if keys else None,
            tree=checkpoint_tree(ckpt, km, found.layout),
            provenance=read_provenance(ckpt.metadata, ckpt.path if ckpt.container == "diffusers" else None),
        )


def _hashes(files: list[Path], progress: Progress | None) -> list[dict[str, object]]:
    """Every file's hashes, one bar over all of them (each file's own total is not announced)."""
    announce_total(progress, sum(f.stat().st_size for f in files))
    advance = None if progress is None else (lambda n: progress(n))  # no set_total: one total
    return [hash_facts(f, advance) for f in files]


def checkpoint_tree(ckpt: Checkpoint, km: KeyMap, layout: str) -> list[Node]:
    """The checkpoint's modules grouped like a LoRA's (U-Net blocks, text layers, VAE halves).

    A leaf is a module (its weight and bias together); its "kind" is its dtype and its parameter
    count is summed up the tree. Keys of no module (schedule buffers, EMA copies) stay in the
    component table only.
    """
    modules: dict[str, Leaf] = {}
    for key in ckpt:
        info = ckpt.info(key)
        weights = km.lookup(layout, key)
        for weight in weights:
            # a fused tensor (SD's in_proj q/k/v, FLUX.1's qkv and linear1 = q/k/v/mlp) holds each
            # part's rows: the part's own shape counts its parameters (the mlp part is 4× a q's)
            numel = math.prod(weight.shape) if len(weights) > 1 else info.numel
            leaf = modules.get(weight.module)
            if leaf is None:
                modules[weight.module] = Leaf(weight.module, info.dtype, None, None, None, numel)
            else:
                leaf.parameters += numel
                if info.dtype not in leaf.kind.split("+"):
                    leaf.kind = f"{leaf.kind}+{info.dtype}"
    order = {w.module: i for i, w in enumerate(km.weights)}
    return build_tree(sorted(modules.values(), key=lambda leaf: order.get(leaf.module, len(order))))


__all__ = ["CHECKPOINT_SCHEMA", "CheckpointReport", "ComponentFacts", "inspect_checkpoint"]
