"""One census row: the facts of one file, from its header, as a flat record.

The facts are ``inspect``'s (:func:`loratools.report.inspect_lora` on the file or its sparse
stand-in, see :mod:`.remote`), flattened to one row: counts per component, kind, rank, alpha and
dtype are JSON-ready maps (strings in Parquet). What makes a file unusable is a *problem* on its
row, never an exception out of the census: ``lfs-pointer``, ``pickle`` (listed and flagged,
never opened), ``truncated``, ``not-safetensors``, ``not-a-lora`` (a checkpoint),
``unreadable`` (the reader's one-line reason).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LoratoolsError
from ..io.source import Source
from ..io.suffixes import PICKLE_SUFFIXES
from .sources import Entry

ROW_SCHEMA = "loratools.census.row/1"
MAP_FIELDS = ("components", "kinds", "ranks", "alphas", "dtypes", "stored_hashes", "training")
LIST_FIELDS = ("problems", "warnings", "trigger_words")
# declared base model: the first of these metadata keys that is set (FORMATS: kohya ss_*, modelspec)
BASE_MODEL_KEYS = ("ss_sd_model_name", "modelspec.architecture", "ss_base_model_version", "base_model")
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
TRIGGER_KEYS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words", "activation text")


def empty_row(entry: Entry) -> dict[str, Any]:
    """A row with every column, nothing known yet beyond the listing."""
    return {
        "schema": ROW_SCHEMA,
        "key": entry.key,
        "repo": entry.repo,
        "revision": entry.revision,
        "path": entry.path,
        "size": entry.size,
        "kind": None,  # lora | embedding | checkpoint | pickle | None (unreadable)
        "format": None,
        "family": None,
        "metadata_claims": None,
        "family_mismatch": None,
        "modules": None,
        "components": None,
        "kinds": None,
        "ranks": None,
        "alphas": None,
        "alphas_read": None,
        "read": None,  # header: facts from the header; tensors: this dialect needed its tensors read
        "dtypes": None,
        "dtype": None,
        "parameters": None,
        "base_model": None,
        "ss_sd_model_name": None,
        "trigger_words": [],
        "training": None,
        "stored_hashes": None,
        "lfs_sha256": entry.lfs_sha256,
        "loads_in": None,  # loader-compat verdicts (loratools.check), when that package exists
        "problems": [],
        "warnings": [],
        "error": entry.error,
        "bytes_read": 0,
        "requests": 0,
        "seconds": 0.0,
    }


def _triggers(metadata: dict[str, str]) -> list[str]:
    for key in TRIGGER_KEYS:
        value = metadata.get(key, "").strip()
        if value:
            return [t.strip() for t in value.replace(";", ",").split(",") if t.strip()][:20]
    return []


def _loads_in(path: Path) -> Any:
    """The loader-compat verdicts of issue 19's checker, if this install has it; else None."""
    try:
        from .. import check
    except ImportError:
        return None
    verdicts = getattr(check, "verdicts", None) or getattr(check, "check_lora", None)
    if verdicts is None:
        return None
    try:
        result = verdicts(path)
    except LoratoolsError:
        return None
    data = result.to_dict() if hasattr(result, "to_dict") else result
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        return data
    # one verdict per loader for the row; the full report is ``loratools check``'s
    compact: dict[str, Any] = {}
    for target in data["targets"]:
        name = next((target[k] for k in ("target", "name", "loader") if k in target), None)
        verdict = next((target[k] for k in ("verdict", "status", "loads", "clean") if k in target), target)
        compact[str(name)] = verdict
    return {"clean": data.get("clean"), "targets": compact}


# the row fields that are facts of the layout (the key of .layouts), cached per layout
LAYOUT_FIELDS = ("kind", "format", "family", "metadata_claims", "family_mismatch", "modules", "components", "kinds",
                 "ranks", "alphas", "read", "dtypes", "dtype", "parameters", "warnings", "problems")  # fmt: skip


