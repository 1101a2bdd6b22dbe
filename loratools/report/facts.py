"""Small facts shared by the checkpoint and LoRA reports (kept apart so neither imports the other)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..io.safetensors import TensorInfo
from ..ops.progress import Progress

LIST_LIMIT = 20  # long key lists are cut to this many in reports (counts stay exact)


def key_facts(key: str, info: TensorInfo) -> dict[str, object]:
    """One raw key of a file, as ``--keys`` lists it."""
    return {"key": key, "shape": list(info.shape), "dtype": info.dtype}


def hash_facts(path: str | Path, progress: Progress | None = None) -> dict[str, object]:
    """The hashes of one file as plain data (``--hashes``); ``progress`` counts the bytes read
    (:func:`loratools.ops.hashes.file_hashes`)."""
    from ..ops.hashes import file_hashes

    return asdict(file_hashes(path, progress))
