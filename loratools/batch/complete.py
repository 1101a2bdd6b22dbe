"""Is an output already complete? Then a re-run skips it.

Outputs are written atomically (:mod:`loratools.io.atomic`: a hidden temporary renamed into place
when complete), so a file at the output path was finished by someone. "Complete" is checked, not
assumed: a ``.safetensors`` output must have a header that parses and whose tensors tile the
file to its last byte (:func:`loratools.io.safetensors.read_header` checks exactly that, so a
truncated or foreign file is not complete); a folder output (peft adapter) must hold such an
``adapter_model.safetensors``. Temporaries left by a killed worker are removed by
:func:`remove_leftovers` once the output is in place.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import LoratoolsError


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a finished output: a valid safetensors file, or an adapter folder of one."""
    from ..io.safetensors import read_header

    target = Path(path)
    if target.is_dir():
        weights = target / "adapter_model.safetensors"
        return weights.is_file() and (target / "adapter_config.json").is_file() and is_complete(weights)
    if not target.is_file():
        return False
    try:
        header = read_header(target)
    except (LoratoolsError, OSError):
        return False
    return header.file_size == target.stat().st_size


def output_bytes(path: str | os.PathLike[str]) -> int | None:
    """The size of an output file, or of every file in an output folder; None if there is none."""
    target = Path(path)
    if target.is_dir():
        return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return target.stat().st_size if target.is_file() else None


def remove_leftovers(path: str | os.PathLike[str]) -> int:
    """Remove the atomic-write temporaries of ``path`` that a killed attempt left; returns how many."""
    target = Path(path)
    removed = 0
    if not target.parent.is_dir():
        return 0
    for leftover in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(OSError):
            if leftover.is_dir():
                import shutil

                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed += 1
    return removed
