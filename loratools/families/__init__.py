"""Model families: SD 1.x, SD 2.x, SDXL and FLUX.1 as numbers plus rules; key maps derived from them."""

from __future__ import annotations

from functools import cache

from ..errors import InputError
from .flux1 import FLUX1
from .keymap import KeyMap, family_weights
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL
from .spec import FamilySpec, FluxSpec, T5Spec, TextSpec, UNetSpec, VaeSpec, Weight

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (SD1, SD2, SDXL, FLUX1)}
ALIASES = {
    "sd15": "sd1",
    "sd1.5": "sd1",
    "sd14": "sd1",
    "sd21": "sd2",
    "sd2.1": "sd2",
    "sd20": "sd2",
    "xl": "sdxl",
    "flux": "flux1",
    "flux1-dev": "flux1",
    "flux1-schnell": "flux1",
}


def get_family(name: str) -> FamilySpec:
    """A family by name (``sd1``, ``sd2``, ``sdxl``, ``flux1``; ``sd15``/``sd21``/``flux`` accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    try:
        return FAMILIES[key]
    except KeyError:
        raise InputError(f"unknown model family {name!r} (choose from {', '.join(FAMILIES)})") from None


@cache
def keymap(spec: FamilySpec) -> KeyMap:
    """The (cached) key map of a family spec."""
    return KeyMap(spec)


__all__ = [
    "FAMILIES",
    "FLUX1",
    "SD1",
    "SD2",
    "SDXL",
    "FamilySpec",
    "FluxSpec",
    "KeyMap",
    "T5Spec",
    "TextSpec",
    "UNetSpec",
    "VaeSpec",
    "Weight",
    "family_weights",
    "get_family",
    "keymap",
]
