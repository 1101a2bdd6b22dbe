"""safetensors without ever holding a whole file: header parsing, per-tensor reads, streaming writes.

The container is 8 bytes of little-endian header length N, N bytes of JSON (tensor table plus an
optional ``__metadata__`` object of strings), then the raw tensor bytes. We parse and validate the
header ourselves (we need the byte offsets to copy untouched tensors as raw bytes) and also let the
safetensors library open the file, so that anything it would refuse we refuse too.

Tensor bytes are read with ``pread`` into a fresh buffer rather than through an mmap: touched pages
of a mapping count towards the process' resident set, and merging a 7 GB checkpoint must not look
like it needs 7 GB.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import CorruptFileError, InputError
from .atomic import WRITEBACK_CHUNK, AtomicFile, check_destination, describe_os_error, start_writeback
from .files import regular_file
from .measure import Tally, active

if TYPE_CHECKING:
    import torch

# safetensors dtype strings (safetensors/src/tensor.rs, Dtype): byte sizes and torch names. Kept
# free of torch so that header-only work (inspect, raw copies) never pays torch's import.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# safetensors dtype string → the torch dtype's name ("F16" → "float16"), as reports print it.
TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """safetensors dtype string → torch dtype, importing torch only when first asked."""

    def __getitem__(self, name: str) -> torch.dtype:
        import torch

        dtype = getattr(torch, TORCH_NAMES[name], None)
        if not isinstance(dtype, torch.dtype):
            # torch.uint16/32/64 appeared in torch 2.3 (the declared floor is 2.1): one line, not an AttributeError
            raise InputError(f"{name} tensors need torch >= 2.3 (this is torch {torch.__version__})")
        return dtype

    def __iter__(self) -> Iterator[str]:
        return iter(TORCH_NAMES)

    def __contains__(self, name: object) -> bool:
        return name in TORCH_NAMES

    def __len__(self) -> int:
        return len(TORCH_NAMES)


DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()

# No real checkpoint header comes close to this (SDXL with metadata is ~250 KB); the safetensors
# library itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000
_ALIGN = 8  # safetensors pads the header with spaces so tensor data starts 8-byte aligned


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (``torch.float16`` → ``"F16"``)."""
    try:
        return next(name for name, torch_name in TORCH_NAMES.items() if str(dtype) == f"torch.{torch_name}")
    except StopIteration:
        raise InputError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: dtype string, shape, byte span in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section
    file_size: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # dict() in C first: a header has thousands of small objects, and only a file with a
    # duplicate key needs the per-key loop below (which names the key)
    fast = dict(pairs)
    if len(fast) == len(pairs):
        return fast
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


_new_info = object.__new__
_METADATA_KEY = '"__metadata__"'
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (RFC 8259 §2)
_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates)
# Validated tensor tables by the header text around the __metadata__ value (a census reads
# thousands of headers of a few layouts, each with its own metadata: issue 16). Bounded by the
# tensors held (~500 B each: ≤ ~75 MB, ~60 SDXL layouts), least recently used dropped first.
_TABLES: OrderedDict[tuple[int, bytes, int], dict[str, TensorInfo]] = OrderedDict()
_TABLES_MAX_TENSORS = 150_000
_tables_held = 0
_tables_lock = threading.Lock()


def _split_metadata(text: str) -> tuple[str, str, object] | None:
    """``text`` before the value of its one ``"__metadata__"`` key, the text after that value
    (trailing whitespace, the header's padding, dropped) and the value, decoded as the full
    parse decodes it; None where that is not a plain split (no such key, two of them, bad JSON).

    A literal ``"__metadata__"`` cannot occur inside a JSON string (a quote in a string is
    escaped), so the one occurrence is a key token or the tail of one (``"a\\"__metadata__"``);
    :func:`parse_header` caches only splits whose occurrence was the top-level key: its value
    equal to the parsed metadata, and no other object in the header (every tensor entry its three
    fields) that could hold it."""
    at = text.find(_METADATA_KEY)
    if at < 0 or text.find(_METADATA_KEY, at + 1) >= 0:
        return None
    colon = _WHITESPACE.match(text, at + len(_METADATA_KEY)).end()  # type: ignore[union-attr]
    if text[colon : colon + 1] != ":":
        return None
    start = _WHITESPACE.match(text, colon + 1).end()  # type: ignore[union-attr]
    try:
        value, end = _METADATA_DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return text[:start], text[end:].rstrip(" \t\n\r"), value


