"""A LoRA read from its header alone: format, family, and per-module kind/rank/alpha/scale — no torch.

``inspect`` must answer in a fraction of a second for a 228 MB SDXL LoRA, so it never decodes the
factors: everything it reports follows from the safetensors header (names, shapes, dtypes) plus the
``alpha`` scalars, a few bytes each, read with ``pread`` and decoded with :mod:`struct`. There
are no rules here: the readers themselves (:func:`.kohya.read_kohya`, :func:`.peft.read_peft`,
with :mod:`.lycoris` and :mod:`.resolve`) run over :class:`ParamRef` views of the header instead of
tensors, so a scan and a :func:`~loratools.formats.io.load_lora` are one code path and cannot
drift (``tests/test_inspect.py`` still compares their facts for every real and synthetic file).

Dialects whose reading needs the tensor values — cloneofsimo ``.pt`` lists and safeloras (all-zero
padding pairs are dropped), pickles, peft adapter folders — and FLUX.1 spellings are not scanned:
:func:`scan_lora` returns ``None`` and the caller loads the file.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..families.spec import FamilySpec
from ..io.pread import read_exact
from ..io.safetensors import FLOAT_DTYPES, TORCH_NAMES, Header, TensorInfo
from ..io.source import SAFETENSORS, open_source
from . import kohya, peft
from .adapters import Adapter, LoraFile
from .keys import EMBED_FLAG, KOHYA_KEY, is_embedding_key, is_peft_like, is_safeloras, token_key
from .lookalike import not_a_lora
from .lycoris import adapter_params
from .verdict import ModelVerdict, is_flux_lora

# struct codes of the dtypes an alpha scalar is stored in (kohya casts alpha to the save dtype)
_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


@dataclass(frozen=True)
class ParamRef:
    """One stored tensor of a module: its key in the file, dtype/shape, and absolute byte offset.

    It answers what the readers ask of a tensor before its values (``shape``, ``dim``,
    ``numel``, ``is_floating_point``, ``reshape``; ``scalar`` reads a one-element tensor's
    bytes), so :mod:`.kohya`/:mod:`.peft` read a header exactly as they read tensors.
    """

    key: str
    info: TensorInfo
    offset: int
    path: Path | None = None  # the file, for scalar(); None: no value can be read
    view_shape: tuple[int, ...] | None = None  # after reshape(); the stored shape otherwise
    value: float | None = None  # a one-element tensor's value, when already read (scan_lora)

    @cached_property
    def shape(self) -> tuple[int, ...]:
        # cached in the instance (a frozen dataclass still has a __dict__): the readers ask a
        # factor's shape ~3 times each, ~8,000 times per SDXL header
        return self.info.shape if self.view_shape is None else self.view_shape

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return int(self.info.numel)

    def is_floating_point(self) -> bool:
        return self.info.dtype in FLOAT_DTYPES

    def reshape(self, *shape: int) -> ParamRef:
        """The same bytes seen with another shape (one ``-1`` allowed, as torch)."""
        known = math.prod(d for d in shape if d != -1)
        full = tuple(self.numel() // max(known, 1) if d == -1 else d for d in shape)
        if math.prod(full) != self.numel():
            raise InputError(f"{self.key}: {tuple(self.shape)} cannot be seen as {full}")
        return replace(self, view_shape=full)

    def scalar(self) -> float:
        """The value of a one-element tensor, read from the file (:func:`read_scalar`)."""
        if self.value is not None:
            return self.value
        if self.path is None:
            raise InputError(f"{self.key}: no file to read its value from")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return read_scalar(fd, self)
        finally:
            os.close(fd)


@dataclass
class ModuleScan:
    """One adapter as the header describes it (the facts of :class:`~loratools.report.ModuleFacts`)."""

    module: str  # canonical
    name: str  # the module's name in the file
    kind: str  # lora, locon, tucker, dora, loha, lokr, full (+dora)
    rank: int | None
    alpha: float | None  # None where the kind has no scale (full, LoKr with two full halves)
    scale: float
    shape: tuple[int, ...]  # the ΔW shape
    dtype: str  # torch name of the first factor's dtype ("float16")
    parameters: int
    params: dict[str, ParamRef]  # kohya parameter names (peft's lora_A/lora_B renamed)


@dataclass
class LoraScan:
    """What a LoRA file holds, from its header."""

    path: Path
    format: str
    family: FamilySpec | None
    metadata: dict[str, str]
    modules: dict[str, ModuleScan]
    embeddings: dict[str, TensorInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    header: Header | None = None
    verdict: ModelVerdict | None = None


def read_scalar(fd: int, ref: ParamRef) -> float:
    """The value of a one-element tensor, from its bytes (bf16 widened to float32 by hand)."""
    raw = bytearray(ref.info.nbytes)
    # a short read (the file shrank since its header was checked) is the one truncation error
    read_exact(fd, memoryview(raw), ref.offset, ref.path if ref.path is not None else ref.key)
    if ref.info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
    code = _SCALAR.get(ref.info.dtype)
    if code is None:
        raise InputError(f"{ref.key}: alpha stored as {ref.info.dtype}, which loratools does not read")
    return float(struct.unpack(code, raw)[0])


def _module_scan(module: str, name: str, adapter: Adapter, params: dict[str, ParamRef]) -> ModuleScan:
    """The facts of one adapter a reader built over header views (no tensor was read)."""
    # runs once per module of every file a census reads: properties read once each, numel
    # from the stored shapes directly
    refs = [v for v in vars(adapter).values() if isinstance(v, ParamRef)]
    rank = adapter.rank
    label = adapter.label
    no_scale = adapter.kind == "full" or rank is None
    return ModuleScan(
        module,
        name,
        label,
        rank,
        None if no_scale else adapter.alpha,
        adapter.scale,
        tuple(map(int, adapter.delta_shape())),
        TORCH_NAMES[refs[0].info.dtype],
        sum([math.prod(ref.info.shape) for ref in refs]),
        params,
    )


def _scan_modules(lora: LoraFile, refs: Mapping[str, ParamRef]) -> dict[str, ModuleScan]:
    modules: dict[str, ModuleScan] = {}
    for module, adapter in lora.adapters.items():
        name = lora.source_names.get(module, module)
        stored: Mapping[str, object] = adapter_params(adapter, None)
        params = {k: v for k, v in stored.items() if isinstance(v, ParamRef)}
        alpha = refs.get(f"{name}.alpha")
        if alpha is not None:
            params["alpha"] = alpha
        modules[module] = _module_scan(module, name, adapter, params)
    return modules


def _header_refs(header: Header, path: Path) -> dict[str, ParamRef]:
    """A :class:`ParamRef` per tensor of ``header``, every one-element ``alpha`` read up front
    through one descriptor (a file open per alpha made the scan 3× slower); one that cannot be
    decoded is left for the reader to refuse when it asks.

    The refs are made with their fields set straight into a new instance's ``__dict__`` (and the
    ``shape`` cache filled): the frozen dataclass's ``__init__`` was ~1 µs of every tensor of
    every header a census reads. They equal what ``ParamRef(key, info, offset, path)`` makes."""
    refs: dict[str, ParamRef] = {}
    start = header.data_start
    alphas: list[str] = []
    for key, info in header.tensors.items():
        ref = _new_ref(ParamRef)
        ref.__dict__.update(
            key=key, info=info, offset=start + info.start, path=path, view_shape=None, value=None, shape=info.shape
        )
        refs[key] = ref
        if key.endswith(".alpha") and info.numel == 1:
            alphas.append(key)
    if not alphas:
        return refs
    fd = os.open(path, os.O_RDONLY)
    try:
        for key in alphas:
            try:
                value = read_scalar(fd, refs[key])
            except InputError:
                continue
            refs[key].__dict__["value"] = value  # set before anyone holds the ref
    finally:
        os.close(fd)
    return refs


_new_ref = object.__new__


@dataclass(frozen=True)
class _KeyLayout:
    """What a header's key names alone say about how to read it (see :func:`_layout_of`)."""

    embeddings: tuple[str, ...]  # textual-inversion embeddings, in header order
    keys: tuple[str, ...]  # the other (LoRA) keys, in header order
    kohya_keys: tuple[str, ...]  # those of them in kohya naming
    header_only: bool  # a dialect this scan reads (not embedding-only, safeloras or FLUX.1)
    peft_like: bool


