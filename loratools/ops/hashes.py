"""The hashes model sites and UIs identify files by, streamed (1 MiB reads, one pass), no torch.

docs/FORMATS.md §6, checked against the sources named there:

* **sha256 / AutoV2**: SHA-256 of the whole file; A1111 shows the first 10 hex digits
  (AUTOMATIC1111/stable-diffusion-webui:modules/hashes.py (calculate_sha256); sd_models.py
  (CheckpointInfo: ``shorthash = sha256[0:10]``)).
* **legacy / AutoV1** (A1111 ``model_hash``): SHA-256 of the 64 KiB at offset 1 MiB — fewer bytes
  when the file ends earlier, none below 1 MiB (``e3b0c442``); first 8 hex
  (modules/sd_models.py (model_hash); kohya-ss/sd-scripts:library/train_util.py (model_hash)).
* **addnet** (kohya ``sshs_model_hash``): SHA-256 of a safetensors file's data section, i.e.
  everything after ``8 + N`` header bytes (train_util.py (addnet_hash_safetensors)); metadata
  edits leave it alone. A1111's Lora "shorthash" is its first 12 hex (extensions-builtin/Lora/
  network.py (NetworkOnDisk.set_hash)).
* **sshs_legacy_hash**: the legacy hash of the in-memory serialization sd-scripts hashes before
  saving — the same tensors with only the ``ss_*`` metadata (train_util.py
  (precalculate_safetensors_hashes)). Its data section equals the file's (same tensors, same order),
  only the header is shorter, so the 64 KiB window is read from the file's data section at
  ``1 MiB − 8 − N'`` with ``N'`` the length of that header. Older safetensors releases did not pad
  the header to 8 bytes (the real LyCORIS files in shared/real_loras were written so: their own
  headers are unaligned too); both header lengths are tried, and which one matched is said.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io.safetensors import Header, read_header
from .progress import Progress, announce_total

LEGACY_OFFSET = 0x100000  # 1 MiB (A1111 model_hash, kohya addnet_hash_legacy)
LEGACY_LENGTH = 0x10000  # 64 KiB
CHUNK = 1 << 20  # the 1 MiB blocks A1111 and kohya read with; any size gives the same digests


@dataclass
class HashCheck:
    """A hash stored in the file's metadata against the one recomputed from its bytes."""

    key: str  # sshs_model_hash / sshs_legacy_hash
    stored: str
    computed: str | None  # None: could not be recomputed (note says why)
    ok: bool | None
    note: str = ""


@dataclass
class FileHashes:
    """Every hash of one file; ``addnet``/``checks`` only for safetensors files."""

    path: str
    bytes: int
    sha256: str
    autov2: str  # sha256[:10]
    legacy: str  # A1111 model_hash / Civitai AutoV1, 8 hex
    addnet: str | None = None  # sha256 of the data section (kohya sshs_model_hash)
    addnet_short: str | None = None  # addnet[:12], A1111 "Lora hashes"
    checks: list[HashCheck] = field(default_factory=list)


def legacy_window(path: Path, size: int) -> bytes:
    """The bytes A1111's model_hash reads: up to 64 KiB from 1 MiB on."""
    if size <= LEGACY_OFFSET:
        return b""
    with open(path, "rb") as fh:
        fh.seek(LEGACY_OFFSET)
        return fh.read(LEGACY_LENGTH)


