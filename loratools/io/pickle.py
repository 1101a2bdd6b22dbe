"""Weights-only loading of torch pickles (.pt / .bin / .ckpt / .pth).

Only ``torch.load(weights_only=True)`` ever touches a pickle: its unpickler allows tensors,
containers and plain numbers and nothing else, so a ``__reduce__`` payload is refused before any of
it can run. Before that, zip-format files are checked for what torch's reader would not catch in
time: member names that escape the archive and members that inflate absurdly.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InputError, UnsafePickleError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts nest the weights (Lightning, A1111 training, EMA dumps).
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "module")
_MAX_INFLATION = 200  # uncompressed / compressed; stored (uncompressed) members are 1
_MAX_MEMBER_BYTES = 64 << 30


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                parts = Path(member.filename).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts:
                    raise UnsafePickleError(
                        f"{path.name}: archive member {member.filename!r} escapes the archive; refused"
                    )
                if member.file_size > _MAX_MEMBER_BYTES or (
                    member.compress_type != zipfile.ZIP_STORED
                    and member.file_size > max(1 << 20, _MAX_INFLATION * max(member.compress_size, 1))
                ):
                    raise UnsafePickleError(
                        f"{path.name}: archive member {member.filename!r} would inflate to {member.file_size} bytes; refused"
                    )
    except zipfile.BadZipFile as exc:
        raise CorruptFileError(f"{path.name}: damaged zip archive ({exc})") from None


def load_pickle(path: str | Path) -> Any:
    """Load a torch pickle with weights only; refuse anything that would need code to run.

    Returns what the file holds (usually a dict of tensors; cloneofsimo files hold a list), with a
    nested ``state_dict`` unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path.name}: empty file")
    if zipfile.is_zipfile(path):
        _check_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafePickleError(
            f"{path.name}: pickle needs code to load, refused without running it ({' '.join(detail.split())[:160]})",
            hint="only plain tensor pickles are read; convert trusted files to safetensors elsewhere",
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CorruptFileError(f"{path.name}: cannot read torch pickle ({reason})") from None
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Any) -> Any:
    """Descend into ``{"state_dict": {...}}``-style wrappers until tensors appear."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTED_STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


def split_tensors(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a loaded dict, and the names of the non-tensor entries that were left out."""
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    others = [str(k) for k in obj if k not in tensors]
    return tensors, others