def _layout_of(names: tuple[str, ...], flagged: frozenset[str] = frozenset()) -> _KeyLayout:
    """The dispatch facts of a header's ``names``; ``flagged``: the keys its metadata marks as
    embeddings (safeloras' ``<embed>``), the one input beside the names that
    :func:`~.keys.is_embedding_key` reads."""
    stored = {k for k in names if k in flagged or is_embedding_key(k, {})}
    embeddings = tuple(k for k in names if k in stored)
    keys = [k for k in names if k not in stored]
    kohya_keys = [k for k in keys if KOHYA_KEY.match(k)]
    header_only = not (not keys or (len(kohya_keys) != len(keys) and is_safeloras(keys)) or is_flux_lora(keys))
    return _KeyLayout(embeddings, tuple(keys), tuple(kohya_keys), header_only, is_peft_like(keys))


# Layouts repeat across files (every sd-scripts SDXL LoRA of one network shape has the same
# ~3,000 keys): a census pays the per-key passes above once per layout, and a lookup (one hash
# and one comparison of the names) for every other file of it.
_cached_layout = lru_cache(maxsize=16)(_layout_of)


def clear_layout_caches() -> None:
    """Forget what the readers cache per key layout (names-only verdicts, normalized peft keys),
    so the next scan costs what a file of a layout never seen before costs."""
    from .verdict import clear_name_caches

    clear_name_caches()
    peft.clear_key_cache()
    _cached_layout.cache_clear()


