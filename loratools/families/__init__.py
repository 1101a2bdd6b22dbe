"""Model families: SD 1.x, SD 2.x and SDXL as numbers plus rules; key maps derived from them."""

from __future__ import annotations

from functools import cache

from ..errors import InputError
from .keymap import KeyMap, family_weights
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL
from .spec import FamilySpec, TextSpec, UNetSpec, VaeSpec, Weight

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (SD1, SD2, SDXL)}
ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd14": "sd1", "sd21": "sd2", "sd2.1": "sd2", "sd20": "sd2", "xl": "sdxl"}


def get_family(name: str) -> FamilySpec:
    """A family by name (``sd1``, ``sd2``, ``sdxl``; ``sd15``/``sd21`` accepted)."""
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
    "SD1",
    "SD2",
    "SDXL",
    "FamilySpec",
    "KeyMap",
    "TextSpec",
    "UNetSpec",
    "VaeSpec",
    "Weight",
    "family_weights",
    "get_family",
    "keymap",
]