def _is_string_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def parse_header(path: str | Path, raw: bytes, file_size: int) -> Header:
    """Validate a header's JSON against the file size; every number is checked before use.

    A header whose text outside its ``__metadata__`` value, and whose data section size, equal
    those of a header validated before is served that header's tensor table: the validation
    below depends on nothing else (the metadata value is decoded and checked on its own, by
    the same rules). Anything unusual takes the full parse, so errors are the same words."""
    split = None
    data_size = file_size - 8 - len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # the full parse names the error
    if text is not None:
        split = _split_metadata(text)
    if split is not None:
        prefix, suffix, metadata = split
        digest = hashlib.blake2b(prefix.encode(), digest_size=16)
        digest.update(suffix.encode())
        key = (len(prefix), digest.digest(), data_size)  # the length: where the split was
        with _tables_lock:
            cached = _TABLES.get(key)
            if cached is not None:
                _TABLES.move_to_end(key)
        if cached is not None and _is_string_map(metadata):
            assert isinstance(metadata, dict)
            return Header(dict(cached), metadata, 8 + len(raw), file_size)
    header, plain = _parse_full(Path(path).name, raw, text, file_size)
    if split is not None and plain and isinstance(split[2], dict) and split[2] == header.metadata:
        _remember(key, header.tensors)
    return header


def _remember(key: tuple[int, bytes, int], tensors: dict[str, TensorInfo]) -> None:
    global _tables_held
    with _tables_lock:
        if key in _TABLES:
            return
        _TABLES[key] = dict(tensors)
        _tables_held += len(tensors)
        while _tables_held > _TABLES_MAX_TENSORS and len(_TABLES) > 1:
            _tables_held -= len(_TABLES.popitem(last=False)[1])


