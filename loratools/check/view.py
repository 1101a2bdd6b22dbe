"""What a LoRA file looks like to a loader: its stored keys grouped per module, and what each
module should do (loratools' reading: canonical name, kind, rank, true alpha and scale).

Loaders decide from key *spellings* (``lora_unet_…``, ``unet.….lora_A.weight``,
``…processor.to_q_lora.up.weight``) and from which parameters sit beside each other, so the view
keeps both: the raw keys exactly as stored, and loratools' reading of them. Built from the
safetensors header alone (alpha scalars read with ``pread``); pickles, cloneofsimo lists and peft
folders need their tensors read (docs/CHECK.md §1).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..families import FAMILIES
from ..families.spec import FamilySpec
from ..formats.keys import KOHYA_KEY, PEFT_METADATA_KEY, is_embedding_key, is_safeloras, normalize_peft_key
from ..formats.names import NameTables, name_tables
from ..io.source import Source, open_source

if TYPE_CHECKING:
    from ..formats.scan import LoraScan

# Raw spellings of peft/diffusers-family keys (docs/CHECK.md §1; docs/FORMATS.md §2.1, §2.3).
_SPELLINGS = (
    ("attn-processor", re.compile(r"\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight$")),
    ("old-text", re.compile(r"\.self_attn\.to_(q|k|v|out)_lora\.(down|up)\.weight$")),
    ("linear-layer", re.compile(r"\.lora_linear_layer\.(down|up)\.weight$")),
    ("lora-layer", re.compile(r"\.lora\.(down|up)\.weight$")),
    ("peft", re.compile(r"\.(lora_A|lora_B)(\.[^.]+)?\.(weight|bias)$|\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")),
)
_PEFT_PARAMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_FOLDERS = ("unet.", "text_encoder.", "text_encoder_2.")


@dataclass
class StoredModule:
    """One module's keys as stored, and what loratools reads them to mean."""

    stem: str  # the key prefix every loader groups on ("lora_unet_…", "unet.down_blocks.….to_q")
    keys: dict[str, str]  # parameter (kohya vocabulary: lora_down.weight, alpha, dora_scale…) → raw key
    spelling: str  # kohya | peft | attn-processor | old-text | linear-layer | lora-layer | cloneofsimo
    module: str | None = None  # canonical name; None when loratools matches it to nothing
    kind: str | None = None  # lora, locon, tucker, dora, loha, lokr, full (+dora)
    rank: int | None = None
    scale: float | None = None  # the file's own ΔW scale (alpha/r in loratools' reading)
    alpha_tensor: float | None = None  # the stored ``.alpha`` value, if any
    # FLUX.1: the canonical modules this stored one feeds (a fused BFL qkv feeds to_q, to_k, to_v)
    parts: tuple[str, ...] = ()

    @property
    def prefixed(self) -> bool:
        """A peft-family key that starts with its component folder (``unet.``, ``text_encoder.``)."""
        return self.stem.startswith(_FOLDERS)

    @property
    def component(self) -> str | None:
        return self.module.split(".", 1)[0] if self.module else None

    @property
    def path(self) -> str | None:
        return self.module.split(".", 1)[1] if self.module else None

    @property
    def raw_keys(self) -> list[str]:
        return list(self.keys.values())


@dataclass
class FileView:
    """A LoRA file as every loader sees it."""

    path: str
    family: FamilySpec | None
    format: str  # loratools' reading: kohya, diffusers, peft, diffusers-attn-processor, cloneofsimo…
    modules: list[StoredModule]
    metadata: dict[str, str] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)  # keys in no module group (embeddings…)
    loratools_error: str | None = None  # why loratools itself cannot read the file, if it cannot
    alpha_in_config: bool = False  # peft folder: alphas only in adapter_config.json
    container: str = "safetensors"  # safetensors | pickle-dict | pickle-list | peft-folder
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # raw key → stored shape

    @property
    def readable(self) -> list[StoredModule]:
        """Modules loratools reads (canonical name and scale known)."""
        return [m for m in self.modules if m.module is not None and m.scale is not None]

    @property
    def all_keys(self) -> list[str]:
        return [k for m in self.modules for k in m.raw_keys] + self.other_keys

    def tables(self) -> NameTables | None:
        return name_tables(self.family) if self.family is not None else None


def _spelling(key: str) -> tuple[str, str, str] | None:
    """(spelling, stem, kohya-vocabulary parameter) of a peft-family key, or None."""
    for spelling, pattern in _SPELLINGS:
        m = pattern.search(key)
        if m is None:
            continue
        if spelling == "peft":
            tail = key[m.start() + 1 :]
            if tail.startswith("lora_magnitude_vector"):
                return spelling, key[: m.start()], "dora_scale"
            side = "lora_A" if tail.startswith("lora_A") else "lora_B"
            param = "lora_B.bias" if tail.endswith(".bias") else _PEFT_PARAMS[f"{side}.weight"]
            return spelling, key[: m.start()], param
        side = "lora_down.weight" if m.group(m.lastindex or 0) == "down" else "lora_up.weight"
        if spelling in ("attn-processor", "old-text"):
            target = m.group(1)
            stem = key[: m.start()] + (".processor" if spelling == "attn-processor" else ".self_attn") + f".to_{target}"
            return spelling, stem, side
        return spelling, key[: m.start()], side
    if key.endswith(".alpha") and not KOHYA_KEY.match(key):
        return "peft", key[: -len(".alpha")], "alpha"
    return None


