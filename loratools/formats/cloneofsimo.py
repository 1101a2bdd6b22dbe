"""cloneofsimo lora_diffusion: ``.pt`` lists (no names: order and shapes decide) and safeloras.

Being written; see FORMATS.md §3.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InputError
from ..families.spec import FamilySpec
from .adapters import LoraFile

FORMAT = "cloneofsimo"


def is_safeloras(keys: list[str]) -> bool:
    return any(k.count(":") == 2 and k.rsplit(":", 1)[-1] in ("up", "down") for k in keys)


def read_pt(path: Path, tensors: list[torch.Tensor], family: str | FamilySpec | None = None) -> LoraFile:
    raise InputError(f"{path.name}: cloneofsimo .pt lists are not supported yet")


def read_safeloras(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str | FamilySpec | None = None
) -> LoraFile:
    raise InputError("cloneofsimo safeloras files are not supported yet")


def safeloras_state_dict(
    lora: LoraFile, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    raise InputError("writing cloneofsimo safeloras is not supported yet")
