"""Which model a LoRA's module names are for: names first, then shapes, then what metadata claims.

A report, never a gate (docs/FAMILY.md): each SD family (the one given, or SD1/SD2/SDXL at full
size) is scored by how many of the file's modules its name tables resolve and how many of those
have the shapes of that family's weights. The shapes win over names (SD1 and SD2 share every U-Net
name) and over metadata (which can lie): a metadata claim that disagrees becomes a warning. When
no full-size family's shapes fit, the names still tell an SD family (a tiny or distilled model),
a recognised non-SD model, or nothing; the result's :class:`~.verdict.ModelVerdict` says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..errors import InputError
from ..families import FAMILIES, FamilySpec, get_family
from ..io.safetensors import FLOAT_DTYPES
from .keys import KNOWN_PARAMS
from .names import NameTables, name_tables
from .verdict import (
    FLUX_TITLE,
    MODEL,
    NONE,
    SD,
    SHAPES,
    UNKNOWN,
    ModelVerdict,
    model_by_names,
    sd_verdict,
    unknown_verdict,
)

if TYPE_CHECKING:
    import torch

    from .adapters import LoraFile

T = TypeVar("T")

# kohya ss_base_model_version / modelspec.architecture prefixes → family (docs/FORMATS.md §1.4, §5.4)
_CLAIMS = (
    ("sdxl", "sdxl"),
    ("sd_v1", "sd1"),
    ("sd_v2", "sd2"),
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
)


def claimed_family(metadata: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The family a file's metadata claims, and which key claims it."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(key, "")
        for prefix, family in _CLAIMS:
            if value.startswith(prefix):
                return family, key
    if metadata.get("ss_v2") == "True":
        return "sd2", "ss_v2"
    return None, None


def claim_warning(metadata: Mapping[str, str], spec: FamilySpec) -> str | None:
    """The warning for metadata that claims another family than the shapes show (None if it agrees)."""
    claim, claim_key = claimed_family(metadata)
    if claim is None or claim == spec.name:
        return None
    return (
        f"metadata {claim_key}={metadata.get(claim_key or '')!r} claims {FAMILIES[claim].title}, "
        f"but the shapes say {spec.title}; using {spec.title}"
    )


def _rows(params: Mapping[str, torch.Tensor], full: str, low: str) -> int | None:
    if full in params:
        return int(params[full].shape[0])
    return int(params[low].shape[0]) if low in params else None


def _cols(params: Mapping[str, torch.Tensor], full: str, low: str) -> int | None:
    if full in params:
        return math.prod(params[full].shape[1:])
    return math.prod(params[low].shape[1:]) if low in params else None


def adapter_dims(params: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in) of the ΔW a parameter group describes; ``in`` may include the kernel (in·kh·kw)."""
    if "lora_up.weight" in params and "lora_down.weight" in params:
        return int(params["lora_up.weight"].shape[0]), int(params["lora_down.weight"].shape[1])
    if "hada_w1_a" in params and "hada_w1_b" in params and "hada_t1" in params:
        # Tucker LoHa: w1_a (r, out), w1_b (r, in), t1 (r, r, kh, kw) (LyCORIS LohaModule)
        kernel = math.prod(params["hada_t1"].shape[2:])
        return int(params["hada_w1_a"].shape[1]), int(params["hada_w1_b"].shape[1]) * kernel
    if "hada_w1_a" in params and "hada_w1_b" in params:
        return int(params["hada_w1_a"].shape[0]), math.prod(params["hada_w1_b"].shape[1:])
    if "diff" in params:
        shape = params["diff"].shape
        return int(shape[0]), (int(shape[1]) if len(shape) > 1 else -1)
    if any(k.startswith("lokr_") for k in params):
        a, c = _rows(params, "lokr_w1", "lokr_w1_a"), _cols(params, "lokr_w1", "lokr_w1_b")
        if "lokr_t2" in params and "lokr_w2_a" in params and "lokr_w2_b" in params:
            # Tucker w2: t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d) (LyCORIS LokrModule)
            b: int | None = int(params["lokr_w2_a"].shape[1])
            d: int | None = int(params["lokr_w2_b"].shape[1]) * math.prod(params["lokr_t2"].shape[2:])
        else:
            b, d = _rows(params, "lokr_w2", "lokr_w2_a"), _cols(params, "lokr_w2", "lokr_w2_b")
        if a is not None and b is not None and c is not None and d is not None:
            return a * b, c * d
    return None


