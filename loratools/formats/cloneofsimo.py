"""cloneofsimo lora_diffusion: ``.pt`` lists (no names: order and shapes decide) and safeloras.

A ``.pt`` file is a pickled list ``[up_0, down_0, up_1, down_1, …]``; a safeloras file holds the same
pairs as ``unet:<i>:up`` / ``unet:<i>:down`` (and ``text_encoder:<i>:…``). In both the index is the
position in lora_diffusion's module discovery order (docs/FORMATS.md §3.2): every Linear under each
``CrossAttention``/``Attention``/``GEGLU`` module of the U-Net, every Linear under each
``CLIPAttention`` of the text encoder, in registration order. We never look at class names: the
candidate orders are built from the family's module table, and the one whose every (out, in) fits
the file's shapes wins (else, for a tiny or distilled model, the one whose table widths map each
to one width of the file's pairs; the writer likewise takes shapes from the LoRA's own modules) —

* U-Net, attention only: per transformer block ``attn1 q,k,v,out`` then ``attn2 q,k,v,out``;
* U-Net with GEGLU, diffusers ≤ 0.14: ``attn1 ×4, ff.net.0.proj, attn2 ×4``;
* U-Net with GEGLU, diffusers ≥ 0.15: ``attn1 ×4, attn2 ×4, ff.net.0.proj``;
* text encoder: per layer ``k_proj, v_proj, q_proj, out_proj`` (HF CLIPAttention's registration).

Transformer blocks come in ``down_blocks…, up_blocks…, mid_block`` order (the mid block is
registered last). lora_diffusion merges ``W + up @ down`` with no alpha, so every adapter reads
with ``alpha = r`` (scale 1); safeloras ``up`` factors already hold the training-time scale.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..errors import InputError
from ..families import FAMILIES, get_family
from ..families.spec import COMPONENT_TITLES, FamilySpec
from .adapters import Adapter, LoraFile, LowRank, low_rank, plain_lora
from .keys import EMBED_FLAG, is_safeloras  # noqa: F401 (re-exported)
from .keys import SAFELORAS_KEY as KEY
from .names import name_tables
from .verdict import NONE, UNKNOWN, ModelVerdict, needs_family_map, sd_verdict

FORMAT = "cloneofsimo"
TEXT_SUFFIX = ".text_encoder.pt"
TI_SUFFIX = ".ti.pt"

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("k_proj", "v_proj", "q_proj", "out_proj")  # CLIPAttention registers k, v, q, out
GEGLU = "ff.net.0.proj"

# Orders a component's pairs may come in (docs/FORMATS.md §3.2), and what each means.
ORDERS: dict[str, str] = {
    "attention": "attn1 q,k,v,out, attn2 q,k,v,out per transformer block (no GEGLU)",
    "geglu-0.15": "attn1, attn2, GEGLU per transformer block (diffusers >= 0.15)",
    "geglu-0.14": "attn1, GEGLU, attn2 per transformer block (diffusers <= 0.14)",
    "text": "k, v, q, out per text-encoder layer",
}
UNET_TARGETS = {
    "attention": ["CrossAttention", "Attention"],
    "geglu-0.15": ["CrossAttention", "Attention", "GEGLU"],
    "geglu-0.14": ["CrossAttention", "Attention", "GEGLU"],
}
TEXT_TARGETS = ["CLIPAttention"]
# safeloras model name (the pipeline attribute) ↔ canonical component
SAFELORAS_NAMES = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
COMPONENT_NAMES = {v: k for k, v in SAFELORAS_NAMES.items()}
# lora_diffusion predates SDXL: names and shapes are matched against SD 1.x and SD 2.x unless the
# caller names a family (an SD1 text-encoder list would otherwise fit SDXL's CLIP-L as well).
AUTO_FAMILIES = ("sd1", "sd2")

_BLOCK = re.compile(
    r"^unet\.(?:down_blocks\.(\d+)|up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1\.to_q$"
)

Pair = tuple[torch.Tensor, torch.Tensor]  # (up (out, r), down (r, in))


# --- module orders ------------------------------------------------------------------------------


def _transformer_blocks(spec: FamilySpec) -> list[str]:
    """Transformer-block prefixes in lora_diffusion's discovery order: down, up, then mid."""
    found = []
    for name in name_tables(spec).modules:
        match = _BLOCK.match(name)
        if match is None:
            continue
        down, up, attention, block = match.groups()
        group, index = (0, int(down)) if down is not None else (1, int(up)) if up is not None else (2, 0)
        found.append(((group, index, int(attention), int(block)), name[: -len(".attn1.to_q")]))
    return [prefix for _, prefix in sorted(found)]