def _group(keys: list[str], metadata: Mapping[str, str]) -> tuple[list[StoredModule], list[str]]:
    groups: dict[tuple[str, str], StoredModule] = {}
    other: list[str] = []
    for key in keys:
        if is_embedding_key(key, metadata):
            other.append(key)
            continue
        m = KOHYA_KEY.match(key)
        if m is not None:
            stem, param, spelling = m.group(1), m.group(2), "kohya"
        elif (found := _spelling(key)) is not None:
            spelling, stem, param = found
        else:
            other.append(key)
            continue
        group = groups.setdefault((spelling, stem), StoredModule(stem, {}, spelling))
        group.keys[param] = key
    return list(groups.values()), other


def _canonical(group: StoredModule, tables: NameTables) -> str | None:
    if group.spelling == "kohya":
        return tables.kohya.get(group.stem)
    key = next(iter(group.keys.values()))
    try:
        module, _, _ = normalize_peft_key(key)
    except InputError:
        return None
    return tables.peft.get(module)


def _guess_family(groups: list[StoredModule]) -> FamilySpec | None:
    """The family whose module names cover the most groups (only when loratools' reader failed)."""
    best: tuple[int, FamilySpec | None] = (0, None)
    for spec in FAMILIES.values():
        tables = name_tables(spec)
        hits = sum(_canonical(g, tables) is not None for g in groups)
        if hits > best[0]:
            best = (hits, spec)
    return best[1]


def build_view(
    path: str | os.PathLike[str], family: str | FamilySpec | None = None, *, scan: LoraScan | None = None
) -> FileView:
    """The :class:`FileView` of a LoRA file or peft folder; header-only for safetensors files.

    A file loratools refuses to read (an ``lora_up`` without its ``lora_down``…) still gets a view:
    loaders meet such files too, and what each does with them is the point of ``check``.
    ``scan``: the header scan of ``path`` for ``family`` already made (inspect's), used instead
    of scanning again.
    """
    from ..formats.scan import scan_lora
    from ..io.headers import header_of

    opened = open_source(path)  # a Source passed in is reused: its pickle is not read again
    source = opened.path
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    spec = FAMILIES[family] if isinstance(family, str) else family
    if source.is_dir() or source.suffix != ".safetensors":
        return _loaded_view(opened, spec)
    header = header_of(source)
    metadata = dict(header.metadata)
    keys = list(header.tensors)
    if is_safeloras(keys):
        return _loaded_view(opened, spec)
    groups, other = _group(keys, metadata)
    view = FileView(str(source), spec, "unknown", groups, metadata, other)
    view.shapes = {k: tuple(i.shape) for k, i in header.tensors.items()}
    if scan is None:
        try:
            scan = scan_lora(source, spec)
        except InputError as exc:
            view.loratools_error = str(exc)
    flux = _flux_view(view, source, header, spec, scan)
    if flux is not None:
        return flux
    if scan is not None:
        view.family, view.format = scan.family, scan.format
        by_name = {(ms.module): ms for ms in scan.modules.values()}
        # the alphas the header scan read already: only those of modules it matched nothing to are read here
        known = {ref.key: ref.value for ms in scan.modules.values() if (ref := ms.params.get("alpha")) is not None}
        _fill_alphas(view, source, header, known)
        if scan.family is None:  # no family map applies (issue 13): the engine says so per target
            return view
        tables = name_tables(scan.family)
        for g in groups:
            g.module = _canonical(g, tables)
            ms = by_name.get(g.module) if g.module else None
            if ms is not None:
                g.kind, g.rank, g.scale = ms.kind, ms.rank, ms.scale
        return view
    view.family = spec or _guess_family(groups)
    view.format = Counter(g.spelling for g in groups).most_common(1)[0][0] if groups else "unknown"
    _fill_alphas(view, source, header)
    if view.family is not None:
        tables = name_tables(view.family)
        for g in groups:
            g.module = _canonical(g, tables)
    return view