def _dtype_name(tensor: object) -> str:
    """A factor's dtype, for tensors and for the header-only scan's references alike."""
    info = getattr(tensor, "info", None)
    if info is not None:
        return str(info.dtype)  # safetensors spelling ("F16", "I32")
    return str(getattr(tensor, "dtype", "?")).removeprefix("torch.")


def _is_float(tensor: object) -> bool:
    info = getattr(tensor, "info", None)
    if info is not None:
        return info.dtype in FLOAT_DTYPES
    floating = getattr(tensor, "is_floating_point", None)
    return bool(floating()) if floating is not None else False


def check_factors(name: str, params: Mapping[str, torch.Tensor]) -> None:
    """A parameter group's tensors must be usable factors before any shape is read from them.

    Integer or boolean factors would be cast to float silently, empty ones (rank 0) divide by zero
    in ``alpha / r``, and a 1-D ``lora_down`` has no input width: each is one clear error here
    rather than a wrong result or a crash further on. Works on tensors and on the header-only
    scan's references (which carry a safetensors dtype and a shape).
    """
    _checked_dims(name, params)


def _checked_dims(name: str, params: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """:func:`check_factors`, returning the group's :func:`adapter_dims` (computed once: resolve
    needs them for every module and family it scores)."""
    for param, tensor in params.items():
        if param == "alpha" or param not in KNOWN_PARAMS:
            continue  # read_alpha checks alpha; unknown parameters name an unsupported algorithm later
        if not _is_float(tensor):
            raise InputError(f"{name}.{param} is {_dtype_name(tensor)}; LoRA factors are floating point")
        if math.prod(tensor.shape) == 0:
            raise InputError(f"{name}.{param} is empty (shape {tuple(tensor.shape)}): rank 0 or a damaged file")
    try:
        return adapter_dims(params)
    except IndexError:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in params.items())
        raise InputError(f"{name}: factors with too few dimensions ({shapes})") from None


def shape_fits(dims: tuple[int, int] | None, weight: tuple[int, ...]) -> bool:
    if dims is None:
        return True
    out, inp = dims
    return out == weight[0] and inp in (-1, weight[1], math.prod(weight[1:]))


@dataclass
class Resolution:
    """Modules of a file matched to one family — or, with ``family`` None, to none (``verdict`` says why)."""

    family: FamilySpec | None
    tables: NameTables | None
    matched: dict[str, str]  # file module name → canonical module
    unmatched: dict[str, str] = field(default_factory=dict)  # file module name → reason
    warnings: list[str] = field(default_factory=list)
    verdict: ModelVerdict | None = None

    @property
    def checks_shapes(self) -> bool:
        """Whether the family's weight shapes apply (full size); by names only, they do not."""
        return self.verdict is None or self.verdict.fit == SHAPES

    def weight_shape(self, canonical: str) -> tuple[int, ...] | None:
        """The target weight's shape when shapes were checked, else None (the factors' own shape)."""
        if self.tables is None or not self.checks_shapes:
            return None
        return self.tables.modules[canonical].shape


# the families told apart by names *and shapes* when none is given; others (FLUX.1) are named by
# their own module names first (verdict.model_by_names) and use their family map when it names
# every module of the file
SD_FAMILIES = ("sd1", "sd2", "sdxl")
# module names of T5 (FLUX.1's second text encoder; no SD family has one), in any dialect
T5_NAMES = ("SelfAttention", "DenseReluDense")


def _candidates(family: str | FamilySpec | None, context: int | None = None) -> list[FamilySpec]:
    """The families to score: the one given, or SD1/SD2/SDXL with the one whose cross-attention
    width is ``context`` first (768 SD1, 1024 SD2, 2048 SDXL: docs/FORMATS.md §1.1)."""
    if family is None:
        specs = [spec for name, spec in FAMILIES.items() if name in SD_FAMILIES]
        return sorted(specs, key=lambda s: s.unet is None or s.unet.context_dim != context)
    return [family if isinstance(family, FamilySpec) else get_family(family)]