@cache
def module_order(spec: FamilySpec, component: str, order: str) -> tuple[str, ...]:
    """Canonical module names, in the pair order of a lora_diffusion file (see :data:`ORDERS`)."""
    modules = name_tables(spec).modules
    names: list[str] = []
    if component == "unet":
        for block in _transformer_blocks(spec):
            attn1 = [f"{block}.attn1.{p}" for p in UNET_ATTENTION]
            attn2 = [f"{block}.attn2.{p}" for p in UNET_ATTENTION]
            ff = [f"{block}.{GEGLU}"]
            names += {
                "attention": attn1 + attn2,
                "geglu-0.15": attn1 + attn2 + ff,
                "geglu-0.14": attn1 + ff + attn2,
            }[order]
    else:
        texts = {t.component: t for t in spec.texts}
        if component not in texts:
            return ()
        for n in range(texts[component].diffusers_layers):  # the HF encoder lora_diffusion patches
            names += [f"{component}.text_model.encoder.layers.{n}.self_attn.{p}" for p in TEXT_ATTENTION]
    missing = [n for n in names if n not in modules]
    if missing:  # a family table without these modules: a bug, not a user error
        raise AssertionError(f"{spec.name} lacks {missing[0]}")
    return tuple(names)


def _orders_for(component: str) -> tuple[str, ...]:
    return ("attention", "geglu-0.15", "geglu-0.14") if component == "unet" else ("text",)


@dataclass(frozen=True)
class OrderMatch:
    """A component's pairs matched to one family's modules in one discovery order."""

    family: FamilySpec
    component: str
    order: str
    modules: tuple[str, ...]


