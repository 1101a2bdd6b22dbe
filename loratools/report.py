"""Facts about files as plain data (dataclasses → dicts), rendered by the CLI or used by scripts.

The ``to_dict`` output is the ``--json`` schema; its ``schema`` field names the version. Fields are
only ever added within a version.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .families.detect import component_of_key, detect
from .families.spec import COMPONENT_TITLES
from .io.checkpoint import open_checkpoint

CHECKPOINT_SCHEMA = "loratools.inspect.checkpoint/1"
COMPONENT_ORDER = ("unet", "te1", "te2", "vae", "scheduler", "ema", "other")
_TITLES = {**COMPONENT_TITLES, "scheduler": "schedule buffers", "ema": "EMA"}
LIST_LIMIT = 20  # long key lists are cut to this many in reports (counts stay exact)


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

    def to_dict(self) -> dict[str, object]:
        return {"schema": CHECKPOINT_SCHEMA, "kind": "checkpoint", **asdict(self)}


def _file_format(files: list[Path]) -> str:
    kinds = {"safetensors" if f.suffix == ".safetensors" else "pickle" for f in files}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def inspect_checkpoint(path: str | Path, *, family: str | None = None) -> CheckpointReport:
    """Read a checkpoint's headers (never its tensor data) and describe it."""
    with open_checkpoint(path) as ckpt:
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
        architecture: dict[str, object] = {
            "unet_model_channels": spec.unet.model_channels,
            "unet_channel_mult": list(spec.unet.channel_mult),
            "unet_in_channels": spec.unet.in_channels,
            "cross_attention_dim": spec.unet.context_dim,
            "text_encoders": [
                {
                    "component": t.component,
                    "hidden": t.hidden,
                    "layers": t.layers if found.layout != "diffusers" else t.diffusers_layers,
                }
                for t in spec.texts
            ],
        }
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
        )


LORA_SCHEMA = "loratools.inspect.lora/1"


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

    def to_dict(self) -> dict[str, object]:
        return {"schema": LORA_SCHEMA, "kind": "lora", **asdict(self)}


def _kind(adapter: object) -> str:
    from .formats.adapters import LowRank

    if isinstance(adapter, LowRank):
        if adapter.dora_scale is not None:
            return "dora"
        if adapter.mid is not None:
            return "tucker"
        return "locon" if adapter.down.dim() == 4 and adapter.down.shape[-1] > 1 else "lora"
    dora = "+dora" if getattr(adapter, "dora_scale", None) is not None else ""
    return adapter.kind + dora  # type: ignore[attr-defined,no-any-return]


def _delta_shape(adapter: object) -> list[int]:
    from .formats.adapters import LowRank

    if isinstance(adapter, LowRank):
        return list(adapter.delta_shape())
    shape = getattr(adapter, "shape", None)
    if shape:
        return list(shape)
    if hasattr(adapter, "diff"):
        return list(adapter.diff.shape)  # type: ignore[attr-defined]
    return list(adapter.delta().shape)  # type: ignore[attr-defined]


def inspect_lora(path: str | Path, *, family: str | None = None) -> LoraReport:
    """Read a LoRA and describe it: format, family from shapes vs metadata claims, ranks, alphas."""
    from .formats.io import load_lora
    from .formats.resolve import claimed_family

    lora = load_lora(path, family)
    facts = []
    dtypes: Counter[str] = Counter()
    for module, adapter in lora.adapters.items():
        tensors = [v for v in vars(adapter).values() if hasattr(v, "dtype") and hasattr(v, "numel")]
        for t in tensors:
            dtypes[str(t.dtype).removeprefix("torch.")] += 1
        facts.append(
            ModuleFacts(
                module,
                _kind(adapter),
                adapter.rank,
                adapter.alpha if adapter.rank else None,
                adapter.scale,
                _delta_shape(adapter),
                str(tensors[0].dtype).removeprefix("torch."),
            )
        )
    claim, key = claimed_family(lora.metadata)
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return LoraReport(
        path=str(path),
        format=lora.source_format,
        family=lora.family.name,
        family_title=lora.family.title,
        metadata_claims=f"{claim} ({key}={lora.metadata.get(key or '', 'True')})" if claim else None,
        file_bytes=size,
        modules=len(lora.adapters),
        components=lora.components(),
        kinds=dict(Counter(f.kind for f in facts)),
        ranks={
            str(k): v
            for k, v in sorted(Counter(f.rank for f in facts).items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        },
        alphas={f"{k:g}" if k is not None else "none": v for k, v in Counter(f.alpha for f in facts).items()},
        parameters=sum(a.parameters() for a in lora.adapters.values()),
        dtypes=dict(dtypes),
        embeddings=list(lora.embeddings),
        metadata=dict(lora.metadata),
        warnings=list(lora.warnings),
        unmatched=dict(list(lora.unmatched.items())[:LIST_LIMIT]),
        module_facts=facts,
    )
