"""loratools: LoRA weight surgery for Stable Diffusion, directly on state dicts.

The public API is re-exported here; the CLI (``loratools …``) is a thin layer over it.
"""

from __future__ import annotations

from .errors import CorruptFileError, InputError, LoratoolsError, OutputError, UnknownModelError, UnsafePickleError
from .families import FAMILIES, get_family, keymap
from .families.detect import Detection, detect
from .io.checkpoint import Checkpoint, open_checkpoint

__version__ = "0.1.0"

# Functions whose modules import torch are loaded on first use, so header-only work stays light.
_LAZY = {
    "load_lora": "loratools.formats.io",
    "save_lora": "loratools.formats.io",
    "LoraFile": "loratools.formats.adapters",
    "convert_lora": "loratools.ops.convert",
    "convert_checkpoint": "loratools.ops.checkpoint",
    "inspect_checkpoint": "loratools.report",
    "inspect_lora": "loratools.report",
    "merge": "loratools.ops.merge",
    "unmerge": "loratools.ops.merge",
    "LoraInput": "loratools.ops.merge",
    "MergeReport": "loratools.ops.merge",
    "diff": "loratools.report.diff",
    "file_hashes": "loratools.ops.hashes",
    "rescale": "loratools.ops.rescale",
    "resize": "loratools.ops.resize",
    "blend": "loratools.ops.blend",
    "extract": "loratools.ops.extract",
    "RankRule": "loratools.ops.lowrank",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "CorruptFileError",
    "Detection",
    "InputError",
    "LoratoolsError",
    "OutputError",
    "UnknownModelError",
    "UnsafePickleError",
    "__version__",
    "detect",
    "get_family",
    "keymap",
    "open_checkpoint",
    *_LAZY,
]
