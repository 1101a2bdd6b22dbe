"""Rank surgery's torch-free path: a kohya ``.safetensors`` LoRA read and written as bytes and numpy.

``import torch`` is 0.9–1.1 s, half of a resize of a full-size SD1.5 LoRA (issue 18). The readers
already run over header views (:mod:`loratools.formats.scan`), so a kohya LoRA's adapters are
built exactly as :func:`~loratools.formats.io.load_lora` builds them — same names, alphas,
warnings — over :class:`~loratools.formats.scan.ParamRef` views instead of tensors; the data
section is read once. Written files go through the same metadata code (:func:`kohya_metadata`)
and the same streaming writer, key order and hash rules as :func:`~loratools.formats.io.save_lora`'s
kohya branch; only the tensor bytes are made here, with torch's roundings (float64 → float32 →
fp16/bf16, round to nearest even, as ``Tensor.to`` does).

:func:`open_kohya` returns ``None`` for anything this path does not cover (other dialects,
embeddings, FLUX.1 names, dtypes numpy cannot read, a file the scan refuses): callers then take
the torch path, which gives the full reader's answer or error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats import kohya
from ..formats.adapters import LoraFile
from ..formats.lycoris import adapter_params
from ..formats.metadata import with_byte_hashes
from ..formats.names import in_source_order, kohya_text_prefixes, name_tables
from ..formats.scan import ParamRef, scan_lora
from ..io.pread import read_span
from ..io.safetensors import ITEMSIZE, StreamingWriter, TensorInfo
from ..threads import module_workers, numpy_blas_threads

if TYPE_CHECKING:
    from ..formats.adapters import Adapter

T = TypeVar("T")
R = TypeVar("R")

NUMPY_DTYPES = ("F64", "F32", "F16", "BF16")
# --dtype spellings this path writes (ops/checkpoint.py DTYPE_ALIASES, without importing torch)
DTYPE_NAMES = {"fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16", "bf16": "BF16", "bfloat16": "BF16",
               "fp32": "F32", "float32": "F32", "float": "F32", "f32": "F32"}  # fmt: skip
INF_BITS = {"F64": 0x7FF << 52, "F32": 0xFF << 23, "F16": 0x1F << 10, "BF16": 0xFF << 7}  # exponent all ones
SIGN_BIT = {"F64": 1 << 63, "F32": 1 << 31, "F16": 1 << 15, "BF16": 1 << 15}
_UINT = {8: "<u8", 4: "<u4", 2: "<u2"}


def numpy_dtype(dtype: object) -> str | None:
    """The safetensors dtype a ``--dtype`` value names, None for none given; raises ValueError for
    a value this path does not take (a torch dtype: the caller has torch already, use its path)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    if isinstance(dtype, str) and dtype.upper() in ("F16", "BF16", "F32"):
        return dtype.upper()
    raise ValueError(dtype)


def decode(raw: memoryview | bytes, dtype: str, wide: bool = False) -> np.ndarray:
    """The values of stored bytes: float32 for 16/32-bit floats, float64 for F64 or with ``wide``
    (both exact; ``wide`` saves the float32 pass when float64 is what the caller computes in)."""
    if dtype == "BF16":
        single = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        return single.astype(np.float64) if wide else single
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float64 if wide else np.float32)
    if dtype == "F32":
        single = np.frombuffer(raw, dtype="<f4")
        return single.astype(np.float64) if wide else single
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8")
    raise ValueError(dtype)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """The bytes torch's ``Tensor.to(dtype)`` stores for float32/float64 ``values``.

    torch rounds float64 to fp16/bf16 through float32 (two round-to-nearest-even steps), which
    differs from numpy's direct float64 → float16 in about one value in ten near a tie: the same
    two steps are taken here.
    """
    if dtype == "F64":
        return np.ascontiguousarray(values, dtype="<f8").tobytes()
    single = np.ascontiguousarray(values, dtype="<f4")
    if dtype == "F32":
        return single.tobytes()
    if dtype == "F16":
        return single.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = single.view(np.uint32)
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
        nan = np.isnan(single)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded.tobytes()
    raise ValueError(dtype)


def encode_scalar(value: float, dtype: str) -> tuple[bytes, float]:
    """``torch.tensor(value, dtype=…)``'s bytes for a Python float, and the value they hold."""
    raw = encode(np.array([value], dtype=np.float64), dtype)
    return raw, float(decode(raw, dtype)[0])


