"""kohya sd-scripts LoRA / LoCon (and LyCORIS in kohya naming): ``lora_unet_…``, ``lora_te…``.

Keys are ``<lora_name>.<param>`` where ``lora_name`` has no dots (docs/FORMATS.md §1). Writers use each
family's native U-Net spelling — diffusers names for SD1/SD2, SGM names for SDXL, which is what
sd-scripts itself trains and loads (kohya-ss/sd-scripts:networks/lora.py) — and write an ``alpha``
for every module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import InputError
from ..families.spec import FamilySpec
from .adapters import LoraFile, factor_dtype
from .keys import KOHYA_KEY as KEY
from .keys import is_kohya  # noqa: F401 (re-exported)
from .lycoris import adapter_from_params, adapter_params
from .metadata import carried_metadata, describe_network
from .names import in_source_order, kohya_name_by_rule, kohya_text_prefixes, name_tables
from .resolve import Unplaced, carry_note, claimed_family, refuse_unplaced, resolve, unplaced_names, verbatim_keys
from .verdict import needs_family_map

if TYPE_CHECKING:
    import torch

FORMAT = "kohya"


def group(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise InputError(f"not a kohya key: {key}")
        groups.setdefault(match.group(1), {})[match.group(2)] = tensor
    return groups


def read_kohya(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    family: str | FamilySpec | None = None,
    *,
    require_fit: bool = False,
) -> LoraFile:
    """Adapters of a kohya/LyCORIS state dict: canonical where an SD family's names apply (shapes
    checked at full size), else keyed by their own lora_names (:mod:`.verdict`). Modules the family
    does not place are kept too (unless ``require_fit``): listed in ``unmatched`` with an
    :class:`~.resolve.Unplaced` reason, and an adapter under their own lora_name when readable."""
    groups = group(tensors)
    found = resolve(groups, lambda t: t.kohya, metadata, family, require_fit=require_fit)
    warnings = list(found.warnings)
    adapters = {}
    unmatched: dict[str, str] = dict(found.unmatched)
    for name, params in groups.items():
        if found.family is None:
            adapters[name] = adapter_from_params(name, params, None, warnings)
        elif name in found.matched:
            canonical = found.matched[name]
            if canonical in adapters:
                raise InputError(f"{canonical} is given twice (as {name} and under another spelling)")
            adapters[canonical] = adapter_from_params(name, params, found.weight_shape(canonical), warnings)
        elif not require_fit:
            # a module the family does not place: surgery keeps it (issue 13, nothing lost) —
            # acted on under its own lora_name, or copied verbatim when its factors make no adapter
            keys = {f"{name}.{param}": tensor for param, tensor in params.items()}
            try:
                adapter = adapter_from_params(name, params, None, warnings)
            except InputError as exc:
                unmatched[name] = Unplaced(unmatched[name], keys, exc.message.removeprefix(f"{name}: "))
            else:
                if name in adapters:
                    raise InputError(f"{name} is given twice (as a module of its own and a canonical one)")
                adapters[name] = adapter
                unmatched[name] = Unplaced(unmatched[name], keys)
    named = found.matched if found.family is not None else groups
    missing_alpha = [n for n in named if "alpha" not in groups[n] and "diff" not in groups[n]]
    if missing_alpha:
        warnings.append(
            f"{len(missing_alpha)} modules have no alpha (e.g. {missing_alpha[0]}); assumed alpha = rank, scale 1"
        )
    for name, reason in list(unmatched.items())[:20]:
        warnings.append(carry_note(name, reason) if isinstance(reason, Unplaced) else f"{name}: not matched ({reason})")
    if len(unmatched) > 20:
        warnings.append(f"… and {len(unmatched) - 20} more modules not matched")
    return LoraFile(
        adapters,
        found.family,
        FORMAT,
        dict(metadata),
        warnings=warnings,
        unmatched=unmatched,
        model=found.verdict,
        source_names={canonical: name for name, canonical in found.matched.items()},
        # kept by their own names: surgery writes the file's own keys back in its order (issue 13)
        source_keys=tuple(tensors) if found.family is None else (),
    )


def kohya_state_dict(lora: LoraFile, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya keys and tensors of a LoRA (native spelling of its family; a LoRA with no family
    map keeps its own lora_names, and one named in another dialect is refused by what it lacks).
    A source module the family does not place keeps its own name (or, read from peft, the kohya
    name its path maps to), a malformed one is copied verbatim; one with no kohya name is refused
    by name, never left out (:func:`~.resolve.unplaced_names`)."""
    refuse_unplaced(lora.unmatched, lora.family_title, "it in kohya naming")
    if lora.family is None:
        if lora.names != "kohya":
            raise needs_family_map(
                lora.verdict, f"writing a {lora.names}-named {lora.family_title} LoRA in kohya naming"
            )
        names = {module: module for module in lora.adapters}
    else:
        tables = name_tables(lora.family)
        prefixes = kohya_text_prefixes(lora.family)
        sgm = lora.family.single_layout == "sgm"

        def kohya_name(module: str) -> str:
            return tables.kohya_name(module, sgm_unet=sgm, text_prefixes=prefixes)

        # modules the family did not place keep (or map) their own names; those with none refuse
        own = unplaced_names(lora, tables, FORMAT, kohya_name, lambda path: kohya_name_by_rule(path, prefixes))
        names = {m: own[m] if m in own else kohya_name(m) for m in lora.adapters}
    out: dict[str, torch.Tensor] = {}
    for module, adapter in lora.adapters.items():
        name = names[module]
        stored = dtype or factor_dtype(adapter)
        for param, tensor in adapter_params(adapter, stored).items():
            out[f"{name}.{param}"] = tensor.to(stored) if dtype is not None and tensor.is_floating_point() else tensor
    if lora.family is not None:
        # malformed modules of the source, copied as the file held them (dtype too: they are no factors)
        out = verbatim_keys(lora, FORMAT, {"": out})  # sorted below with the rest
    if lora.family is None and lora.source_keys:
        return in_source_order(out, lora.source_keys)
    return dict(sorted(out.items()))


def kohya_metadata(lora: LoraFile) -> dict[str, str]:
    """sd-scripts metadata: the source's carried whole, the network keys set to what the file holds
    (formats/metadata.py); ``sshs_*`` are recomputed by :func:`save_lora` once the tensors are known."""
    meta = describe_network(carried_metadata(lora), lora)
    if (
        lora.family is not None and claimed_family(meta)[0] != lora.family.name
    ):  # missing or wrong  # missing or wrong: say what the shapes say
        meta["ss_base_model_version"] = lora.family.metadata_versions[0]
        meta["ss_v2"] = str(lora.family.name == "sd2")
    return meta
