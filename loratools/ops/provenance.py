"""What a written checkpoint was made from, recorded in it (docs/PROVENANCE.md).

Key ``loratools.provenance`` in a single file's ``__metadata__`` (a JSON string), or the file
``loratools_provenance.json`` at the root of a diffusers folder output (its weight files keep their
own metadata as the base had it). Each input is named with its SHA-256 and AutoV2 (first 10 hex,
AUTOMATIC1111 modules/hashes.py) — hashes that tell a user exactly which files went in, computed
by :func:`loratools.ops.hashes.sha256_file`, the one streamed hasher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__
from .hashes import sha256_file

KEY = "loratools.provenance"
MODELSPEC_HASH = "modelspec.hash_sha256"  # of the new weights; see ops/merge.py (_modelspec_hash_key)
FOLDER_FILE = "loratools_provenance.json"
SCHEMA = "loratools.provenance/1"


def input_record(path: Path, files: Sequence[Path] | None = None) -> dict[str, object]:
    """Name and hashes of one input; a folder gets one entry per weight file (relative path)."""
    path = Path(path)
    if path.is_dir():
        return {
            "name": path.name,
            "files": {
                f.relative_to(path).as_posix(): {"sha256": (h := sha256_file(f)), "autov2": h[:10]}
                for f in (files or [])
            },
        }
    digest = sha256_file(path)
    return {"name": path.name, "sha256": digest, "autov2": digest[:10]}


def provenance(operation: str, base: dict[str, object], loras: Sequence[dict[str, object]]) -> dict[str, object]:
    """The record written with a merged / unmerged checkpoint."""
    return {
        "schema": SCHEMA,
        "tool": "loratools",
        "version": __version__,
        "operation": operation,
        "base": base,
        "loras": list(loras),
    }


def dumps(record: dict[str, object]) -> str:
    return json.dumps(record, sort_keys=False, separators=(",", ":"))


def read_provenance(metadata: Mapping[str, str], folder: Path | None = None) -> dict[str, object] | None:
    """The record a file or folder carries (``KEY`` in its metadata, or ``FOLDER_FILE`` at a folder's
    root), or None when it has none. A record that is not a JSON object is returned as
    ``{"unreadable": <why>}`` so that ``inspect`` can say so rather than hide it."""
    raw: str | None = metadata.get(KEY)
    if raw is None and folder is not None and (folder / FOLDER_FILE).is_file():
        raw = (folder / FOLDER_FILE).read_text(encoding="utf-8", errors="replace")
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError as exc:
        return {"unreadable": f"not JSON ({exc})"}
    if not isinstance(record, dict):
        return {"unreadable": f"a JSON {type(record).__name__}, not an object"}
    return record
