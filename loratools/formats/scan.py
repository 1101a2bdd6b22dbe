"""A LoRA read from its header alone: format, family, and per-module kind/rank/alpha/scale — no torch.

``inspect`` must answer in a fraction of a second for a 228 MB SDXL LoRA, so it never decodes the
factors: everything it reports follows from the safetensors header (names, shapes, dtypes) plus the
``alpha`` scalars, a few bytes each, read with ``pread`` and decoded with :mod:`struct`. The rules
are the readers' (:mod:`.kohya`, :mod:`.lycoris`, :mod:`.peft`): names come from :mod:`.keys`, the
family from :func:`.resolve.resolve`, the kind/rank/scale rules mirror the adapter classes, and
``tests/test_inspect.py`` checks that a scan and a full :func:`~loratools.formats.io.load_lora`
report the same facts for every real and synthetic file.

Dialects whose reading needs the tensor values — cloneofsimo ``.pt`` lists and safeloras (all-zero
padding pairs are dropped), pickles, peft adapter folders — are not scanned: :func:`scan_lora`
returns ``None`` and the caller loads the file.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..families import FAMILIES
from ..families.spec import FamilySpec
from ..io.headers import header_of
from ..io.safetensors import _TORCH_NAMES, FLOAT_DTYPES, Header, TensorInfo
from .keys import (
    KOHYA_KEY,
    adapter_kind_of,
    check_config_rank,
    config_number,
    configs_from_metadata,
    is_embedding_key,
    is_peft_like,
    is_safeloras,
    normalize_peft_key,
    pattern_value,
    token_key,
)
from .lookalike import not_a_lora
from .names import NameTables
from .resolve import Resolution, claim_warning, resolve
from .verdict import ModelVerdict, is_flux_lora

# struct codes of the dtypes an alpha scalar is stored in (kohya casts alpha to the save dtype)
_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


@dataclass(frozen=True)
class ParamRef:
    """One stored tensor of a module: its key in the file, dtype/shape, and absolute byte offset."""

    key: str
    info: TensorInfo
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape


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


class _NeedsTensors(Exception):
    """The header scan covers full-size SD LoRAs; anything else goes through the readers."""


def read_scalar(fd: int, ref: ParamRef) -> float:
    """The value of a one-element tensor, from its bytes (bf16 widened to float32 by hand)."""
    raw = os.pread(fd, ref.info.nbytes, ref.offset)
    if ref.info.dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
    code = _SCALAR.get(ref.info.dtype)
    if code is None:
        raise InputError(f"{ref.key}: alpha stored as {ref.info.dtype}, which loratools does not read")
    return float(struct.unpack(code, raw)[0])


def _alpha(fd: int, name: str, params: Mapping[str, ParamRef], rank: int | None, warnings: list[str]) -> float:
    """As :func:`loratools.formats.lycoris.read_alpha`: missing ⇒ rank, zero ⇒ kept and stated."""
    ref = params.get("alpha")
    if ref is None:
        return float(rank) if rank else 1.0
    if ref.info.numel != 1:
        raise InputError(f"{name}: alpha has {ref.info.numel} elements, expected one")
    value = read_scalar(fd, ref)
    if not math.isfinite(value):
        raise InputError(f"{name}: alpha is {value}")
    if value == 0:
        warnings.append(f"{name}: alpha is 0, so the module has no effect (as in kohya's merge and ComfyUI)")
    return value


def _torch_dtype(dtype: str) -> str:
    return _TORCH_NAMES[dtype]


def _numel(params: Mapping[str, ParamRef], skip: tuple[str, ...] = ("alpha",)) -> int:
    return sum(ref.info.numel for key, ref in params.items() if key not in skip)


def _first(params: Mapping[str, ParamRef], order: tuple[str, ...]) -> ParamRef:
    return next(params[k] for k in order if k in params)


def _lowrank(name: str, params: Mapping[str, ParamRef]) -> tuple[str, int, tuple[int, ...]]:
    """(kind, rank, ΔW shape) of a lora_down/lora_up(/lora_mid) group, checked as LowRank is."""
    if "lora_down.weight" not in params or "lora_up.weight" not in params:
        raise InputError(f"{name}: lora_down/lora_up pair incomplete ({sorted(params)})")
    up, down = params["lora_up.weight"].shape, params["lora_down.weight"].shape
    mid = params["lora_mid.weight"].shape if "lora_mid.weight" in params else None
    rank = int(down[0]) if down else 0
    if rank == 0 or 0 in up or 0 in down:
        raise InputError(f"{name}: empty factors (lora_down {down}, lora_up {up}): rank 0 or a damaged file")
    if (
        len(up) < 2
        or len(down) < 2
        or up[1] != rank
        or any(k != 1 for k in up[2:])
        or (mid is not None and tuple(mid[:2]) != (rank, rank))
    ):
        listed = f"lora_down {down}, lora_up {up}" + (f", lora_mid {mid}" if mid is not None else "")
        raise InputError(f"{name}: LoRA rank mismatch ({listed})")
    if mid is not None:
        shape: tuple[int, ...] = (up[0], down[1], *mid[2:])
    elif len(down) == 4:
        shape = (up[0], *down[1:])
    else:
        shape = (up[0], down[1])
    if "dora_scale" in params:
        kind = "dora"
    elif mid is not None:
        kind = "tucker"
    else:
        kind = "locon" if len(down) == 4 and down[-1] > 1 else "lora"
    return kind, rank, shape


def _kohya_module(
    fd: int, name: str, canonical: str, params: dict[str, ParamRef], weight: tuple[int, ...], warnings: list[str]
) -> ModuleScan:
    kind = adapter_kind_of(name, set(params))
    dora = "+dora" if "dora_scale" in params else ""
    rank: int | None
    if kind == "lora":
        kind, rank, shape = _lowrank(name, params)
        dtype = params["lora_up.weight"].info.dtype
        alpha: float | None = _alpha(fd, name, params, rank, warnings)
        scale = alpha / rank
        _check_natural(name, shape, weight)
    elif kind == "loha":
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not set(need) <= set(params):
            raise InputError(f"{name}: LoHa factors incomplete ({sorted(params)})")
        rank = int(params["hada_w1_b"].shape[0])
        if int(params["hada_w2_b"].shape[0]) != rank:
            warnings.append(
                f"{name}: LoHa halves have ranks {rank} and {int(params['hada_w2_b'].shape[0])}; scale uses {rank} (hada_w1_b)"
            )
        alpha = _alpha(fd, name, params, rank, warnings)
        scale, shape, dtype, kind = alpha / rank, tuple(weight), params["hada_w1_a"].info.dtype, "loha" + dora
    elif kind == "lokr":
        keys = set(params)
        if not ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) or not (
            "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        ):
            raise InputError(f"{name}: LoKr factors incomplete ({sorted(keys)})")
        if ("lokr_w1" in keys and keys & {"lokr_w1_a", "lokr_w1_b"}) or (
            "lokr_w2" in keys and keys & {"lokr_w2_a", "lokr_w2_b", "lokr_t2"}
        ):
            raise InputError(f"{name}: LoKr half given both full and factored ({sorted(keys)})")
        ranks = [int(params[k].shape[0]) for k in ("lokr_w1_b", "lokr_w2_b") if k in params]
        if len(set(ranks)) > 1:
            warnings.append(
                f"{name}: LoKr halves have ranks {ranks[0]} and {ranks[1]}; scale uses {ranks[0]} (lokr_w1_b), "
                "as LyCORIS does (ComfyUI would use lokr_w2_b's)"
            )
        rank = ranks[0] if ranks else None
        value = _alpha(fd, name, params, rank, warnings)
        alpha, scale = (value, value / rank) if rank else (None, 1.0)
        dtype = _first(params, ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a")).info.dtype
        shape, kind = tuple(weight), "lokr" + dora
    else:
        if "diff" not in params:
            raise InputError(f"{name}: full-diff module has diff_b but no diff")
        if "alpha" in params:
            warnings.append(f"{name}: a full-diff module has no scale; its alpha is ignored")
        if tuple(params["diff"].shape) != tuple(weight):
            raise InputError(f"{name}: diff {params['diff'].shape} is not the weight's shape {tuple(weight)}")
        rank, alpha, scale, shape, dtype = None, None, 1.0, tuple(weight), params["diff"].info.dtype
    _check_dora(name, params, tuple(weight))
    return ModuleScan(canonical, name, kind, rank, alpha, scale, shape, _torch_dtype(dtype), _numel(params), params)


def _check_dora(name: str, params: Mapping[str, ParamRef], weight: tuple[int, ...]) -> None:
    """As :func:`loratools.formats.lycoris.dora_axis`: the magnitude must fit the output axis
    (``(out,)``, ``(out, 1[, 1, 1])``) or the input axis (``(1, in[, 1, 1])``)."""
    ref = params.get("dora_scale")
    if ref is None:
        return
    shape, numel = ref.shape, ref.info.numel
    out, inp = int(weight[0]), int(weight[1])
    if len(shape) >= 1 and shape[0] == out and numel == out:
        return
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp == numel:
        return
    raise InputError(
        f"{name}: dora_scale {tuple(shape)} fits neither the output axis ({out}) nor the input axis ({inp})"
    )


_MATRIX_PARAMS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "hada_", "lokr_")


def _check_factors(name: str, params: Mapping[str, ParamRef]) -> None:
    """Factors are floating-point matrices (or 4-D conv kernels): checked before any shape is read,
    so a 1-D or integer "factor" is one clear refusal, never an IndexError or a silent cast."""
    for param, ref in params.items():
        if param == "alpha":
            continue
        if ref.info.dtype not in FLOAT_DTYPES:
            raise InputError(f"{name}.{param} is {ref.info.dtype}; LoRA factors are floating point")
        if param.startswith(_MATRIX_PARAMS) and len(ref.shape) < 2:
            raise InputError(f"{name}.{param} has shape {tuple(ref.shape)}; LoRA factors are matrices")


def _check_natural(name: str, natural: tuple[int, ...], weight: tuple[int, ...]) -> None:
    if natural[0] != weight[0] or math.prod(natural) != math.prod(weight):
        raise InputError(f"{name}: the factors give a ΔW of shape {tuple(natural)}, the weight is {tuple(weight)}")


def _unmatched_warnings(unmatched: Mapping[str, str], warnings: list[str], *, more: bool) -> None:
    for name, reason in list(unmatched.items())[:20]:
        warnings.append(f"{name}: not matched ({reason})")
    if more and len(unmatched) > 20:
        warnings.append(f"… and {len(unmatched) - 20} more modules not matched")


def _context_dim(groups: Mapping[str, Mapping[str, ParamRef]], marker: str) -> int | None:
    """In-dim of a cross-attention ``to_k`` LoRA: 768 SD1, 1024 SD2, 2048 SDXL (docs/FORMATS.md §1.1)."""
    for name, params in groups.items():
        down = params.get("lora_down.weight")
        if marker in name and down is not None and len(down.shape) >= 2:
            return int(down.shape[1])
    return None


def _resolve(
    groups: Mapping[str, Mapping[str, ParamRef]],
    table: Callable[[NameTables], Mapping[str, str]],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None,
    marker: str,
) -> Resolution:
    """:func:`resolve`, trying the family a cross-attention width names first.

    If every module of the file fits that family, no other family can score as well (their
    ``attn2.to_k`` width differs), so resolving against all three — building each one's name
    tables, ~10 ms apiece — would pick the same; only the metadata-claim warning is added here.
    Anything less than a full fit takes the general path, warnings and ties included.
    """
    width = _context_dim(groups, marker) if family is None else None
    guess = next((s for s in FAMILIES.values() if s.unet is not None and s.unet.context_dim == width), None)
    if guess is not None:
        try:
            found = resolve(groups, table, metadata, guess)  # type: ignore[arg-type]
        except InputError:
            found = None
        if found is not None and not found.unmatched and found.family is not None and found.checks_shapes:
            if (note := claim_warning(metadata, guess)) is not None:
                found.warnings.append(note)
            return found
    found = resolve(groups, table, metadata, family)  # type: ignore[arg-type]
    if found.family is None or not found.checks_shapes:
        raise _NeedsTensors  # names only, or no family map: one code path, the readers'
    return found


def _scan_kohya(
    fd: int,
    refs: Mapping[str, ParamRef],
    matches: Mapping[str, re.Match[str]],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None,
) -> tuple[FamilySpec | None, dict[str, ModuleScan], list[str], dict[str, str], ModelVerdict | None]:
    groups: dict[str, dict[str, ParamRef]] = {}
    for key, ref in refs.items():
        match = matches[key]
        groups.setdefault(match.group(1), {})[match.group(2)] = ref
    for name, params in groups.items():
        _check_factors(name, params)
    found = _resolve(groups, lambda t: t.kohya, metadata, family, "attn2_to_k")
    warnings = list(found.warnings)
    modules: dict[str, ModuleScan] = {}
    for name, canonical in found.matched.items():
        if canonical in modules:
            raise InputError(f"{canonical} is given twice (as {name} and under another spelling)")
        weight = found.weight_shape(canonical)
        assert weight is not None  # _resolve hands over full-size fits only
        modules[canonical] = _kohya_module(fd, name, canonical, groups[name], weight, warnings)
    missing_alpha = [n for n in found.matched if "alpha" not in groups[n] and "diff" not in groups[n]]
    if missing_alpha:
        warnings.append(
            f"{len(missing_alpha)} modules have no alpha (e.g. {missing_alpha[0]}); assumed alpha = rank, scale 1"
        )
    _unmatched_warnings(found.unmatched, warnings, more=True)
    return found.family, modules, warnings, dict(found.unmatched), found.verdict


def _scan_peft(
    refs: Mapping[str, ParamRef], metadata: Mapping[str, str], family: str | FamilySpec | None
) -> tuple[FamilySpec | None, dict[str, ModuleScan], list[str], dict[str, str], ModelVerdict | None, str]:
    groups: dict[str, dict[str, ParamRef]] = {}
    spellings: Counter[str] = Counter()
    for key, ref in refs.items():
        module, param, spelling = normalize_peft_key(key)
        spellings[spelling] += 1
        if param in groups.setdefault(module, {}):
            raise InputError(f"{module}.{param} is given twice (in two spellings)")
        groups[module][param] = ref
    for module, params in groups.items():
        _check_factors(module, {("lora_down.weight" if p == "lora_A.weight" else p): r for p, r in params.items()})
    renamed = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    kohya_style = {m: {renamed[p]: r for p, r in params.items() if p in renamed} for m, params in groups.items()}
    found = _resolve(kohya_style, lambda t: t.peft, metadata, family, "attn2.to_k")
    configs = configs_from_metadata(metadata)
    warnings = list(found.warnings)
    modules: dict[str, ModuleScan] = {}
    no_config = set()
    for module, canonical in found.matched.items():
        params = groups[module]
        if "lora_A.weight" not in params or "lora_B.weight" not in params:
            raise InputError(f"{module}: lora_A/lora_B pair incomplete ({sorted(params)})")
        down, up = params["lora_A.weight"].shape, params["lora_B.weight"].shape
        if len(down) < 2 or len(up) < 2 or 0 in down or 0 in up:
            raise InputError(f"{module}: lora_A {down} and lora_B {up} are not LoRA factors")
        rank = int(down[0])
        if int(up[1]) != rank:
            raise InputError(f"{module}: rank mismatch: lora_A {down}, lora_B {up}")
        if "lora_B.bias" in params:
            raise InputError(f"{module}: lora_B.bias (peft lora_bias=True) cannot be represented; not supported")
        folder, path = module.split(".", 1)
        config = configs.get(folder)
        alpha = float(rank)
        if config is None:
            no_config.add(folder)
        else:
            check_config_rank(config, folder, path, rank)
            lora_alpha = pattern_value(config.get("alpha_pattern") or {}, path)
            lora_alpha = config.get("lora_alpha", rank) if lora_alpha is None else lora_alpha
            lora_alpha = config_number(lora_alpha, f"{folder} lora_alpha for {path}")
            alpha = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank) * rank
        as_kohya = dict(kohya_style[module])
        if "lora_magnitude_vector" in params:
            as_kohya["dora_scale"] = params["lora_magnitude_vector"]
        kind, _, shape = _lowrank(module, as_kohya)
        modules[canonical] = ModuleScan(
            canonical,
            module,
            kind,
            rank,
            alpha,
            alpha / rank,
            shape,
            _torch_dtype(params["lora_B.weight"].info.dtype),
            _numel(as_kohya),
            as_kohya,
        )
    if no_config:
        warnings.append(
            f"no lora_alpha stored for {', '.join(sorted(no_config))}: assumed scale 1 (alpha = rank), "
            "as diffusers does"
        )
    _unmatched_warnings(found.unmatched, warnings, more=False)
    top = spellings.most_common(1)[0][0]
    fmt = "diffusers" if top == "peft" else top
    return found.family, modules, warnings, dict(found.unmatched), found.verdict, fmt


def scan_lora(path: str | os.PathLike[str], family: str | FamilySpec | None = None) -> LoraScan | None:
    """Scan a kohya/LyCORIS or diffusers/peft ``.safetensors`` LoRA from its header; ``None`` for
    anything that needs its tensors read (see the module doc). Errors are those of ``load_lora``."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return None
    with open(path, "rb") as fh:
        head = fh.read(9)
    if path.suffix != ".safetensors" and not (len(head) == 9 and head[8:9] == b"{"):
        return None
    header = header_of(path)
    metadata = header.metadata
    refs = {k: ParamRef(k, i, header.data_start + i.start) for k, i in header.tensors.items()}
    stored_embeddings = {k for k in refs if is_embedding_key(k, metadata)}
    embeddings = {token_key(k): refs[k].info for k in stored_embeddings}  # as the reader names them
    lora_refs = {k: r for k, r in refs.items() if k not in stored_embeddings}
    keys = list(lora_refs)
    matches = {k: m for k in keys if (m := KOHYA_KEY.match(k)) is not None}
    kohya_keys = list(matches)
    if not keys or (len(kohya_keys) != len(keys) and is_safeloras(keys)) or is_flux_lora(keys):
        # embedding-only files, safeloras and FLUX.1 spellings go through the full reader (one
        # dispatch rule: formats/io.py asks formats/flux.py the same question)
        return None
    if kohya_keys and len(kohya_keys) != len(keys):
        others = [k for k in keys if k not in matches]
        if is_peft_like(others):
            raise InputError(
                f"{path.name}: mixes kohya and diffusers/peft keys (e.g. {kohya_keys[0]} and {others[0]}); "
                "conflicting duplicates are not guessed at"
            )
        raise InputError(f"{path.name}: unknown keys beside kohya ones: {', '.join(others[:5])}")
    fd = os.open(path, os.O_RDONLY)
    try:
        if kohya_keys:
            spec, modules, warnings, unmatched, verdict = _scan_kohya(fd, lora_refs, matches, metadata, family)
            fmt = "kohya"
        elif is_peft_like(keys):
            spec, modules, warnings, unmatched, verdict, fmt = _scan_peft(lora_refs, metadata, family)
        else:
            raise not_a_lora(path.name, keys) or InputError(
                f"{path.name}: unknown LoRA key layout; first keys: {', '.join(keys[:5])}"
            )
    except _NeedsTensors:
        return None
    finally:
        os.close(fd)
    if embeddings:
        warnings.append(f"also holds {len(embeddings)} textual-inversion embeddings: {', '.join(list(embeddings)[:5])}")
    return LoraScan(path, fmt, spec, dict(metadata), modules, embeddings, warnings, unmatched, header, verdict)