@dataclass
class KohyaSource:
    """A kohya LoRA file read for the numpy path: its LoraFile over header views and its data."""

    path: Path
    lora: LoraFile  # adapters hold ParamRefs (shape/dtype/offset), not tensors
    data: memoryview  # the whole data section
    data_start: int

    def raw(self, ref: ParamRef) -> memoryview:
        """The stored bytes of one tensor."""
        start = ref.offset - self.data_start
        return self.data[start : start + ref.info.nbytes]

    def values(self, ref: ParamRef, wide: bool = False) -> np.ndarray:
        """One tensor's values, flat: float32 (float64 for F64), or float64 with ``wide`` (exact both ways)."""
        return decode(self.raw(ref), ref.info.dtype, wide)

    def finite(self, ref: ParamRef) -> bool:
        """No NaN/inf in a stored tensor: no exponent field all ones, tested on the bits (no decode)."""
        size = ITEMSIZE[ref.info.dtype]
        bits = np.frombuffer(self.raw(ref), dtype=_UINT[size])
        if bits.size == 0:
            return True
        magnitude = np.bitwise_and(bits, np.array(SIGN_BIT[ref.info.dtype] - 1, dtype=_UINT[size]))
        return int(magnitude.max()) < INF_BITS[ref.info.dtype]


def _refs(adapter: Adapter) -> list[ParamRef]:
    return [v for v in vars(adapter).values() if isinstance(v, ParamRef)]


def factor_dtype(adapter: Adapter) -> str:
    """The safetensors dtype of an adapter's first floating factor (:func:`~loratools.formats.adapters.factor_dtype`)."""
    for ref in _refs(adapter):
        if ref.is_floating_point():
            return ref.info.dtype
    return "F32"


def open_kohya(
    source: str | os.PathLike[str],
    family: str | FamilySpec | None,
    accept: Callable[[Adapter], bool],
    *,
    check_finite: bool = True,
) -> KohyaSource | None:
    """The kohya LoRA at ``source`` for the numpy path, or None where the torch path must read it:
    not a kohya safetensors file, embeddings, a module ``accept`` refuses, a dtype numpy does not
    read, NaN/inf factors, or anything the scan refuses (the full reader then gives its own error).
    ``check_finite=False`` leaves the NaN/inf test to a caller whose arithmetic finds them anyway
    (product_svd's Gram diagonals) and that then retries on the torch path."""
    try:
        scan = scan_lora(source, family)
    except (InputError, OSError):
        return None
    if scan is None or scan.header is None or scan.format != kohya.FORMAT or scan.embeddings:
        return None
    header = scan.header
    known = {ref.key: ref for m in scan.modules.values() for ref in m.params.values()}  # alphas already read
    refs = {
        k: known.get(k) or ParamRef(k, i, header.data_start + i.start, scan.path) for k, i in header.tensors.items()
    }
    try:
        views: Mapping[str, Any] = refs  # the readers take header views as tensors (formats/scan.py)
        lora = kohya.read_kohya(views, header.metadata, family)
    except InputError:
        return None
    if lora.unmatched:
        return None  # modules the family does not place: the torch path carries them (formats/resolve.py Unplaced)
    for adapter in lora.adapters.values():
        if not accept(adapter) or any(r.info.dtype not in NUMPY_DTYPES for r in _refs(adapter)):
            return None
    lora.path = str(scan.path)
    # one read of the data section, as SafetensorsFile.read_all does; a file that shrank since its
    # header was checked raises the reader's own CorruptFileError (io/pread.py)
    view = read_span(scan.path, header.data_start, header.file_size - header.data_start)
    source_data = KohyaSource(scan.path, lora, view, header.data_start)
    if check_finite and not all(source_data.finite(r) for a in lora.adapters.values() for r in _refs(a)):
        return None  # load_lora refuses NaN/inf factors: its error is the one to give
    return source_data