def _parse_full(name: str, raw: bytes, text: str | None, file_size: int) -> tuple[Header, bool]:
    """The header of :func:`parse_header`, every check made; and whether it is plain: a
    ``__metadata__`` key, and tensor entries of exactly their three fields."""
    try:
        if text is None:
            text = raw.decode("utf-8")
        table = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{name}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(table, dict):
        raise CorruptFileError(f"{name}: safetensors header is not a JSON object")
    plain = "__metadata__" in table
    metadata_raw = table.pop("__metadata__", None) or {}
    if not _is_string_map(metadata_raw):
        raise CorruptFileError(f"{name}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    # (start, end, position, key): plain tuple order is the stable sort by (start, end) the
    # tiling check needs, without a key function per entry
    spans: list[tuple[int, int, int, str]] = []
    # one pass, every check of every entry inline: this loop runs once per tensor of every header
    # a census reads (~3,000 for SDXL), so it avoids per-entry helper calls and property lookups
    itemsize = ITEMSIZE.get
    for key, entry in table.items():
        if type(entry) is not dict:
            raise CorruptFileError(f"{name}: header entry {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        size = itemsize(dtype) if type(dtype) is str else None
        if size is None:
            raise CorruptFileError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
        if type(shape) is not list:
            raise CorruptFileError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        for dim in shape:  # a plain loop: 3× cheaper than all() over a generator at 2–4 dims
            if type(dim) is not int or dim < 0:
                raise CorruptFileError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptFileError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, stop = offsets
        if stop > data_size:
            raise CorruptFileError(
                f"{name}: tensor {key!r} ends at byte {stop} of a {data_size}-byte data section"
                " (file truncated or header offsets out of range)"
            )
        nbytes = math.prod(shape) * size
        if stop - begin != nbytes:
            raise CorruptFileError(
                f"{name}: tensor {key!r} spans {stop - begin} bytes but {dtype}{list(shape)} needs {nbytes}"
            )
        # the frozen dataclass's __init__ (four object.__setattr__ calls) was a third of the parse;
        # its fields set straight into a new instance's __dict__ make the same, equal object
        info = _new_info(TensorInfo)
        fields = info.__dict__
        fields["dtype"], fields["shape"], fields["start"], fields["end"] = dtype, tuple(shape), begin, stop
        tensors[key] = info
        spans.append((begin, stop, len(spans), key))
    spans.sort()
    previous_end, previous_key = 0, None
    for begin, stop, _, key in spans:
        if begin < previous_end and stop > begin:
            raise CorruptFileError(f"{name}: tensors {previous_key!r} and {key!r} overlap")
        # The tensors must tile the data section exactly, as the safetensors library demands
        # (safetensors/src/tensor.rs, Metadata::validate): a header-only reader (inspect, diff,
        # classify) must refuse what every loader will refuse, not describe it.
        if begin > previous_end:
            after = f"after {previous_key!r}" if previous_key is not None else "before the first tensor"
            raise CorruptFileError(f"{name}: {begin - previous_end} unused bytes {after} (header offsets damaged)")
        if stop > begin:
            previous_end, previous_key = stop, key
    if previous_end != data_size:
        raise CorruptFileError(
            f"{name}: {data_size - previous_end} bytes after the last tensor that no header entry covers"
            " (damaged or not a safetensors file)"
        )
    ordered = {key: tensors[key] for _, _, _, key in spans}
    plain = plain and sum(map(len, table.values())) == 3 * len(table)  # every entry is a dict here
    return Header(ordered, dict(metadata_raw), data_start, file_size), plain


def read_header(path: str | Path) -> Header:
    """Read and validate the header of a safetensors file (reads only the header bytes)."""
    path = Path(path)
    regular_file(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(f"{path.name}: {file_size}-byte file is too short for safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise CorruptFileError(
                    f"{path.name}: safetensors header claims {length} bytes (limit {MAX_HEADER_BYTES})"
                )
            if 8 + length > file_size:
                raise CorruptFileError(
                    f"{path.name}: safetensors header claims {length} bytes but the file has {file_size}"
                    " (truncated or not a safetensors file)"
                )
            raw = fh.read(length)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    return parse_header(path, raw, file_size)


def _validate_with_library(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:  # numpy: no torch import for a header
            handle.keys()
    except Exception as exc:  # the library raises its own SafetensorError and others
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptFileError(f"{path.name}: safetensors refused the file ({reason})") from None


class SafetensorsFile:
    """An open safetensors file: header in memory, tensors read one at a time on request."""

    _fd: int | None = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        _validate_with_library(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    # -- context management -------------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- access ---------------------------------------------------------------------------------
    @property
    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        return self._fd

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def span(self, name: str) -> tuple[int, int]:
        """Absolute file offset and byte length of a tensor's data."""
        info = self.header.tensors[name]
        return self.header.data_start + info.start, info.nbytes

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (never an mmap view)."""
        import torch

        info = self.header.tensors[name]
        offset, nbytes = self.span(name)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        _pread_into(self.fileno, buffer, offset, self.path)
        return buffer.view(info.torch_dtype).reshape(info.shape)

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, from one read of the data section (for small files such as LoRAs).

        The tensors are views into one buffer of the data section's size; use :meth:`read` for
        checkpoints, where one tensor at a time is the point.
        """
        import torch

        size = self.header.file_size - self.header.data_start
        buffer = torch.empty(size, dtype=torch.uint8)
        _pread_into(self.fileno, buffer, self.header.data_start, self.path)
        out = {}
        for name, info in self.header.tensors.items():
            raw = buffer[info.start : info.end]
            if info.start % ITEMSIZE[info.dtype]:
                # safetensors does not require alignment: a 2-byte alpha before fp32 factors
                # (mixed dtypes, written in name order) leaves them misaligned; torch views
                # need aligned storage, so such a tensor gets its own copy
                raw = raw.clone()
            out[name] = raw.view(info.torch_dtype).reshape(info.shape)
        return out


def _pread_into(fd: int, buffer: torch.Tensor, offset: int, path: Path) -> None:
    from .pread import read_exact  # the one read loop (io/pread.py); imported here, where it is used

    read_exact(fd, buffer.numpy().data.cast("B"), offset, path)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


@dataclass(frozen=True)
class HeaderPlan:
    """A file's header as the writer emits it: the bytes (length prefix included), where each tensor
    lands in the data section, and where the data hash goes (-1 when none is asked for)."""

    raw: bytes
    placed: dict[str, TensorInfo]
    hash_at: int = -1

    @property
    def file_size(self) -> int:
        """Bytes of the whole file: header plus every tensor's data."""
        return len(self.raw) + sum(info.nbytes for info in self.placed.values())


_HASH_PLACEHOLDER = "0x" + "0" * 64
_HASH_CHUNK = 16 << 20


def build_header(
    plan: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None, data_hash_key: str | None = None
) -> HeaderPlan:
    """The one header builder: what :class:`StreamingWriter` writes and what :func:`file_size` measures.

    Needs only names, dtypes and shapes (never tensor values). ``data_hash_key``: a metadata key
    that will receive ``"0x"`` + SHA-256 of the data section; the header holds a placeholder of
    the value's exact length, so the size is known before any tensor is seen.
    """
    if data_hash_key is not None:
        metadata = {**(metadata or {}), data_hash_key: _HASH_PLACEHOLDER}
    table: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("safetensors metadata must map strings to strings")
        table["__metadata__"] = dict(metadata)
    placed: dict[str, TensorInfo] = {}
    offset = 0
    for name, info in plan.items():
        placed[name] = TensorInfo(info.dtype, tuple(info.shape), offset, offset + info.nbytes)
        table[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    raw = struct.pack("<Q", len(raw)) + raw
    hash_at = -1
    if data_hash_key is not None:
        field = json.dumps({data_hash_key: _HASH_PLACEHOLDER}, separators=(",", ":"))[1:-1].encode()
        hash_at = raw.index(field) + len(field) - len(_HASH_PLACEHOLDER) - 1
    return HeaderPlan(raw, placed, hash_at)


def file_size(
    plan: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None, data_hash_key: str | None = None
) -> int:
    """Bytes of the safetensors file a plan makes (header included, hash placeholder too), without writing it."""
    return build_header(plan, metadata, data_hash_key).file_size


def tensor_plan(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """The writer's plan for a dict of tensors: each one's safetensors dtype and shape, in order."""
    return {n: TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}


class StreamingWriter:
    """Write a safetensors file tensor by tensor: header first, then data in plan order.

    The plan (name → dtype and shape) must be known up front; peak memory is the one tensor being
    written. Untouched tensors are copied from a source file as raw bytes (``copy_file_range``), so
    they are never decoded. The file appears at ``path`` only when complete (see :class:`AtomicFile`).

    During a dry run (io/measure.py ``measuring``) nothing is opened: the destination is checked,
    tensors are checked against the plan and dropped, and the file's size from :func:`build_header`
    is recorded on close.
    """

    _dry: Tally | None = None

    def __init__(
        self,
        path: str | Path,
        plan: Mapping[str, TensorInfo],
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
        check: Callable[[Path], None] | None = None,
        data_hash_key: str | None = None,
        late: Callable[[], Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.check = check  # runs on the complete temporary file before it is renamed into place
        # late: called once the data is written, gives (placeholder, value) pairs of equal length
        # that are put in the header in that order, each where its placeholder first occurs (a
        # value computed while the file streams out: the base's SHA-256 in a merge's provenance)
        self._late = late
        # data_hash_key: a metadata key that receives "0x" + SHA-256 of the data section (every
        # tensor's bytes in file order), hashed as the tensors stream by and written into a
        # placeholder of the same length in the header before the file is committed
        self._digest = hashlib.sha256() if data_hash_key is not None else None
        header = build_header(plan, metadata, data_hash_key)
        self._header, self._placed, self._hash_at = header.raw, header.placed, header.hash_at
        self._order = list(self._placed)
        self._next = 0
        self.total_bytes = header.file_size
        self.overwrite = overwrite
        self._dry = active()
        self._atomic = AtomicFile(self.path, overwrite=overwrite, size_hint=self.total_bytes)
        self._written = 0  # bytes of the file written so far
        self._flushed = 0  # bytes whose writeback has been started
        self._direct: DirectWriter | None = None  # O_DIRECT path for the large tensors (see DirectWriter)

    def __enter__(self) -> StreamingWriter:
        if self._dry is not None:
            check_destination(self.path, overwrite=self.overwrite)  # refuse what the real run refuses
            return self
        self._fd = self._atomic.open()
        try:
            _write_all(self._fd, memoryview(self._header), self.path)
            self._written = len(self._header)
            if any(info.nbytes >= DIRECT_MIN for info in self._placed.values()):
                assert self._atomic.tmp is not None
                self._direct = DirectWriter.open(self._atomic.tmp, self._fd)
        except BaseException as exc:
            self._atomic.abort()
            if isinstance(exc, OSError):
                raise describe_os_error(exc, self.path) from None
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next]
            self._atomic.abort()
            raise RuntimeError(f"streaming writer closed before {missing!r} was written")
        if self._dry is not None:
            if exc_type is None:
                self._dry.add(self.path, self.total_bytes)
            return
        if exc_type is None:
            if self._digest is not None:
                value = f"0x{self._digest.hexdigest()}".encode()
                os.pwrite(self._fd, value, self._hash_at)
            try:
                self._fill_late()
            except BaseException:
                self._atomic.abort()
                raise
            self._atomic.commit(self.check)
            return
        self._atomic.abort()
        if isinstance(exc, OSError):
            raise describe_os_error(exc, self.path) from None

    def _fill_late(self) -> None:
        if self._late is None:
            return
        header = bytearray(self._header)
        if self._digest is not None:
            header[self._hash_at : self._hash_at + len(_HASH_PLACEHOLDER)] = f"0x{self._digest.hexdigest()}".encode()
        for placeholder, value in self._late():
            old, new = placeholder.encode(), value.encode()
            at = header.find(old)
            if len(old) != len(new) or at < 0:
                raise RuntimeError(f"late header value {placeholder!r}: no placeholder of its length")
            header[at : at + len(new)] = new
        os.pwrite(self._fd, bytes(header), 0)

    @property
    def pending(self) -> str | None:
        """Name of the next tensor the writer expects, or None when all are written."""
        return self._order[self._next] if self._next < len(self._order) else None

    def _expect(self, name: str) -> TensorInfo:
        if self.pending != name:
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {self.pending!r})")
        self._next += 1
        return self._placed[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan; its dtype and shape must match the plan."""
        info = self._expect(name)
        if dtype_name(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(
                f"tensor {name!r} is {dtype_name(tensor.dtype)}{list(tensor.shape)}, plan says {info.dtype}{list(info.shape)}"
            )
        if self._dry is not None:
            return
        self._put(info, tensor_bytes(tensor))

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        """Write the next tensor of the plan from its raw little-endian bytes (the numpy path)."""
        info = self._expect(name)
        if len(data) != info.nbytes:
            raise RuntimeError(f"tensor {name!r}: {len(data)} bytes given, plan says {info.nbytes}")
        if self._dry is not None:
            return
        self._put(info, memoryview(data).cast("B"))

    def _put(self, info: TensorInfo, data: memoryview) -> None:
        if self._digest is not None:
            self._digest.update(data)
        if self._direct is None or not self._direct.put(self._fd, data, self._written):
            _write_all(self._fd, data, self.path)
        self._grew(info.nbytes)

    def _grew(self, nbytes: int) -> None:
        """Start writeback of each full chunk as the file grows (one short fsync at the end)."""
        self._written += nbytes
        if self._written - self._flushed >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def copy_raw(self, name: str, source: SafetensorsFile, source_name: str | None = None) -> None:
        """Copy the next tensor of the plan byte for byte from an open source file."""
        info = self._expect(name)
        offset, nbytes = source.span(source_name or name)
        if nbytes != info.nbytes:
            raise RuntimeError(f"raw copy of {name!r}: source has {nbytes} bytes, plan needs {info.nbytes}")
        if self._dry is not None:
            return
        if self._direct is not None:
            try:
                copied = self._direct.copy(self._fd, source.fileno, offset, nbytes, self._written, self._digest)
            except EOFError:
                raise CorruptFileError(
                    f"{source.path.name}: file ended while copying tensor data (truncated)"
                ) from None
            if copied:
                self._grew(nbytes)
                return
        if self._digest is None:
            copy_range(source.fileno, offset, self._fd, nbytes, source.path, self.path)
        else:  # the bytes pass through here once, to be hashed on their way (no kernel copy)
            done = 0
            while done < nbytes:
                chunk = os.pread(source.fileno, min(_HASH_CHUNK, nbytes - done), offset + done)
                if not chunk:
                    raise CorruptFileError(f"{source.path.name}: file ended while copying tensor data (truncated)")
                self._digest.update(chunk)
                _write_all(self._fd, memoryview(chunk), self.path)
                done += len(chunk)
        self._grew(nbytes)


class _Digest(Protocol):
    def update(self, data: memoryview, /) -> None: ...


DIRECT_ALIGN = 4096  # O_DIRECT needs block-aligned offsets, lengths and memory; a page covers every block size
# Tensors with less than this many aligned bytes go through the page cache. Measured on SD1.5's
# tensors (bench/bench_write.py): 4 MiB left a fifth of the bytes buffered and the write 3× slower;
# 256 KiB leaves 2% and is as fast as writing everything direct, without a synchronous device
# round trip for each of the hundreds of small norms and biases.
DIRECT_MIN = 256 << 10
_STAGE_BYTES = 16 << 20  # one reused, resident buffer; 4–64 MiB measured the same
# What a filesystem that opened the descriptor says when it will not do the I/O direct after all:
# the data then goes buffered, bit for bit the same file.
_DIRECT_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


class DirectWriter:
    """Writes the block-aligned middle of large tensors with ``O_DIRECT``, through one reused buffer.

    A buffered ``write`` copies every byte into freshly allocated page-cache pages that the final
    fsync then has to push out; on the FLUX.1 cut (2.1 GB, most of it patched tensors) that kernel
    copy (``copy_folio_from_iter_atomic``) was a third of the merge's CPU, and the write of the
    patched tensors took 2–3× ``cp`` + ``sync`` of the same bytes. Copying into one staging buffer
    that stays resident and letting the device read it by DMA costs a fraction of that
    (bench/bench_write.py). The unaligned head and tail of each tensor still go through the
    buffered descriptor: those pages are never the ones written directly, so the two paths never
    share a page. Durability is unchanged: each direct ``pwrite`` returns once the device has the
    bytes, and the fsync at commit (on the buffered descriptor, the same inode) flushes the
    device's cache and the extent metadata of both.

    Where the filesystem has no O_DIRECT (tmpfs on older kernels, some FUSE) :meth:`open` gives
    None; where it opens the descriptor but refuses a direct write, the writer switches itself off
    and every later tensor goes buffered. Either way the file's bytes are the same.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._stage: mmap.mmap | None = None
        self.refused = False  # the filesystem took the descriptor but refused a direct write

    @classmethod
    def open(cls, path: Path, fd: int) -> DirectWriter | None:
        """A direct descriptor on ``path`` (which ``fd`` has open), or None where there is no O_DIRECT."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            direct = os.open(path, os.O_WRONLY | flag)
        except OSError:
            return None
        mine, theirs = os.fstat(direct), os.fstat(fd)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):  # renamed under us: not ours to write
            os.close(direct)
            return None
        return cls(direct)

    def _split(self, nbytes: int, at: int) -> list[tuple[int, int, bool]] | None:
        """(start, length, direct) pieces of ``nbytes`` written at ``at``; None when not worth it."""
        head = -at % DIRECT_ALIGN
        body = (nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN
        if body < DIRECT_MIN or self.refused:
            return None
        if self._stage is None:
            self._stage = mmap.mmap(-1, _STAGE_BYTES)  # page-aligned, as O_DIRECT needs of memory
        pieces = [(0, head, False)]
        pieces += [(head + d, min(_STAGE_BYTES, body - d), True) for d in range(0, body, _STAGE_BYTES)]
        pieces.append((head + body, nbytes - head - body, False))
        return [p for p in pieces if p[1]]

    def _pwrite(self, fd: int, data: memoryview, at: int, direct: bool) -> None:
        if direct and not self.refused:
            try:
                _pwrite_all(self.fd, data, at)
                return
            except OSError as exc:
                if exc.errno not in _DIRECT_REFUSED:
                    raise
                self.refused = True  # this and every later piece go buffered: the same bytes
        _pwrite_all(fd, data, at)

    def put(self, fd: int, data: memoryview, at: int) -> bool:
        """Write ``data`` at file offset ``at``; the buffered ``fd`` ends up positioned after it.

        False (and nothing written) when the tensor is too small to be worth it or direct writes
        were refused before; the caller writes it buffered then.
        """
        pieces = self._split(len(data), at)
        if pieces is None:
            return False
        assert self._stage is not None
        with memoryview(self._stage) as stage:
            for start, length, direct in pieces:
                piece = data[start : start + length]
                if direct:
                    stage[:length] = piece
                    piece = stage[:length]
                self._pwrite(fd, piece, at + start, direct)
        os.lseek(fd, at + len(data), os.SEEK_SET)  # copy_file_range and write append at the position
        return True

    def copy(self, fd: int, src: int, src_offset: int, nbytes: int, at: int, digest: _Digest | None) -> bool:
        """Copy ``nbytes`` of ``src`` from ``src_offset`` to file offset ``at``, as :meth:`put` writes.

        The source is read straight into the staging buffer (one copy, as ``copy_file_range``
        makes into the page cache) and hashed there when ``digest`` is given. False as for
        :meth:`put`. A source shorter than it claims raises EOFError.
        """
        pieces = self._split(nbytes, at)
        if pieces is None:
            return False
        assert self._stage is not None
        with memoryview(self._stage) as stage:
            for start, length, direct in pieces:
                piece = stage[:length]
                if os.preadv(src, [piece], src_offset + start) != length:
                    raise EOFError
                if digest is not None:
                    digest.update(piece)
                self._pwrite(fd, piece, at + start, direct)
        os.lseek(fd, at + nbytes, os.SEEK_SET)
        return True

    def close(self) -> None:
        """Close the descriptor and free the buffer (every direct write has already returned)."""
        with contextlib.suppress(OSError):  # nothing is pending on it; fsync on the other one reports errors
            os.close(self.fd)
        if self._stage is not None:
            with contextlib.suppress(BufferError):  # a traceback still holds a view: freed with it instead
                self._stage.close()
            self._stage = None


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], at + done)
        if n <= 0:  # a regular file that takes nothing is full (a loop here would never end)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


_COPY_CHUNK = 1 << 30


def copy_range(src_fd: int, src_offset: int, dst_fd: int, nbytes: int, src_path: Path, dst_path: Path) -> None:
    """Append ``nbytes`` from ``src_fd`` at ``src_offset`` to ``dst_fd`` inside the kernel when possible."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        want = min(_COPY_CHUNK, nbytes - done)
        got = 0
        if use_kernel:
            try:
                got = os.copy_file_range(src_fd, dst_fd, want, src_offset + done)
            except OSError as exc:
                if exc.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back
                    use_kernel = False
                    continue
                raise
        else:
            chunk = os.pread(src_fd, min(want, 64 << 20), src_offset + done)
            if chunk:
                _write_all(dst_fd, memoryview(chunk), dst_path)
            got = len(chunk)
        if got <= 0:
            raise CorruptFileError(f"{src_path.name}: file ended while copying tensor data (truncated)")
        done += got


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a dict of tensors atomically (the streaming writer over an in-memory dict)."""
    plan = tensor_plan(tensors)
    with StreamingWriter(path, plan, metadata, overwrite=overwrite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
