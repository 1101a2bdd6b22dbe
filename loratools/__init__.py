"""loratools: LoRA weight surgery for Stable Diffusion, directly on state dicts.

The public API is re-exported here; the CLI (``loratools …``) is a thin layer over it.
"""

from __future__ import annotations

from .errors import CorruptFileError, InputError, LoratoolsError, OutputError, UnknownModelError, UnsafePickleError
from .families import FAMILIES, get_family, keymap
from .families.detect import Detection, detect
from .io.checkpoint import Checkpoint, open_checkpoint

__version__ = "0.1.0"

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
]