def map_numpy(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, in order, on :func:`~loratools.threads.module_workers`
    single-threaded workers (numpy releases the GIL in its products and LAPACK calls)."""
    todo = list(items)
    workers = module_workers(len(todo))
    with numpy_blas_threads(1):
        if workers <= 1:
            return [fn(x) for x in todo]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loratools") as pool:
            return list(pool.map(fn, todo))


class Blobs:
    """The bytes of each output tensor, keyed by the ParamRef object that stands for it."""

    def __init__(self) -> None:
        self._bytes: dict[int, bytes | memoryview] = {}
        self._keep: list[ParamRef] = []

    def put(self, ref: ParamRef, data: bytes | memoryview) -> ParamRef:
        self._bytes[id(ref)] = data
        self._keep.append(ref)  # keeps the id unique while the blob lives
        return ref

    def get(self, ref: ParamRef) -> bytes | memoryview:
        return self._bytes[id(ref)]

    def __contains__(self, ref: object) -> bool:
        return id(ref) in self._bytes


def array_ref(blobs: Blobs, key: str, values: np.ndarray, shape: tuple[int, ...], dtype: str) -> ParamRef:
    """A header view of a new tensor (``values`` stored as ``dtype``), its bytes kept in ``blobs``."""
    return blobs.put(ParamRef(key, TensorInfo(dtype, tuple(int(d) for d in shape)), 0), encode(values, dtype))


def _kohya_names(lora: LoraFile) -> dict[str, str]:
    """The lora_name of each module, as :func:`~loratools.formats.kohya.kohya_state_dict` names it."""
    if lora.family is None:
        return {module: module for module in lora.adapters}
    tables = name_tables(lora.family)
    prefixes = kohya_text_prefixes(lora.family)
    sgm = lora.family.single_layout == "sgm"
    return {m: tables.kohya_name(m, sgm_unet=sgm, text_prefixes=prefixes) for m in lora.adapters}


def kohya_tensors(
    lora: LoraFile, source: KohyaSource | None, blobs: Blobs, dtype: str | None
) -> dict[str, tuple[TensorInfo, bytes | memoryview]]:
    """key → (dtype/shape, bytes) of the kohya file ``lora`` makes, in the writer's (sorted) order.

    A ParamRef in ``blobs`` is a new tensor; any other is the source's, copied (or converted to
    ``dtype``) byte for byte. ``alpha`` is stored in the module's factor dtype (or ``dtype``).
    """
    if lora.family is None and lora.names != "kohya":
        raise ValueError("a LoRA with no family map and non-kohya names takes the torch path")
    out: dict[str, tuple[TensorInfo, bytes | memoryview]] = {}
    for module, name in _kohya_names(lora).items():
        adapter = lora.adapters[module]
        stored = dtype or factor_dtype(adapter)
        params = adapter_params(adapter, None)
        for param, ref in params.items():
            assert isinstance(ref, ParamRef)
            if ref in blobs:
                data = blobs.get(ref)
                info = ref.info
            else:
                assert source is not None
                data = source.raw(ref)
                info = TensorInfo(ref.info.dtype, tuple(ref.shape))
            if dtype is not None and ref.is_floating_point() and info.dtype != dtype:
                data = encode(decode(data, info.dtype), dtype)
                info = TensorInfo(dtype, info.shape)
            out[f"{name}.{param}"] = (info, data)
        if "diff" not in params:  # a full diff has no alpha (formats/lycoris.py adapter_params)
            raw, _ = encode_scalar(adapter.alpha, stored)
            out[f"{name}.alpha"] = (TensorInfo(stored, ()), raw)
    if lora.family is None and lora.source_keys:  # kept by its own names: the file's own order
        return in_source_order(out, lora.source_keys)
    return dict(sorted(out.items()))


def write_kohya(
    lora: LoraFile,
    source: KohyaSource | None,
    blobs: Blobs,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``lora`` (adapters over ParamRefs) as a kohya file, as :func:`save_lora` would (atomic)."""
    tensors = kohya_tensors(lora, source, blobs, dtype)
    infos = {key: info for key, (info, _) in tensors.items()}
    metadata = with_byte_hashes(kohya.kohya_metadata(lora), infos, (data for _, data in tensors.values()))
    plan = {key: info for key, (info, _) in tensors.items()}
    with StreamingWriter(Path(output), plan, metadata, overwrite=overwrite) as writer:
        for key, (_, data) in tensors.items():
            writer.write_bytes(key, data)


def negated(source: KohyaSource, ref: ParamRef, blobs: Blobs) -> ParamRef:
    """``-t`` of a stored tensor: its sign bits flipped (exact in every float format, as ``torch.neg``)."""
    size = ITEMSIZE[ref.info.dtype]
    bits = np.frombuffer(source.raw(ref), dtype=_UINT[size]) ^ np.array(SIGN_BIT[ref.info.dtype], dtype=_UINT[size])
    return blobs.put(ParamRef(ref.key, TensorInfo(ref.info.dtype, tuple(ref.shape)), 0), bits.tobytes())


def scaled(source: KohyaSource, ref: ParamRef, by: float, blobs: Blobs) -> ParamRef:
    """``(t.to(float32) * by).to(t.dtype)`` of a stored tensor, as rescale computes it in torch
    (float32 product — torch casts the Python scalar to the tensor's float32 — then stored back)."""
    values = source.values(ref)
    dtype = ref.info.dtype
    product = values.astype(np.float32) * np.float32(by)
    return blobs.put(ParamRef(ref.key, TensorInfo(dtype, tuple(ref.shape)), 0), encode(product, dtype))
