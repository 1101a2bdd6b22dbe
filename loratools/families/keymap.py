"""The two-way translation between canonical names and a checkpoint layout's names.

A :class:`KeyMap` is built once per family from its :class:`Weight` records. It answers "which
canonical tensors live in this layout key" (several, for a fused ``in_proj``) and moves whole
tensors between layouts: fused q/k/v are split by rows and re-joined with ``torch.cat`` in q, k, v
order, transposed and 1×1-reshaped tensors are turned around. Splitting and joining are views and
concatenations of the same bits, so a round trip is exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ..errors import InputError
from .flux import flux_weights
from .spec import FamilySpec, Weight
from .t5 import t5_weights
from .text import text_weights
from .unet import unet_weights
from .vae import legacy_diffusers_name, vae_weights

if TYPE_CHECKING:
    import torch

LAYOUTS = ("diffusers", "ldm", "sgm", "bfl")


def family_weights(spec: FamilySpec) -> list[Weight]:
    """Every canonical tensor of a family: denoiser first, then text encoders, then VAE."""
    weights = unet_weights(spec.unet) if spec.unet is not None else []
    if spec.transformer is not None:
        weights += flux_weights(spec.transformer)
    for text in spec.texts:
        weights += text_weights(text)
    if spec.t5 is not None:
        weights += t5_weights(spec.t5)
    return weights + vae_weights(spec.vae)


def single_prefixes(spec: FamilySpec) -> tuple[str, ...]:
    """The prefix each component has inside a family's all-in-one single file."""
    prefixes = [t.single_prefix for t in spec.texts] + [spec.vae.single_prefix]
    if spec.transformer is not None:
        prefixes.append(spec.transformer.single_prefix)
    if spec.t5 is not None:
        prefixes.append(spec.t5.single_prefix)
    return tuple(prefixes)


def _single_aliases(name: str, bare_prefixes: tuple[str, ...] = ()) -> Iterable[str]:
    # Old SD1 files omit "text_model." inside the CLIP prefix (A1111 sd_models.py
    # checkpoint_dict_replacements rewrites them the same way).
    marker = "cond_stage_model.transformer.text_model."
    if name.startswith(marker):
        yield "cond_stage_model.transformer." + name[len(marker) :]
    # Families whose components are distributed as standalone files without the all-in-one prefix
    # (flux1-dev.safetensors, ae.safetensors, t5xxl_fp16.safetensors, clip_l.safetensors).
    for prefix in bare_prefixes:
        if name.startswith(prefix):
            yield name[len(prefix) :]


