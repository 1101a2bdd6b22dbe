"""loratools: LoRA weight surgery for Stable Diffusion, directly on state dicts.

The public API is re-exported here; the CLI (``loratools …``) is a thin layer over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CorruptFileError, InputError, LoratoolsError, OutputError, UnknownModelError, UnsafePickleError

if TYPE_CHECKING:
    # What mypy and editors see; at run time each name is imported on first use (``__getattr__``).
    from .families import FAMILIES, get_family, keymap
    from .families.detect import Detection, detect
    from .formats.adapters import LoraFile
    from .formats.io import load_lora, save_lora
    from .io.checkpoint import Checkpoint, open_checkpoint
    from .ops.blend import blend
    from .ops.checkpoint import convert_checkpoint
    from .ops.convert import convert_lora
    from .ops.extract import extract
    from .ops.hashes import file_hashes
    from .ops.lowrank import RankRule
    from .ops.merge import LoraInput, MergeReport, merge, unmerge
    from .ops.rescale import rescale
    from .ops.resize import resize
    from .report import inspect_checkpoint, inspect_lora
    from .report.diff import diff

__version__ = "0.1.0"

# Public name → the module defining it, imported on first use (PEP 562): `import loratools.cli.main`
# and header-only commands pay only for the modules they touch, never torch or the merge engine.
# Keep in step with the TYPE_CHECKING block above and __all__ (tests/test_cli_imports.py checks all three agree).
_LAZY = {
    "FAMILIES": "loratools.families",
    "get_family": "loratools.families",
    "keymap": "loratools.families",
    "Detection": "loratools.families.detect",
    "detect": "loratools.families.detect",
    "Checkpoint": "loratools.io.checkpoint",
    "open_checkpoint": "loratools.io.checkpoint",
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
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    # `import loratools; loratools.families.…` worked while the package imported its subpackages
    # eagerly; a subpackage is still there on first attribute access.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as missing:
        if missing.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "CorruptFileError",
    "Detection",
    "InputError",
    "LoraFile",
    "LoraInput",
    "LoratoolsError",
    "MergeReport",
    "OutputError",
    "RankRule",
    "UnknownModelError",
    "UnsafePickleError",
    "__version__",
    "blend",
    "convert_checkpoint",
    "convert_lora",
    "detect",
    "diff",
    "extract",
    "file_hashes",
    "get_family",
    "inspect_checkpoint",
    "inspect_lora",
    "keymap",
    "load_lora",
    "merge",
    "open_checkpoint",
    "rescale",
    "resize",
    "save_lora",
    "unmerge",
]