def scan_lora(path: str | os.PathLike[str], family: str | FamilySpec | None = None) -> LoraScan | None:
    """Read a kohya/LyCORIS or diffusers/peft ``.safetensors`` LoRA from its header alone, with the
    readers themselves (:func:`.kohya.read_kohya`, :func:`.peft.read_peft` over :class:`ParamRef`
    views); ``None`` for anything whose reading needs the tensor values (see the module doc).
    Errors are those of ``load_lora``: they are the same code."""
    read = _read_header(path, family, require_fit=False)
    if read is None:
        return None
    lora, lora_refs, header, embeddings = read
    path = Path(lora.path or "")
    warnings = list(lora.warnings)
    if embeddings:
        warnings.append(f"also holds {len(embeddings)} textual-inversion embeddings: {', '.join(list(embeddings)[:5])}")
    return LoraScan(
        path,
        lora.source_format,
        lora.family,
        dict(header.metadata),
        _scan_modules(lora, lora_refs),
        embeddings,
        warnings,
        dict(lora.unmatched),
        header,
        lora.model,
    )


def header_lora(
    path: str | os.PathLike[str], family: str | FamilySpec | None = None, *, require_fit: bool = False
) -> LoraFile | None:
    """The :class:`LoraFile` ``load_lora`` would read, its factors :class:`ParamRef` views of the
    header (no value read; embeddings are not carried, only said in ``warnings``), or ``None``
    where :func:`scan_lora` would be. ``require_fit`` as for ``load_lora`` (merge planning)."""
    read = _read_header(path, family, require_fit=require_fit)
    if read is None:
        return None
    lora, _, _, embeddings = read
    if embeddings:  # load_lora's own words
        lora.warnings.append(
            f"also holds {len(embeddings)} textual-inversion embeddings: {', '.join(list(embeddings)[:5])}"
        )
    return lora


def _read_header(
    path: str | os.PathLike[str], family: str | FamilySpec | None, *, require_fit: bool
) -> tuple[LoraFile, dict[str, ParamRef], Header, dict[str, TensorInfo]] | None:
    source = open_source(path)
    path = source.path
    if source.kind != SAFETENSORS or not path.exists():
        return None
    header = source.header()
    metadata = header.metadata
    refs = _header_refs(header, path)
    flagged = frozenset(k for k, v in metadata.items() if v == EMBED_FLAG and k in refs)
    names = tuple(refs)
    layout = _layout_of(names, flagged) if flagged else _cached_layout(names)
    embeddings = {token_key(k): refs[k].info for k in layout.embeddings}  # as the reader names them
    lora_refs = {k: refs[k] for k in layout.keys} if layout.embeddings else refs
    keys = list(layout.keys)
    kohya_keys = layout.kohya_keys
    if not layout.header_only:
        # embedding-only files, safeloras and FLUX.1 spellings go through the full reader (one
        # dispatch rule: formats/io.py asks formats/flux.py the same question)
        return None
    if kohya_keys and len(kohya_keys) != len(keys):
        others = [k for k in keys if not KOHYA_KEY.match(k)]
        if is_peft_like(others):
            raise InputError(
                f"{path.name}: mixes kohya and diffusers/peft keys (e.g. {kohya_keys[0]} and {others[0]}); "
                "conflicting duplicates are not guessed at"
            )
        raise InputError(f"{path.name}: unknown keys beside kohya ones: {', '.join(others[:5])}")
    views: Mapping[str, Any] = lora_refs
    if kohya_keys:
        lora = kohya.read_kohya(views, metadata, family, require_fit=require_fit)
    elif layout.peft_like:
        lora = peft.read_peft(views, metadata, family, require_fit=require_fit)
    else:
        raise not_a_lora(path.name, keys) or InputError(
            f"{path.name}: unknown LoRA key layout; first keys: {', '.join(keys[:5])}"
        )
    lora.path = str(path)
    return lora, lora_refs, header, embeddings