def _diffusers_aliases(name: str) -> Iterable[str]:
    legacy = legacy_diffusers_name(name)
    if legacy:
        yield legacy
    # transformers ≥ 5 saves CLIPTextModel built from a config without "text_model." (FORMATS §5.5).
    for folder in ("text_encoder.", "text_encoder_2."):
        if name.startswith(folder + "text_model."):
            yield folder + name[len(folder) + len("text_model.") :]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of dim 0 in the other order (its own inverse): BFL shift|scale ↔ diffusers scale|shift."""
    import torch

    if t.shape[0] % 2:
        raise InputError(f"a tensor of {t.shape[0]} rows has no halves to swap")
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@dataclass
class Translation:
    """Result of moving a state dict between layouts: mapped tensors and what had no home."""

    tensors: dict[str, torch.Tensor]
    unmapped: dict[str, torch.Tensor]


class KeyMap:
    """Canonical ↔ layout names for one family (diffusers folder names are ``<subfolder>.<key>``)."""

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.weights = family_weights(spec)
        self.by_canonical: dict[str, Weight] = {w.canonical: w for w in self.weights}
        if len(self.by_canonical) != len(self.weights):
            raise AssertionError(f"{spec.name}: duplicate canonical names in the family rules")

    @property
    def layouts(self) -> tuple[str, str]:
        return ("diffusers", self.spec.single_layout)

    def _check_layout(self, layout: str) -> str:
        if layout == "single":
            return self.spec.single_layout
        if layout not in self.layouts:
            raise InputError(f"{self.spec.title} has no {layout!r} layout (it has {', '.join(self.layouts)})")
        return layout

    @cached_property
    def _index(self) -> dict[str, dict[str, list[Weight]]]:
        index: dict[str, dict[str, list[Weight]]] = {}
        for layout in self.layouts:
            table: dict[str, list[Weight]] = defaultdict(list)
            for w in self.weights:
                name = w.layout_name(layout)
                if name is not None:
                    table[name].append(w)
            for parts in table.values():
                parts.sort(key=lambda w: w.single_rows or w.single_part or (0, 1))
            bare = single_prefixes(self.spec) if self.spec.bare_components else ()
            for name in list(table):
                aliases = _diffusers_aliases(name) if layout == "diffusers" else _single_aliases(name, bare)
                for alias in aliases:
                    table.setdefault(alias, table[name])
            index[layout] = dict(table)
        return index

    @cached_property
    def extras(self) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """Single-file tensors with no canonical home (schedule buffers, EMA bookkeeping)."""
        return {name: (shape, dtype) for name, shape, dtype in self.spec.single_extras}

    # -- names ------------------------------------------------------------------------------------
    def layout_keys(self, layout: str, *, include_optional: bool = True) -> list[str]:
        """Every key of a layout in canonical order (fused keys once), as the rules predict them."""
        layout = self._check_layout(layout)
        seen: dict[str, None] = {}
        for w in self.weights:
            name = w.layout_name(layout)
            if name is not None and (include_optional or not w.optional):
                seen.setdefault(name)
        return list(seen)

    def lookup(self, layout: str, key: str) -> list[Weight]:
        """The canonical weights stored under a layout key (empty if the key is not mapped)."""
        return self._index[self._check_layout(layout)].get(key, [])

    def spellings(self, layout: str, canonical: str) -> list[str]:
        """Every key under which a layout may store a canonical tensor (its name, then legacy aliases)."""
        return self._spellings[self._check_layout(layout)].get(canonical, [])

    @cached_property
    def _spellings(self) -> dict[str, dict[str, list[str]]]:
        table: dict[str, dict[str, list[str]]] = {}
        for layout, index in self._index.items():
            names: dict[str, list[str]] = {}
            for key, weights in index.items():
                for w in weights:
                    names.setdefault(w.canonical, []).append(key)
            for w in self.weights:  # the layout's own name first, aliases after
                own = w.layout_name(layout)
                if own in names.get(w.canonical, []):
                    names[w.canonical].remove(own)
                    names[w.canonical].insert(0, own)
            table[layout] = names
        return table

    def layout_key(self, canonical: str, layout: str) -> str | None:
        """The name a canonical tensor has in a layout (None if the layout lacks it)."""
        return self.by_canonical[canonical].layout_name(self._check_layout(layout))

    def component_of(self, layout: str, key: str) -> str:
        """unet / te1 / te2 / vae for a mapped key, else "other"."""
        weights = self.lookup(layout, key)
        return weights[0].component if weights else "other"

    # -- tensors ----------------------------------------------------------------------------------
    def split(self, layout: str, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical tensors held by one layout tensor (views; several for a fused tensor)."""
        weights = self.lookup(layout, key)
        out: dict[str, torch.Tensor] = {}
        single = self._check_layout(layout) != "diffusers"
        for w in weights:
            t = tensor
            if single and w.single_part is not None and t.shape[0] % w.single_part[1]:
                raise InputError(f"{key}: fused tensor of {t.shape[0]} rows does not split into {w.single_part[1]}")
            rows = w.single_slice(int(t.shape[0])) if single and t.dim() else None
            if rows is not None:
                if rows[1] > t.shape[0]:
                    raise InputError(f"{key}: fused tensor of {t.shape[0]} rows has no rows {rows[0]}:{rows[1]}")
                t = t[rows[0] : rows[1]]
            if single and w.single_swapped:
                t = swap_halves(t)
            if single and w.single_transposed:
                t = t.t()
            if single and w.single_shape is not None and len(w.single_shape) > len(w.shape):
                t = t.reshape(t.shape[: len(w.shape)])  # 1×1 conv → Linear
            out[w.canonical] = t
        return out

    def join(self, layout: str, key: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The layout tensor for ``key`` built from its canonical tensors (inverse of :meth:`split`)."""
        weights = self.lookup(layout, key)
        single = self._check_layout(layout) != "diffusers"
        pieces = []
        for w in weights:
            if w.canonical not in parts:
                raise InputError(f"cannot build {key}: {w.canonical} is missing")
            t = parts[w.canonical]
            if single and w.single_transposed:
                t = t.t()
            if single and w.single_swapped:
                t = swap_halves(t)
            pieces.append(t)
        if len(pieces) == 1:
            joined = pieces[0]
        else:
            import torch

            joined = torch.cat(pieces, dim=0)
        first = weights[0]
        if single and first.single_shape is not None and len(first.single_shape) > len(first.shape):
            joined = joined.reshape(*joined.shape, *[1] * (len(first.single_shape) - len(first.shape)))
        return joined

    def to_canonical(self, layout: str, tensors: Mapping[str, torch.Tensor]) -> Translation:
        """Split a layout state dict into canonical tensors; keys without a home are returned apart."""
        mapped: dict[str, torch.Tensor] = {}
        unmapped: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if self.lookup(layout, key):
                mapped.update(self.split(layout, key, tensor))
            else:
                unmapped[key] = tensor
        return Translation(mapped, unmapped)

    def from_canonical(self, layout: str, tensors: Mapping[str, torch.Tensor]) -> Translation:
        """Build a layout state dict from canonical tensors; fused keys need all of their parts."""
        layout = self._check_layout(layout)
        out: dict[str, torch.Tensor] = {}
        unmapped: dict[str, torch.Tensor] = {}
        for canonical, tensor in tensors.items():
            w = self.by_canonical.get(canonical)
            name = w.layout_name(layout) if w else None
            if name is None:
                unmapped[canonical] = tensor
            elif name not in out:
                out[name] = self.join(layout, name, tensors)
        return Translation(out, unmapped)

    def convert(self, source: str, target: str, tensors: Mapping[str, torch.Tensor]) -> Translation:
        """Move a state dict from one layout to another through canonical names."""
        canonical = self.to_canonical(source, tensors)
        result = self.from_canonical(target, canonical.tensors)
        return Translation(result.tensors, {**canonical.unmapped, **result.unmapped})