def _layout_facts(source: Source) -> dict[str, Any]:
    """The :data:`LAYOUT_FIELDS` of a file, through classify and ``inspect``'s own report."""
    from ..classify import classify
    from ..report import inspect_lora

    if classify(source) != "lora":
        return {"kind": "checkpoint", "problems": ["not-a-lora: a model checkpoint"]}
    # inspect's own report (header-only where the dialect allows), without the check tables
    # and the layout tree, which a row does not use
    report: dict[str, Any] = inspect_lora(source, loads_in=False, tree=False).to_dict()
    dtypes: dict[str, int] = report["dtypes"]
    return {
        "kind": "embedding" if report["format"] == "textual-inversion" else "lora",  # inspect's name for it
        "format": report["format"],
        "family": report["family"],
        "metadata_claims": report["metadata_claims"],
        "family_mismatch": report["family_mismatch"],
        "modules": report["modules"],
        "components": report["components"],
        "kinds": report["kinds"],
        "ranks": report["ranks"],
        "alphas": report["alphas"],
        "read": report.get("read"),
        "dtypes": dtypes,
        "dtype": Counter(dtypes).most_common(1)[0][0] if dtypes else None,
        "parameters": report["parameters"],
        "warnings": list(report["warnings"])[:20],
        "problems": [],
    }


def describe(
    entry: Entry,
    local: Path,
    row: dict[str, Any],
    *,
    alphas_read: bool = True,
    stand_in: bool = False,
    check: bool = False,
    layout_cache: bool = True,
) -> dict[str, Any]:
    """Fill ``row`` with the facts of ``local`` (the file itself, or with ``stand_in`` its sparse
    header stand-in, whose data section is a hole). ``check``: also fill ``loads_in`` from
    loratools.check (about 1 s per SDXL file today, so opt-in). ``layout_cache``: serve the
    layout's facts from :data:`.layouts.CACHE` when a file of the same layout was described."""
    from ..io.source import open_source
    from .layouts import CACHE, layout_key

    start = time.perf_counter()
    sniffed = sniff(local)
    if sniffed != "safetensors":
        if sniffed == "pickle" or entry.path.lower().endswith(PICKLE_SUFFIXES):
            row["kind"] = "pickle"
            row["problems"].append("pickle: not opened (a pickle can run code; convert it to safetensors)")
        elif sniffed == "lfs-pointer":
            row["problems"].append("lfs-pointer: the file is a Git LFS pointer, not the weights")
        elif sniffed == "empty":
            row["problems"].append("truncated: empty file")
        else:
            row["problems"].append("not-safetensors: neither a safetensors header nor a pickle")
        return row
    try:
        source = open_source(local)
        header = source.header()
        key = layout_key(header, local) if layout_cache else None
        facts = CACHE.get(key) if key is not None else None
        if facts is None:
            facts = _layout_facts(source)
            if key is not None:
                CACHE.put(key, facts)
    except LoratoolsError as exc:
        text = exc.one_line().replace(str(local), entry.path).replace(local.name, Path(entry.path).name)
        kind = "truncated" if "truncated" in text or "too short" in text else "unreadable"
        row["problems"].append(f"{kind}: {text}")
        return row
    row["problems"] += facts.pop("problems")  # after any the remote read found
    if facts["kind"] == "checkpoint":
        row.update(facts)
        return row
    if stand_in and facts["read"] != "header":
        # cloneofsimo/safeloras and pickles are described from their tensor values, which a
        # stand-in does not hold: say so rather than report facts of zeros
        row.update(kind="lora", read="tensors")
        row["problems"].append("needs-tensors: this LoRA dialect is not described from its header alone")
        return row
    metadata = header.metadata
    row.update(
        facts,
        alphas=facts["alphas"] if alphas_read else None,
        alphas_read=alphas_read,
        base_model=next((metadata[k] for k in BASE_MODEL_KEYS if metadata.get(k)), None),
        ss_sd_model_name=metadata.get("ss_sd_model_name"),
        trigger_words=_triggers(metadata),
        training=training_of(metadata) or {},
        stored_hashes={k: metadata[k] for k in HASH_KEYS if k in metadata},
        loads_in=_loads_in(local) if check else None,
    )
    if row["size"] is None:
        row["size"] = local.stat().st_size
    row["seconds"] += time.perf_counter() - start
    return row


def training_of(metadata: dict[str, str]) -> dict[str, Any]:
    """The training summary ``inspect`` shows (``metadata_summary.training``), for a row."""
    from ..report.lora import summarize_metadata

    training: dict[str, Any] = summarize_metadata(metadata)["training"]
    return training


def sniff(path: Path) -> str:
    """What the first bytes say: safetensors, pickle (protocol 2+ or a torch zip), lfs-pointer,
    empty or other. Read-only, a few bytes; nothing is unpickled."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if not head:
        return "empty"
    if head.startswith(b"version https://git-lfs"):
        return "lfs-pointer"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" or head.startswith(b"PK\x03\x04"):
        return "pickle"
    return "other"