def _ss_header_length(header: Header, *, padded: bool) -> int:
    """Length of the header sd-scripts' in-memory serialization had (only ``ss_*`` metadata)."""
    table: dict[str, object] = {}
    ss = {k: v for k, v in header.metadata.items() if k.startswith("ss_")}
    if ss:
        table["__metadata__"] = ss
    for name, info in header.tensors.items():
        table[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.start, info.end]}
    # serde_json's compact form: no spaces, UTF-8 kept as is (Python's ensure_ascii=False escapes alike)
    length = len(json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return length + (-(8 + length) % 8 if padded else 0)


def _check_legacy(path: Path, header: Header, stored: str) -> HashCheck:
    data_size = header.file_size - header.data_start
    tried = []
    lengths = {padded: _ss_header_length(header, padded=padded) for padded in (True, False)}
    for padded in (True, False):
        n = lengths[padded]
        start = LEGACY_OFFSET - 8 - n  # window start inside the data section
        if start < 0:
            return HashCheck("sshs_legacy_hash", stored, None, None, "the 1 MiB window starts inside the header")
        if start >= data_size:
            window = b""
        else:
            with open(path, "rb") as fh:
                fh.seek(header.data_start + start)
                window = fh.read(min(LEGACY_LENGTH, data_size - start))
        computed = hashlib.sha256(window).hexdigest()[:8]
        tried.append(computed)
        if computed == stored.lower():
            if lengths[True] == lengths[False]:
                note = "matches"
            elif padded:
                note = "matches (the in-memory header padded to 8 bytes, as current safetensors writes it)"
            else:
                note = "matches (the in-memory header unpadded, as older safetensors releases wrote it)"
            return HashCheck("sshs_legacy_hash", stored, computed, True, note)
    return HashCheck(
        "sshs_legacy_hash",
        stored,
        tried[0],
        False,
        f"stale: neither header length gives {stored} ({' / '.join(tried)}); the tensors or ss_* metadata changed",
    )


def _stream(path: Path, data_start: int | None, progress: Progress | None) -> tuple[str, str | None]:
    """One streamed pass over a file: SHA-256 of all of it, and of its bytes from ``data_start``
    on (a safetensors data section; None: not asked). ``progress(n)`` per chunk read."""
    full = hashlib.sha256()
    data = hashlib.sha256() if data_start is not None else None
    with open(path, "rb", buffering=0) as fh:
        position = 0
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while got := fh.readinto(buffer):
            chunk = view[:got]
            full.update(chunk)
            if data is not None and data_start is not None and position + got > data_start:
                data.update(chunk[max(0, data_start - position) :])
            position += got
            if progress is not None:
                progress(got)
    return full.hexdigest(), data.hexdigest() if data is not None else None


def sha256_file(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """SHA-256 of a file, streamed in 1 MiB reads (the AutoV2 hash is its first 10 hex digits);
    ``progress`` as in :func:`file_hashes`."""
    path = Path(path)
    announce_total(progress, path.stat().st_size)
    return _stream(path, None, progress)[0]


def file_hashes(path: str | os.PathLike[str], progress: Progress | None = None) -> FileHashes:
    """Hash a file in one streamed pass; check its stored ``sshs_*`` values when it is safetensors.

    ``progress(n)`` gets the bytes of each chunk read, after its total (the file size) was
    announced (:mod:`loratools.ops.progress`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not a file (hashes are of single files)")
    header: Header | None = None
    try:
        header = read_header(path)
    except InputError:
        header = None  # a pickle, or not safetensors at all: whole-file hashes only
    size = path.stat().st_size
    announce_total(progress, size)
    sha, addnet = _stream(path, header.data_start if header is not None else None, progress)
    result = FileHashes(str(path), size, sha, sha[:10], hashlib.sha256(legacy_window(path, size)).hexdigest()[:8])
    if header is not None and addnet is not None:
        result.addnet = addnet
        result.addnet_short = result.addnet[:12]
        stored = header.metadata.get("sshs_model_hash")
        if stored is not None:
            ok = stored.lower() == result.addnet
            note = "matches" if ok else "stale: the tensor data changed after it was stored"
            result.checks.append(HashCheck("sshs_model_hash", stored, result.addnet, ok, note))
        legacy = header.metadata.get("sshs_legacy_hash")
        if legacy is not None:
            result.checks.append(_check_legacy(path, header, legacy))
    return result