def width_map(shapes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[int, int] | None:
    """Each full-size width of a family's table → the width it has in a LoRA, from (table shape,
    LoRA shape) pairs; None when a width would map two ways.

    A tiny or distilled model keeps the family's structure and shrinks its widths, so one table
    width (SD 1.x's 320 channels, 768 context) has one width throughout the LoRA's model; this is
    what lets shapes come from the LoRA's own modules instead of the full-size tables.
    """
    forward: dict[int, int] = {}
    for table, actual in shapes:
        if len(table) != len(actual):
            return None
        for t, a in zip(table, actual, strict=True):
            if forward.setdefault(t, a) != a:
                return None
    return forward


def _pair_shape(pair: Pair) -> tuple[int, int]:
    up, down = pair
    return int(up.shape[0]), int(down.shape[1])


def _fits(pair: Pair, shape: tuple[int, ...]) -> bool:
    up, down = pair
    return len(shape) == 2 and int(up.shape[0]) == shape[0] and int(down.shape[1]) == shape[1]


def _first_misfit(pairs: Sequence[Pair], match: OrderMatch) -> str:
    modules = name_tables(match.family).modules
    for i, (pair, name) in enumerate(zip(pairs, match.modules, strict=True)):
        if not _fits(pair, modules[name].shape):
            up, down = pair
            return (
                f"pair {i} is ({int(up.shape[0])}, {int(down.shape[1])}) but {match.family.title} "
                f"{name} is {modules[name].shape}"
            )
    return ""


def _family_list(family: str | FamilySpec | None) -> list[FamilySpec]:
    if family is None:
        return [FAMILIES[n] for n in AUTO_FAMILIES]
    return [family if isinstance(family, FamilySpec) else get_family(family)]


def match_order(
    pairs: Sequence[Pair],
    families: Sequence[FamilySpec],
    components: Sequence[str],
    *,
    what: str = "this file",
    widths: bool = False,
) -> OrderMatch:
    """The one (family, component, order) whose module sequence fits every pair by shape.

    ``widths``: fit the family's structure at other widths (a tiny or distilled model): every
    full-size width must map to one width of the pairs (:func:`width_map`); not one-to-one, as
    a tiny model's widths may coincide (tiny SD 2.x: context 16 = the second level's channels).
    Raises :class:`InputError` when none fits or when two different assignments fit.
    """
    fitting: list[OrderMatch] = []
    same_length: list[OrderMatch] = []
    expected: list[str] = []
    for spec in families:
        modules = name_tables(spec).modules
        for component in components:
            for order in _orders_for(component):
                names = module_order(spec, component, order)
                if not names:
                    continue
                candidate = OrderMatch(spec, component, order, names)
                expected.append(f"{spec.title} {COMPONENT_TITLES[component]} {len(names)}")
                if len(names) != len(pairs):
                    continue
                same_length.append(candidate)
                if widths:
                    scaled = zip((modules[n].shape for n in names), map(_pair_shape, pairs), strict=True)
                    fits = width_map(scaled) is not None
                else:
                    fits = all(_fits(p, modules[n].shape) for p, n in zip(pairs, names, strict=True))
                if fits:
                    fitting.append(candidate)
    distinct = {(m.family.name, m.modules): m for m in fitting}
    if len(distinct) > 1:
        options = ", ".join(f"{m.family.title} {COMPONENT_TITLES[m.component]} ({ORDERS[m.order]})" for m in fitting)
        raise InputError(
            f"{what}: its {len(pairs)} LoRA pairs fit more than one module order: {options}",
            hint="pass --family to choose" if len({m.family.name for m in fitting}) > 1 else None,
        )
    if not fitting:
        detail = f"; {_first_misfit(pairs, same_length[0])}" if same_length else ""
        raise InputError(
            f"{what}: {len(pairs)} LoRA pairs fit no lora_diffusion module order "
            f"(expected pairs: {', '.join(dict.fromkeys(expected))}){detail}"
        )
    return fitting[0]


NO_FIT = "fit no lora_diffusion module order"


def _match_any_width(
    pairs: Sequence[Pair], families: Sequence[FamilySpec], components: Sequence[str], *, what: str
) -> tuple[OrderMatch, bool]:
    """(match, full_size): by the full-size shapes, else by the families' structure at the pairs'
    own widths; the full-size error is the one raised when neither fits."""
    try:
        return match_order(pairs, families, components, what=what), True
    except InputError as exc:
        if NO_FIT not in exc.message:
            raise
        try:
            return match_order(pairs, families, components, what=what, widths=True), False
        except InputError as scaled:
            if NO_FIT in scaled.message:
                raise exc from None
            raise


def _model(spec: FamilySpec, full_size: bool) -> ModelVerdict:
    return sd_verdict(spec.name, spec.title, full_size=full_size)


# --- reading --------------------------------------------------------------------------------------


def _check_pair(what: str, index: int, up: object, down: object) -> Pair:
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise InputError(f"{what}: pair {index} holds a {type(up).__name__} and a {type(down).__name__}, not tensors")
    if up.dim() == 4 or down.dim() == 4:
        raise InputError(
            f"{what}: pair {index} is a conv LoRA (lora_diffusion's extended ResnetBlock2D targets), "
            "which loratools does not read"
        )
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise InputError(
            f"{what}: pair {index} is up {tuple(up.shape)}, down {tuple(down.shape)}: not LoRA factors "
            "(expected up (out, r) then down (r, in))"
        )
    return up, down


def _pairs_of_list(what: str, tensors: Sequence[object]) -> list[Pair]:
    if not tensors:
        raise InputError(f"{what}: an empty list, no LoRA pairs")
    if len(tensors) % 2:
        raise InputError(f"{what}: a list of {len(tensors)} tensors; cloneofsimo lists hold (up, down) pairs")
    return [_check_pair(what, i, tensors[2 * i], tensors[2 * i + 1]) for i in range(len(tensors) // 2)]


def _adapters(match: OrderMatch, pairs: Sequence[Pair], warnings: list[str], what: str) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    padding = []
    for name, (up, down) in zip(match.modules, pairs, strict=True):
        if not up.any() and not down.any():
            padding.append(name)  # both factors zero: no effect (what our writer pads with)
            continue
        adapters[name] = LowRank(up, down, float(down.shape[0]))
    if padding:
        warnings.append(f"{what}: {len(padding)} modules hold all-zero factors (no effect); left out")
    return adapters


UNPLACED = re.compile(r"^(unet|text_encoder|text_encoder_2):(\d+)$")


def _unplaced(groups: Mapping[str, Sequence[Pair]], why: str, metadata: Mapping[str, str] | None = None) -> LoraFile:
    """Pairs no known family's module order fits (a tiny or other model): nothing readable is
    refused, so they are kept in their stored order as ``<group>:<index>`` ("unet:0", …), each a
    LoRA pair that rescale/resize/blend act on one by one; writing cloneofsimo keeps the order."""
    adapters: dict[str, Adapter] = {
        f"{group}:{i}": LowRank(up, down, float(down.shape[0]))
        for group, pairs in groups.items()
        for i, (up, down) in enumerate(pairs)
    }
    count = sum(len(p) for p in groups.values())
    verdict = ModelVerdict(
        UNKNOWN, "unknown", "unknown model", NONE, f"cloneofsimo, unknown model, {count} pairs ({why})"
    )
    kept = {k: v for k, v in (metadata or {}).items() if v != EMBED_FLAG and not re.match(r"^[^:]+:\d+:rank$", k)}
    return LoraFile(
        adapters, None, FORMAT, kept, warnings=[f"cloneofsimo, unknown model, {count} pairs: {why}"], model=verdict
    )


def companion_paths(path: Path) -> tuple[Path, Path]:
    """lora_diffusion's ``X.text_encoder.pt`` and ``X.ti.pt`` beside a U-Net file ``X.pt``."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + TEXT_SUFFIX), path.with_name(stem + TI_SUFFIX)


def _load_companion(path: Path) -> object:
    from ..io.pickle import load_pickle  # lazy: io imports the formats

    return load_pickle(path)


def read_pt(path: Path, tensors: list[torch.Tensor], family: str | FamilySpec | None = None) -> LoraFile:
    """A lora_diffusion ``.pt`` list, placed by shapes; a U-Net file brings its companions along.

    Given ``X.pt`` holding U-Net pairs, ``X.text_encoder.pt`` (text-encoder pairs) and ``X.ti.pt``
    (textual-inversion tokens) beside it are read too, as lora_diffusion's ``patch_pipe`` does.
    Given ``X.text_encoder.pt``, only that file is read.
    """
    path = Path(path)
    pairs = _pairs_of_list(path.name, tensors)
    families = _family_list(family)
    full_size = True
    try:
        match = match_order(pairs, families, ("unet", "te1"), what=path.name)
    except InputError as exc:
        if NO_FIT not in exc.message:
            raise
        full_size = False
        scaled = _pt_at_other_widths(path, pairs, families)
        if scaled is None:
            if family is not None:
                raise
            group = "text_encoder" if path.name.endswith(TEXT_SUFFIX) else "unet"
            return _unplaced({group: pairs}, "its pairs fit no single SD 1.x/2.x module order by shape")
        match = scaled
    warnings: list[str] = []
    adapters = _adapters(match, pairs, warnings, path.name)
    embeddings: dict[str, torch.Tensor] = {}
    if match.component == "unet" and not path.name.endswith(TEXT_SUFFIX):
        text_path, ti_path = companion_paths(path)
        if text_path.is_file():
            obj = _load_companion(text_path)
            if not isinstance(obj, list):
                raise InputError(
                    f"{text_path.name}: the text-encoder companion of {path.name} holds a "
                    f"{type(obj).__name__}, not a cloneofsimo list",
                    hint=f"move it away to read {path.name} alone",
                )
            text_pairs = _pairs_of_list(text_path.name, obj)
            text_match, _ = _match_any_width(text_pairs, [match.family], ("te1",), what=f"{text_path.name} (companion)")
            text_adapters = _adapters(text_match, text_pairs, warnings, text_path.name)
            adapters.update(text_adapters)
            warnings.append(f"read the text-encoder companion {text_path.name} ({len(text_adapters)} modules)")
        if ti_path.is_file():
            obj = _load_companion(ti_path)
            if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
                embeddings = {str(k): v for k, v in obj.items()}
                warnings.append(f"read the textual-inversion companion {ti_path.name}")
                width = match.family.texts[0].hidden
                odd = [k for k, v in embeddings.items() if v.dim() == 0 or int(v.shape[-1]) != width]
                if odd and full_size:  # at other widths the text encoder's width is not in the table
                    warnings.append(
                        f"{ti_path.name}: embedding {odd[0]} is not {width} wide like "
                        f"{match.family.title}'s text encoder; it belongs to another model"
                    )
            else:
                warnings.append(f"{ti_path.name}: not a dict of token embeddings; ignored")
    model = _model(match.family, full_size)
    return LoraFile(adapters, match.family, FORMAT, {}, embeddings=embeddings, warnings=warnings, model=model)


def _pt_at_other_widths(path: Path, pairs: Sequence[Pair], families: Sequence[FamilySpec]) -> OrderMatch | None:
    """The match of a ``.pt`` list by the families' structure at its own widths, or None.

    SD 1.x and SD 2.x U-Nets share one structure, so at other widths only the text-encoder
    companion (12 vs 23 layers) tells them apart; without it the pairs stay unplaced.
    """
    try:
        return match_order(pairs, families, ("unet", "te1"), what=path.name, widths=True)
    except InputError as exc:
        if NO_FIT in exc.message or path.name.endswith(TEXT_SUFFIX):
            return None
    text_path = companion_paths(path)[0]
    if not text_path.is_file():
        return None
    obj = _load_companion(text_path)
    if not isinstance(obj, list):
        return None  # read_pt's own companion check words the refusal
    text_pairs = _pairs_of_list(text_path.name, obj)
    found = []
    for spec in families:
        try:
            unet = match_order(pairs, [spec], ("unet",), what=path.name, widths=True)
            _match_any_width(text_pairs, [spec], ("te1",), what=text_path.name)
        except InputError:
            continue
        found.append(unet)
    return found[0] if len(found) == 1 else None


def read_safeloras(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str | FamilySpec | None = None
) -> LoraFile:
    """A safeloras state dict (embeddings already split off), placed by shapes like a ``.pt`` list."""
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    others = []
    for key, tensor in tensors.items():
        m = KEY.match(key)
        if m is None:
            others.append(key)
            continue
        grouped.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
    if others:
        raise InputError(f"safeloras file: unknown keys beside the LoRA pairs: {', '.join(others[:5])}")
    unknown = [n for n in grouped if n not in SAFELORAS_NAMES]
    if unknown:
        raise InputError(
            f"safeloras file: LoRA for an unknown model {unknown[0]!r} (known: {', '.join(SAFELORAS_NAMES)})"
        )
    pairs: dict[str, list[Pair]] = {}
    for name, entries in grouped.items():
        count = max(entries) + 1
        holes = [i for i in range(count) if set(entries.get(i, {})) != {"up", "down"}]
        if holes:
            raise InputError(f"safeloras file: {name}:{holes[0]} lacks its up or down tensor")
        pairs[name] = [_check_pair(f"{name}", i, entries[i]["up"], entries[i]["down"]) for i in range(count)]

    # The family must fit every component; each component's order is decided by shapes: the
    # full-size ones first, else the family's structure at the file's own widths (a tiny model).
    fits: dict[str, dict[str, OrderMatch]] = {}
    errors: list[InputError] = []
    full_size = True
    for widths in (False, True):
        for spec in _family_list(family):
            try:
                fits[spec.name] = {
                    name: match_order(p, [spec], (SAFELORAS_NAMES[name],), what=f"{name} pairs", widths=widths)
                    for name, p in pairs.items()
                }
            except InputError as error:
                if not widths:
                    errors.append(error)
        if fits or not all(NO_FIT in e.message for e in errors):
            break
        full_size = False
    if not fits and family is None and all(NO_FIT in e.message for e in errors):
        return _unplaced(pairs, "its pairs fit no SD 1.x/2.x module order by shape", metadata)
    if not fits:
        if len(errors) == 1:
            raise errors[0]
        raise InputError(
            "safeloras file: its pairs fit neither "
            + " nor ".join(s.title for s in _family_list(family))
            + f" ({errors[0].message})"
        )
    if len(fits) > 1 and not full_size and family is None:  # one structure, two families: keep the pairs
        return _unplaced(pairs, f"its pairs fit {' and '.join(fits)} alike at these widths; pass --family", metadata)
    if len(fits) > 1:
        raise InputError(f"safeloras file: its pairs fit {' and '.join(fits)} equally", hint="pass --family to choose")
    matches = next(iter(fits.values()))
    spec = next(iter(matches.values())).family

    warnings: list[str] = []
    adapters: dict[str, Adapter] = {}
    for name, match in matches.items():
        adapters.update(_adapters(match, pairs[name], warnings, f"{name} pairs"))
        wrong_rank = [
            i
            for i, (_, down) in enumerate(pairs[name])
            if metadata.get(f"{name}:{i}:rank", str(down.shape[0])) != str(down.shape[0])
        ]
        if wrong_rank:
            warnings.append(
                f"{len(wrong_rank)} {name} ranks in the metadata differ from the tensors "
                f"(e.g. {name}:{wrong_rank[0]}:rank); the tensors' shapes were used"
            )
        targets = _targets(metadata.get(name))
        if match.component == "unet" and targets is not None and ("GEGLU" in targets) != (match.order != "attention"):
            warnings.append(
                f"metadata {name} lists targets {targets}, but the shapes say {ORDERS[match.order]}; used the shapes"
            )
    kept = {k: v for k, v in metadata.items() if v != EMBED_FLAG and not re.match(r"^[^:]+:\d+:rank$", k)}
    lora = LoraFile(adapters, spec, FORMAT, kept, warnings=warnings, model=_model(spec, full_size))
    lora.source_order = {match.component: match.order for match in matches.values()}  # written back alike
    return lora


def _targets(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


# --- writing --------------------------------------------------------------------------------------


def bake_scale(lora: LoraFile) -> LoraFile:
    """The same LoRA with every LowRank scale folded into ``up`` (``alpha := r``; ΔW unchanged).

    cloneofsimo files have no alpha: this is what makes a LoRA with ``alpha ≠ r`` writable.
    Other adapter kinds are left as they are (the writers refuse them).
    """
    return lora.with_adapters({name: a.baked() if low_rank(a) else a for name, a in lora.adapters.items()})


def _scale_is_one(adapter: LowRank) -> bool:
    return abs(adapter.alpha - adapter.rank) <= 1e-6 * adapter.rank


def _unwritable_kind(adapter: Adapter) -> str | None:
    """What keeps an adapter out of a cloneofsimo file (None: a plain Linear LoRA pair)."""
    if adapter.is_plain:
        return None
    if adapter.kind != LowRank.kind:
        return adapter.kind
    return "DoRA" if adapter.dora_scale is not None else "Tucker conv"


def _check_writable(lora: LoraFile) -> None:
    if lora.family is None and all(UNPLACED.match(m) for m in lora.adapters):
        odd = [m for m, a in lora.adapters.items() if not plain_lora(a) or not _scale_is_one(a)]
        if odd:
            raise InputError(
                f"cloneofsimo files hold plain LoRA pairs at scale 1; {len(odd)} pairs are not (e.g. {odd[0]})",
                hint="bake the scale into the factors first: --bake, or cloneofsimo.bake_scale",
            )
        return
    if lora.family is None:  # its pairs are told apart only by a family's module order
        raise needs_family_map(lora.verdict, "a cloneofsimo file (positional pairs in a family's module order)")
    if lora.family.name == "sdxl":
        raise InputError(
            "cloneofsimo lora_diffusion files exist for SD 1.x and SD 2.x only; an SDXL LoRA cannot be written as one",
            hint="write kohya or diffusers instead",
        )
    kinds = Counter(k for k in map(_unwritable_kind, lora.adapters.values()) if k is not None)
    if kinds:
        found = ", ".join(f"{n} {k}" for k, n in kinds.items())
        raise InputError(
            f"cloneofsimo files hold plain LoRA pairs only; this LoRA has {found} modules",
            hint="convert them to low rank first (to_lowrank), or merge DoRA into a checkpoint; or write kohya",
        )
    targeted: set[str] = set()
    for component in lora.components():
        for order in ("geglu-0.15",) if component == "unet" else ("text",):
            targeted.update(module_order(lora.family, component, order))
    untargeted = [m for m in lora.adapters if m not in targeted]
    if untargeted:
        raise InputError(
            f"cloneofsimo files only cover attention q/k/v/out, GEGLU ff.net.0.proj and text-encoder "
            f"self-attention; {len(untargeted)} modules of this LoRA are outside that "
            f"(e.g. {', '.join(untargeted[:3])})",
            hint="write kohya, diffusers or peft instead, or drop those modules first",
        )
    scaled = [(m, a) for m, a in lora.adapters.items() if plain_lora(a) and not _scale_is_one(a)]
    if scaled:
        module, adapter = scaled[0]
        raise InputError(
            f"cloneofsimo files have no alpha, and {len(scaled)} modules have scale alpha/r ≠ 1 "
            f"(e.g. {module}: alpha {adapter.alpha:g} / rank {adapter.rank})",
            hint="bake the scale into the factors first: --bake, or cloneofsimo.bake_scale",
        )


def _ordered_pairs(
    lora: LoraFile, component: str, dtype: torch.dtype | None, order: str | None = None
) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(order, [(up, down)…]) of one component in lora_diffusion's order, absent modules zero-padded.

    lora_diffusion pops one pair per discovered module, so a file must cover all of them; the
    modules this LoRA lacks get zero factors (ΔW = 0, exactly), which our reader leaves out again.
    """
    mine = {m: a for m, a in lora.adapters.items() if m.split(".", 1)[0] == component}
    has_geglu = any(m.endswith("." + GEGLU) for m in mine)
    if component != "unet":
        order = "text"
    elif order is None or (has_geglu and order == "attention"):  # the source's order when it can hold them
        order = "geglu-0.15" if has_geglu else "attention"
    adapters = [a for a in mine.values() if plain_lora(a)]  # all of them: _check_writable ran
    pad_rank = Counter(a.rank for a in adapters).most_common(1)[0][0] if adapters else 1
    pad_dtype = dtype or (adapters[0].up.dtype if adapters else torch.float32)
    names = module_order(lora.family, component, order)
    shapes = _module_shapes(lora, names)
    out = []
    for name in names:
        adapter = mine.get(name)
        shape = shapes[name]
        if adapter is None:
            rank = min(pad_rank, *shape)
            out.append((torch.zeros(shape[0], rank, dtype=pad_dtype), torch.zeros(rank, shape[1], dtype=pad_dtype)))
            continue
        assert plain_lora(adapter)  # _check_writable refused every other kind
        up = adapter.up.reshape(shape[0], adapter.rank)  # 1×1-conv-shaped factors of a Linear: same numbers
        down = adapter.down.reshape(adapter.rank, shape[1])
        if dtype is not None:
            up, down = up.to(dtype), down.to(dtype)
        out.append((up.contiguous(), down.contiguous()))
    return order, out


def _module_shapes(lora: LoraFile, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each module in ``names`` for this LoRA's model, from its own modules.

    A LoRA read by names alone (a tiny or distilled model) has other widths than the family's
    full-size table: modules it has give their own shapes, the ones it lacks (zero-padded) get the
    table's widths mapped through :func:`width_map` of the ones it has.
    """
    assert lora.family is not None
    table = name_tables(lora.family).modules
    own: dict[str, tuple[int, int]] = {}
    for name in names:
        adapter = lora.adapters.get(name)
        if adapter is not None and plain_lora(adapter):
            own[name] = (int(adapter.up.shape[0]), int(adapter.down.reshape(adapter.rank, -1).shape[1]))
    if all(own[n] == table[n].shape for n in own):
        return {n: own.get(n) or (table[n].shape[0], table[n].shape[1]) for n in names}
    widths = width_map((table[n].shape, own[n]) for n in own)
    if widths is None:
        raise InputError(
            f"this LoRA's module widths are not those of one {lora.family.title} model at any size, "
            "so lora_diffusion's module order cannot be laid out for it",
            hint="write kohya, diffusers or peft instead",
        )
    shapes = {}
    for name in names:
        if name in own:
            shapes[name] = own[name]
            continue
        out, inp = (widths.get(d) for d in table[name].shape[:2])
        if out is None or inp is None:
            raise InputError(
                f"this LoRA (a {lora.family.title} at other widths) lacks {name}, and none of its "
                "modules shows that module's width, which a cloneofsimo file must pad it with",
                hint="write kohya, diffusers or peft instead",
            )
        shapes[name] = (out, inp)
    return shapes


def safeloras_state_dict(
    lora: LoraFile, *, dtype: torch.dtype | None = None, bake: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safeloras file (U-Net in the diffusers ≥ 0.15 order).

    Refuses what the format cannot hold exactly: non-LoRA adapters, DoRA, modules lora_diffusion
    does not patch, and scales ≠ 1 unless ``bake`` (the scale is then folded into ``up``).
    Textual-inversion embeddings go alongside with the ``<embed>`` flag, in their own dtype.
    """
    if bake:
        lora = bake_scale(lora)
    _check_writable(lora)
    if not lora.adapters:
        raise InputError("this LoRA has no modules to write")
    from .metadata import carried_metadata

    tensors: dict[str, torch.Tensor] = {}
    # lora_diffusion reads only the keys of its tensors' names; the rest is carried as it came
    metadata: dict[str, str] = {k: v for k, v in carried_metadata(lora).items() if k not in SAFELORAS_NAMES}
    if lora.family is None:  # unplaced pairs (_unplaced): written back in their stored order
        for module, adapter in sorted(lora.adapters.items(), key=lambda kv: _unplaced_key(kv[0])):
            assert plain_lora(adapter)  # _check_writable refused every other kind
            up, down = adapter.up, adapter.down
            if dtype is not None:
                up, down = up.to(dtype), down.to(dtype)
            tensors[f"{module}:up"], tensors[f"{module}:down"] = up.contiguous(), down.contiguous()
            metadata[f"{module}:rank"] = str(adapter.rank)
    for component in ("unet", "te1", "te2") if lora.family is not None else ():
        if component not in lora.components():
            continue
        name = COMPONENT_NAMES[component]
        order, pairs = _ordered_pairs(lora, component, dtype, lora.source_order.get(component))
        metadata[name] = json.dumps(UNET_TARGETS[order] if component == "unet" else TEXT_TARGETS)
        for i, (up, down) in enumerate(pairs):
            metadata[f"{name}:{i}:rank"] = str(down.shape[0])
            tensors[f"{name}:{i}:up"] = up
            tensors[f"{name}:{i}:down"] = down
    for token, tensor in lora.embeddings.items():
        if token in tensors or token in SAFELORAS_NAMES:
            raise InputError(f"embedding name {token!r} collides with a LoRA key")
        tensors[token] = tensor.contiguous()
        metadata[token] = EMBED_FLAG
    return tensors, metadata


def _unplaced_key(module: str) -> tuple[str, int]:
    match = UNPLACED.match(module)
    assert match is not None
    return match.group(1), int(match.group(2))


def pt_list(
    lora: LoraFile, component: str = "unet", *, dtype: torch.dtype | None = None, bake: bool = False
) -> list[torch.Tensor]:
    """A lora_diffusion ``.pt`` list ``[up_0, down_0, …]`` of one component ("unet", "te1"/"text_encoder").

    Save the U-Net list as ``X.pt`` and the text encoder's as ``X.text_encoder.pt`` (torch.save).
    """
    component = SAFELORAS_NAMES.get(component, component)
    if bake:
        lora = bake_scale(lora)
    _check_writable(lora)
    if component not in lora.components():
        raise InputError(f"this LoRA has no {COMPONENT_TITLES.get(component, component)} modules")
    _, pairs = _ordered_pairs(lora, component, dtype, lora.source_order.get(component))
    return [t for pair in pairs for t in pair]