def _context_dim(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> int | None:
    """In-width of a cross-attention ``to_k`` LoRA (kohya ``attn2_to_k``, diffusers ``attn2.to_k``)."""
    for name, params in groups.items():
        down = params.get("lora_down.weight")
        if ("attn2_to_k" in name or "attn2.to_k" in name) and down is not None and len(down.shape) >= 2:
            return int(down.shape[1])
    return None


def _ndim(params: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("lora_down.weight", "diff"):
        if key in params:
            return len(params[key].shape)
    return None


def _widths(dims: Mapping[str, tuple[int, int] | None]) -> Iterator[int]:
    """The ΔW widths of every group (``dims``: each group's :func:`adapter_dims`), lazily:
    :func:`~.verdict.model_by_names` reads them only for the few files whose names leave FLUX.1
    or SD3 open."""
    for pair in dims.values():
        if pair is not None:
            yield from (d for d in pair if d > 0)


def resolve(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    table: Callable[[NameTables], Mapping[str, str]],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None = None,
    *,
    require_fit: bool = False,
) -> Resolution:
    """Which model a file's modules are for, and their canonical names where an SD family's apply.

    In order: an SD family whose names and shapes fit (the best of SD1/SD2/SDXL at full size, or
    the one given); a recognised non-SD model by its names (FLUX.1, SD3, a language model:
    :func:`~.verdict.model_by_names`); an SD family by names alone, whose widths fit no full-size
    model (tiny or distilled: the shape check is dropped, the name tables still apply); else
    unknown. Only ``require_fit`` (merge: the widths must be the base's) makes a file that fits
    no family's shapes an error.
    """
    dims = {name: _checked_dims(name, params) for name, params in groups.items()}
    if family is None and not require_fit:
        other = model_by_names(groups, _widths(dims))
        if other is not None:
            mapped = FAMILIES.get(other.family)
            names = table(name_tables(mapped)) if mapped is not None else {}
            if mapped is None or not all(n in names for n in groups):
                return Resolution(None, None, {}, {}, [], other)  # no (complete) family map: verbatim
            family = mapped
    scored = []
    context = _context_dim(groups) if family is None else None
    for spec in _candidates(family, context):
        tables = name_tables(spec)
        names = table(tables)
        hits = {n: names[n] for n in groups if n in names}
        modules = tables.modules
        fits = sum(shape_fits(dims[n], modules[c].shape) for n, c in hits.items())
        structure = sum(_ndim(groups[n]) == len(modules[c].shape) for n, c in hits.items())
        scored.append((fits, len(hits), structure, spec, tables, hits))
        if fits == len(groups) and context is not None and spec.unet is not None and spec.unet.context_dim == context:
            # every module fits the family its cross-attention width names: no other family can
            # score as well (their to_k widths differ), so the rest are not scored
            break
    claim, claim_key = claimed_family(metadata)
    if not any(s[0] for s in scored):
        return _by_names(groups, dims, scored, metadata, family, require_fit)
    scored.sort(key=lambda s: (s[0], s[1], s[3].name == claim), reverse=True)
    fits, hits_count, _, spec, tables, hits = scored[0]
    warnings = []
    if family is None and len(scored) > 1 and scored[1][:2] == (fits, hits_count):
        tied = sorted({spec.name, scored[1][3].name})
        warnings.append(
            f"names and shapes fit {' and '.join(tied)} equally; chose {spec.title}"
            + (f" (metadata {claim_key} says so)" if claim == spec.name else "; pass --family to choose")
        )
    if family is None and (claim_note := claim_warning(metadata, spec)) is not None:
        warnings.append(claim_note)
    unmatched = {n: "no such module in " + spec.title for n in groups if n not in hits}
    for name, canonical in list(hits.items()):
        if not shape_fits(dims[name], tables.modules[canonical].shape):
            unmatched[name] = f"shape {dims[name]} does not fit {canonical} {tables.modules[canonical].shape}"
            del hits[name]
    return Resolution(
        spec, tables, hits, unmatched, warnings, sd_verdict(spec.name, spec.title, full_size=True, kind=_kind(spec))
    )


def _kind(spec: FamilySpec) -> str:
    return SD if spec.name in SD_FAMILIES else MODEL


def _by_names(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    dims: Mapping[str, tuple[int, int] | None],
    scored: list[tuple[int, int, int, FamilySpec, NameTables, dict[str, str]]],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None,
    require_fit: bool,
) -> Resolution:
    """No family's shapes fit: an SD family by names (shapes unchecked), a named model, or unknown."""
    claim, _ = claimed_family(metadata)
    # SD1 and SD2 share every U-Net name: the weights' ranks (a conv 1x1 proj_in is SD1's) and
    # then the metadata's claim break the tie, then the order SD1, SD2, SDXL
    order = {name: i for i, name in enumerate(FAMILIES)}
    scored = sorted(scored, key=lambda s: (-s[1], -s[2], s[3].name != claim, order.get(s[3].name, 9)))
    _, hits_count, _, spec, tables, hits = scored[0]
    if require_fit:
        if not hits_count:
            sample = ", ".join(list(groups)[:4])
            raise InputError(f"no module of this file belongs to {spec.title} (first modules: {sample})")
        name = next(iter(hits))
        raise InputError(
            f"no module of this file fits {spec.title}'s weights (e.g. {name}: shape {dims[name]} does not fit "
            f"{hits[name]} {tables.modules[hits[name]].shape})",
            hint="a LoRA for another model, or a damaged file",
        )
    if not hits_count:
        other = model_by_names(groups, _widths(dims)) or unknown_verdict(groups)
        return Resolution(None, None, {}, {}, [], other)
    unplaced = [n for n in groups if n not in hits]
    if unplaced or spec.name not in SD_FAMILIES:
        # Canonical names without shapes would drop the modules the tables do not name (a FLUX.1
        # LoRA's T5 lora_te2_/lora_te3_ read as SD 1.x), and a non-SD map's writers need its full
        # widths (FLUX.1's fused qkv rows): every module is read, and written, by its own name.
        return Resolution(None, None, {}, {}, [], _verbatim_verdict(groups, dims, spec, len(hits), unplaced))
    widths = "full-size " + spec.title if family is None else spec.title + " as given"
    verdict = sd_verdict(
        spec.name,
        spec.title,
        kind=_kind(spec),
        full_size=False,
        note=f"{spec.title} names; widths fit no {widths} — a tiny or distilled model",
    )
    warnings = []
    if claim is not None and claim != spec.name:
        warnings.append(f"metadata claims {FAMILIES[claim].title}, but the names say {spec.title}; using {spec.title}")
    unmatched = {n: "no such module in " + spec.title for n in groups if n not in hits}
    return Resolution(spec, tables, dict(hits), unmatched, warnings, verdict)


def _verbatim_verdict(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    dims: Mapping[str, tuple[int, int] | None],
    spec: FamilySpec,
    placed: int,
    unplaced: list[str],
) -> ModelVerdict:
    """The model a LoRA is for when its modules are kept by their own names (no family map applies)."""
    named = model_by_names(groups, _widths(dims))
    if named is not None:
        return named
    if any(needle in name for name in groups for needle in T5_NAMES):
        return ModelVerdict(MODEL, "flux1", FLUX_TITLE, NONE, "FLUX.1 by its T5 text-encoder module names")
    if not unplaced:
        return ModelVerdict(MODEL, spec.name, spec.title, NONE, f"{spec.title} by its module names, widths unknown")
    return ModelVerdict(
        UNKNOWN,
        "unknown",
        "unknown model",
        NONE,
        f"{spec.title} names for {placed} of {len(groups)} modules, the others no {spec.title} module "
        f"(e.g. {unplaced[0]}): every module kept by its own name",
    )


class Unplaced(str):
    """Why a module was not placed in the family (the string itself), carrying what surgery needs
    to keep it (issue 13, nothing lost): ``keys``, the module's tensors under the file's own keys,
    and ``malformed``, why its factors make no adapter (None: a readable adapter, acted on under
    its own name; else it is copied verbatim)."""

    keys: Mapping[str, torch.Tensor]
    malformed: str | None
    after: str | None  # the module before it in the file (an adapter key or another such name)

    def __new__(
        cls, reason: str, keys: Mapping[str, torch.Tensor], malformed: str | None = None, after: str | None = None
    ) -> Unplaced:
        made = super().__new__(cls, reason)
        made.keys, made.malformed, made.after = keys, malformed, after
        return made


def refuse_unplaced(unmatched: Mapping[str, str], title: str, writing: str) -> None:
    """Refuse, in one line naming one, to write a LoRA without source modules its reader left out
    (read for a merge, or by a reader that does not carry them: anything but an :class:`Unplaced`
    reason): the output would be missing them silently (issue 14, nothing lost)."""
    left = {name: why for name, why in unmatched.items() if not isinstance(why, Unplaced)}
    if not left:
        return
    name, reason = next(iter(left.items()))
    raise InputError(
        f"{len(left)} modules of the source are not placed in {title} (e.g. {name}: {reason}); "
        f"writing {writing} would leave them out",
        hint="a LoRA for another model or with modules of its own: inspect it, or read it without --family",
    )


def carried(lora: LoraFile) -> tuple[dict[str, str], dict[str, Unplaced]]:
    """(readable, malformed) modules of a family's LoRA that its name tables do not place: the
    readable are adapters keyed by their own names in the source's dialect (name → reason)."""
    readable: dict[str, str] = {}
    malformed: dict[str, Unplaced] = {}
    for name, why in lora.unmatched.items():
        if isinstance(why, Unplaced) and why.malformed is not None:
            malformed[name] = why
        elif name in lora.adapters:
            readable[name] = why
    return readable, malformed


def own_dialect(source_format: str) -> str:
    """The namespace a reader keeps unplaced modules' names in: kohya lora_names or peft paths."""
    return "kohya" if source_format == "kohya" else "peft"


def unplaced_names(
    lora: LoraFile,
    tables: NameTables,
    writing: str,
    name_of: Callable[[str], str],
    by_rule: Callable[[str], str | None] | None = None,
) -> dict[str, str]:
    """The name in ``writing`` ("kohya"/"peft") of each unplaced module kept as an adapter.

    In its own dialect a module keeps its own name; across dialects, a name the source dialect's
    table knows (a module of the family with widths of its own) is mapped through the canonical
    module (``name_of``); any other cannot be named, and the write is refused naming those modules
    (one line), never written without them. Malformed modules are copied verbatim only within
    their own dialect (:func:`verbatim_keys`), and are refused here across dialects. ``by_rule``:
    the writer's string rule for a name no table knows (peft ``unet.a.b`` → kohya ``lora_unet_a_b``;
    None where it has none).
    """
    readable, malformed = carried(lora)
    same = own_dialect(lora.source_format) == writing
    source_table = tables.kohya if lora.source_format == "kohya" else tables.peft
    names: dict[str, str] = {}
    lost: dict[str, str] = {}
    for name, why in readable.items():
        if same:
            names[name] = name
        elif name in source_table:
            names[name] = name_of(source_table[name])
        elif by_rule is not None and (ruled := by_rule(name)) is not None:
            names[name] = ruled
        else:
            lost[name] = why
    if not same:
        lost.update({name: f"{why}; malformed: {why.malformed}" for name, why in malformed.items()})
    if lost:
        name, reason = next(iter(lost.items()))
        raise InputError(
            f"{len(lost)} modules of the source are not placed in {lora.family_title} and have no {writing} form "
            f"(e.g. {name}: {reason}); writing it in {writing} naming would leave them out",
            hint=f"write it in its own dialect (--to {lora.source_format}), which keeps them under their own names",
        )
    return names


def verbatim_keys(lora: LoraFile, writing: str, written: Mapping[str, Mapping[str, T]]) -> dict[str, T]:
    """The writer's keys (``written``: adapter key → its keys and tensors) with the file's own
    keys of every malformed unplaced module spliced in where the file held it, for a writer of
    the source's own dialect (across dialects :func:`unplaced_names` has refused them already).

    A malformed module whose keys an adapter's take (a blend of a file holding it malformed with
    one holding it sound) is refused by name: two tensors under one key cannot both be kept.
    """
    verbatim = carried(lora)[1] if own_dialect(lora.source_format) == writing else {}
    taken = {key for keys in written.values() for key in keys}
    following: dict[str | None, list[str]] = {}
    for name, why in verbatim.items():
        if any(key in taken for key in why.keys):
            raise InputError(
                f"{name} is not placed in {lora.family_title} ({why}; its factors make no adapter: {why.malformed}) "
                "and is also written as an adapter: both cannot be kept under one name",
                hint="repair or leave out that module of the source (inspect lists it)",
            )
        after = why.after if why.after in written or why.after in verbatim else None
        following.setdefault(after, []).append(name)
    out: dict[str, T] = {}

    def emit_after(module: str | None) -> None:
        for name in following.pop(module, []):
            out.update(verbatim[name].keys)  # type: ignore[arg-type]  # tensors: T is the writer's tensor type
            emit_after(name)

    emit_after(None)
    for module, keys in written.items():
        out.update(keys)
        emit_after(module)
    for names in list(following.values()):  # after a module no longer written (left out of a blend)
        for name in names:
            out.update(verbatim[name].keys)  # type: ignore[arg-type]
    return out


def carry_note(name: str, why: Unplaced) -> str:
    """The reader's warning for one unplaced module: what surgery does with it."""
    if why.malformed is not None:
        return f"{name}: not matched ({why}); its factors make no adapter ({why.malformed}): copied verbatim"
    return f"{name}: not matched ({why}); kept by its own name"