def _flux_view(view: FileView, source: Path, header: object, spec: FamilySpec | None, scan: object) -> FileView | None:
    """The FLUX.1 reading of a file, when it names more modules than the SD reading does.

    Tried only when the SD reading is not complete (a FLUX.1 spec was given, the scan found
    FLUX.1 or no family, or some group names nothing): an SD file keeps its SD view.
    """
    from ..families import FLUX1
    from .flux_view import flux_groups

    is_flux = spec is not None and spec.transformer is not None
    scanned = getattr(scan, "family", None)
    if spec is not None and not is_flux:
        return None
    if not is_flux and scanned is not None and scanned.transformer is None:
        tables = name_tables(scanned)
        if all(_canonical(g, tables) is not None for g in view.modules):
            return None  # a complete SD reading
    flux_spec = (
        spec if is_flux and spec is not None else (scanned if scanned is not None and scanned.transformer else FLUX1)
    )
    groups, other = flux_groups(view.shapes, view.metadata, flux_spec)
    if not groups:
        return None
    if not is_flux and (scanned is None or scanned.transformer is None):
        if all(g.component == "te1" for g in groups):
            return None  # CLIP-L modules only: as much an SD file as a FLUX.1 one
        candidates = [scanned] if scanned is not None else [f for f in FAMILIES.values() if f.transformer is None]
        sd_hits = max(sum(_canonical(g, name_tables(f)) is not None for g in view.modules) for f in candidates)
        if len(groups) <= sd_hits:
            return None
    flux = FileView(view.path, flux_spec, "flux1", groups, view.metadata, other, view.loratools_error)
    flux.shapes = view.shapes
    formats = Counter(g.spelling for g in groups)
    flux.format = f"flux1 {formats.most_common(1)[0][0]}"
    _fill_alphas(flux, source, header)
    for g in groups:
        if g.alpha_tensor is not None and g.rank:
            g.scale = g.alpha_tensor / g.rank
    return flux


def _fill_alphas(view: FileView, source: Path, header: object, known: Mapping[str, float | None] | None = None) -> None:
    """Each module's stored one-element ``.alpha`` value; ``known``: raw key → the value a header
    scan read (None: it could not), reused instead of reading the key again."""
    from ..formats.scan import ParamRef, read_scalar

    known = known or {}
    todo: list[tuple[StoredModule, str]] = []
    for g in view.modules:
        key = g.keys.get("alpha")
        if key is None:
            continue
        if key in known:
            value = known[key]
            if value is not None:
                g.alpha_tensor = value if math.isfinite(value) else None
        else:
            todo.append((g, key))
    if not todo:
        return
    fd = os.open(source, os.O_RDONLY)
    try:
        for g, key in todo:
            info = header.tensors.get(key)  # type: ignore[attr-defined]
            if info is not None and info.numel == 1:
                ref = ParamRef(key, info, header.data_start + info.start)  # type: ignore[attr-defined]
                try:
                    value = read_scalar(fd, ref)
                except InputError:
                    continue
                g.alpha_tensor = value if math.isfinite(value) else None
    finally:
        os.close(fd)


def _loaded_view(opened: Source, spec: FamilySpec | None) -> FileView:
    """Pickles, cloneofsimo lists/safeloras and peft folders: read with the full reader."""
    from ..formats.io import load_lora

    source = opened.path
    try:
        lora = load_lora(opened, spec)
    except InputError as exc:
        return FileView(str(source), spec, "unknown", [], loratools_error=str(exc), container="pickle-dict")
    if lora.family is None:
        return FileView(str(source), None, lora.source_format, [], dict(lora.metadata))
    tables = name_tables(lora.family)
    raw: dict[str, object] = {}
    container = "peft-folder" if source.is_dir() else "pickle-dict"
    if lora.source_format == "cloneofsimo":
        container = "pickle-list" if source.suffix != ".safetensors" else "safetensors"
    elif not source.is_dir():
        obj, _ = opened.unpickled()  # the object load_lora read: one unpickle
        raw = obj if isinstance(obj, dict) else {}
    else:
        names = [tables.peft_name(k) for k in lora.adapters]
        raw = {f"{m}.lora_{side}.weight": None for m in names for side in ("A", "B")}
    if lora.source_format == "cloneofsimo":
        groups = [
            StoredModule(name, {"lora_up.weight": f"{name}:up", "lora_down.weight": f"{name}:down"}, "cloneofsimo")
            for name in lora.adapters
        ]
        for g, (name, adapter) in zip(groups, lora.adapters.items(), strict=True):
            g.module, g.kind, g.rank, g.scale = name, adapter.kind, adapter.rank, adapter.scale
        return FileView(str(source), lora.family, "cloneofsimo", groups, dict(lora.metadata), container=container)
    groups, other = _group([k for k in raw if isinstance(k, str)], lora.metadata)
    for g in groups:
        g.module = _canonical(g, tables)
        found = lora.adapters.get(g.module) if g.module else None
        if found is not None:
            adapter = found
            g.kind, g.rank, g.scale = adapter.kind, adapter.rank, adapter.scale
            if getattr(adapter, "dora_scale", None) is not None:
                g.kind = "dora" if adapter.kind == "lora" else f"{adapter.kind}+dora"
            if "alpha" in g.keys:
                g.alpha_tensor = float(raw[g.keys["alpha"]])  # type: ignore[arg-type]
    view = FileView(
        str(source), lora.family, lora.source_format, groups, dict(lora.metadata), other, container=container
    )
    view.alpha_in_config = source.is_dir()
    return view


def has_metadata_alphas(view: FileView) -> bool:
    """Whether the file's scales live in metadata (diffusers ``lora_adapter_metadata``, kohya
    ``ss_network_alpha``) or a peft config rather than in ``.alpha`` tensors."""
    return PEFT_METADATA_KEY in view.metadata or view.alpha_in_config
