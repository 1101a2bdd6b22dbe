"""What a written checkpoint was made from, recorded in it (docs/PROVENANCE.md).

Key ``loratools.provenance`` in a single file's ``__metadata__`` (a JSON string), or the file
``loratools_provenance.json`` at the root of a diffusers folder output (its weight files keep their
own metadata as the base had it). Each input is named with its SHA-256 and AutoV2 (first 10 hex,
AUTOMATIC1111 modules/hashes.py) — hashes that tell a user exactly which files went in, computed
by :func:`loratools.ops.hashes.sha256_file`, the one streamed hasher.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__
from .hashes import sha256_file

KEY = "loratools.provenance"
MODELSPEC_HASH = "modelspec.hash_sha256"  # of the new weights; see ops/merge_plan.py (modelspec_hash_key)
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


def derived(
    operation: str,
    inputs: Sequence[tuple[str, str | os.PathLike[str]]],
    options: Mapping[str, object],
    previous: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The record a LoRA made by rescale/resize/extract carries: each input by role with its hashes,
    the options that shaped it, and the record the (first) input itself carried, if any, so that
    a chain of operations stays readable. A lossless ``convert`` adds none: its output is the same
    LoRA, metadata included (docs/PRESERVE.md §4)."""
    record: dict[str, object] = {
        "schema": SCHEMA,
        "tool": "loratools",
        "version": __version__,
        "operation": operation,
        "inputs": [{"role": role, **input_record(Path(path))} for role, path in inputs],
        "options": {k: v for k, v in options.items() if v is not None},
    }
    earlier = read_provenance(previous or {})
    if earlier is not None:
        record["previous"] = earlier
    return record


class PendingRecord:
    """A :func:`derived` record computed in a background thread, started before the operation's
    own work: hashing the inputs (hashlib releases the GIL) overlaps the arithmetic instead of
    adding a full read of every input to the wall time. ``result()`` joins it."""

    def __init__(
        self,
        operation: str,
        inputs: Sequence[tuple[str, str | os.PathLike[str]]],
        options: Mapping[str, object],
        previous: Mapping[str, str] | None = None,
    ) -> None:
        self._record: dict[str, object] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(operation, list(inputs), dict(options), previous), daemon=True
        )
        self._thread.start()

    def _run(self, *args: object) -> None:
        try:
            self._record = derived(*args)  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._error = exc

    def result(self) -> dict[str, object]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._record is not None
        return self._record


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
