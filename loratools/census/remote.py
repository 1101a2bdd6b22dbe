"""A Hub file's header, read with HTTP range requests into a sparse local stand-in.

A census must not download weights. For a ``.safetensors`` file on the Hub we fetch the first
:data:`FIRST_READ` bytes (the 8-byte header length and, for most LoRAs, the whole JSON header;
one more request when the header is longer), and write them into a *sparse* local file of the
remote file's size: same header, same length, a data section that is a hole. The project's
header-only readers (:func:`loratools.report.inspect_lora`) then describe it exactly as they
describe the real file — no second reader to keep in step. ``alphas=True`` also fetches each
kohya ``*.alpha`` scalar, in as few range requests as a byte budget allows
(:func:`plan_reads`: adjacent alphas in one request, gaps read through up to 1 % of the file);
without it the stand-in holds
1.0 in every alpha slot and the census row records ``alphas_read: false`` and no alpha values.

Requests go through huggingface_hub's HTTP session (its proxies, token and user agent) to the
``resolve`` URL, which redirects to wherever the bytes are. Every byte received is counted.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from urllib.parse import quote

from ..errors import CorruptFileError, InputError
from .sources import Entry, endpoint

FIRST_READ = 100_000  # as huggingface_hub's get_safetensors_metadata; most LoRA headers fit
MAX_HEADER = 100_000_000
# bytes between alphas a remote read may also fetch to save requests: 1 % of the file, at least this
ALPHA_BUDGET_MIN = 256 * 1024
LFS_POINTER = b"version https://git-lfs"
_ONE = {"F64": struct.pack("<d", 1.0), "F32": struct.pack("<f", 1.0), "F16": struct.pack("<e", 1.0),
        "BF16": struct.pack("<f", 1.0)[2:]}  # fmt: skip


@dataclass
class Fetched:
    """A remote file's stand-in: the sparse local file, and what reading it cost."""

    path: Path | None  # None when nothing describable was found (see problem)
    size: int
    bytes_read: int
    requests: int
    alphas_read: bool
    problem: str | None = None  # lfs-pointer, not-safetensors, truncated


class RangeReader:
    """Range requests for one Hub file through huggingface_hub's session; counts bytes."""

    def __init__(self, entry: Entry) -> None:
        from huggingface_hub.utils import build_hf_headers, get_session

        self.url = f"{endpoint()}/{entry.repo}/resolve/{quote(entry.revision, safe='')}/{quote(entry.path)}"
        self.session = get_session()
        self.headers = build_hf_headers()
        self.bytes_read = 0
        self.requests = 0
        self.size: int | None = entry.size

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` … ``end - 1`` (fewer at the end of the file)."""
        from huggingface_hub.utils import hf_raise_for_status

        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}"}
        response = self.session.get(self.url, headers=headers)
        self.requests += 1
        hf_raise_for_status(response)
        body = response.content
        self.bytes_read += len(body)
        total = _total_size(response.headers.get("Content-Range"))
        if response.status_code == 200:  # no range support: we got (and paid for) the whole body
            total, body = len(body), body[start:end]
        if total is not None:
            self.size = total
        return body


def _total_size(content_range: str | None) -> int | None:
    if not content_range or "/" not in content_range:
        return None
    tail = content_range.rsplit("/", 1)[1]
    return int(tail) if tail.isdigit() else None


def fetch_header(
    entry: Entry, folder: str | os.PathLike[str], *, alphas: bool = False, reader: RangeReader | None = None
) -> Fetched:
    """Read ``entry``'s header (and optionally its alphas) into a sparse file in ``folder``.
    ``reader``: the caller's, to know what was read when this raises."""
    reader = reader or RangeReader(entry)
    first = reader.read(0, FIRST_READ if entry.size is None else min(FIRST_READ, entry.size))
    size = reader.size if reader.size is not None else len(first)

    def result(path: Path | None, problem: str | None = None, alphas_read: bool = False) -> Fetched:
        return Fetched(path, size, reader.bytes_read, reader.requests, alphas_read, problem)

    if first.startswith(LFS_POINTER):
        return result(None, "lfs-pointer: the file is a Git LFS pointer, not the weights")
    if len(first) < 8:
        return result(None, f"truncated: {size}-byte file is too short for safetensors")
    (length,) = struct.unpack("<Q", first[:8])
    if length > MAX_HEADER or (len(first) > 8 and first[8:9] != b"{"):
        return result(None, "not-safetensors: no safetensors header")
    if 8 + length > size:
        return result(None, f"truncated: header claims {length} bytes but the file has {size}")
    head = first[: 8 + length]
    if len(head) < 8 + length:
        head += reader.read(len(first), 8 + length)
    if len(head) != 8 + length:
        raise InputError(f"{entry.path}: the server sent {len(head)} of {8 + length} header bytes")
    fd, name = tempfile.mkstemp(prefix="census-", suffix=".safetensors", dir=folder)
    try:
        os.write(fd, head)
        os.ftruncate(fd, size)  # the data section is a hole: no disk, no download
        read = _fill_alphas(fd, Path(name), reader if alphas else None)
    finally:
        os.close(fd)
    return Fetched(Path(name), size, reader.bytes_read, reader.requests, read)


def plan_reads(slots: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` covering every slot in as few reads as ``budget`` allows.

    Neighbouring slots are merged when the gap between them is read too; the smallest gaps go
    first, while their sum stays within ``budget`` bytes (each merge saves one request, so this
    spends the budget where it saves the most requests). Alphas stored together (every gap 0)
    become one read; kohya's interleaved ``alpha``/``lora_down``/``lora_up`` layout, whose gaps
    are whole factors, stays near one read per alpha unless the budget covers the factors.
    """
    spans = sorted(set(slots))
    if not spans:
        return []
    gaps = sorted((max(0, b[0] - a[1]), i) for i, (a, b) in enumerate(pairwise(spans)))
    merged: set[int] = set()
    spent = 0
    for gap, i in gaps:
        if spent + gap > budget:
            break
        spent += gap
        merged.add(i)
    out = [spans[0]]
    for i, (start, end) in enumerate(spans[1:]):
        if i in merged:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _fill_alphas(fd: int, path: Path, reader: RangeReader | None) -> bool:
    """Put each ``*.alpha`` scalar in the stand-in: fetched when a reader is given (coalesced,
    :func:`plan_reads`), else 1.0.

    The stand-in's header is parsed here once, through :func:`loratools.io.headers.header_of`'s
    cache; writing the alphas changes the file's mtime, so the mtime is put back afterwards and
    the scan that follows is served the same parse (the header bytes did not change)."""
    from ..io.headers import header_of

    try:
        before = os.stat(fd)
        header = header_of(path)
    except CorruptFileError:
        return False  # the reader will say what is wrong when it reads the stand-in
    slots = {
        (header.data_start + info.start, header.data_start + info.end): info.dtype
        for key, info in header.tensors.items()
        if key.endswith(".alpha") and 0 < info.end - info.start <= 8
    }
    try:
        if reader is None:
            for (start, end), dtype in slots.items():
                os.pwrite(fd, _ONE.get(dtype, (1).to_bytes(end - start, "little")), start)
            return False
        for start, end in plan_reads(list(slots), max(ALPHA_BUDGET_MIN, header.file_size // 100)):
            body = reader.read(start, end)
            if len(body) != end - start:
                raise InputError(f"{path.name}: the server sent {len(body)} of {end - start} alpha bytes")
            os.pwrite(fd, body, start)
        return True
    finally:
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
