"""Streaming safetensors I/O: equal to the library's own files, atomic, and strict with bad bytes."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.errors import CorruptFileError, OutputError
from loratools.io import safetensors as st
from loratools.io.safetensors import SafetensorsFile, StreamingWriter, TensorInfo, read_header, save_tensors


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.half": torch.randn(3, 4, 2, 2, generator=g).half(),
        "c.bf16": torch.randn(9, generator=g).bfloat16(),
        "d.ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "e.scalar": torch.tensor(0.5),
        "f.empty": torch.zeros(0, 4),
        "g.i32": torch.tensor(3, dtype=torch.int32),
        "h.bool": torch.tensor([True, False, True]),
    }


def test_streamed_write_equals_save_file(tmp_path: Path) -> None:
    tensors = _sample()
    save_tensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name in tensors:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    with safe_open(tmp_path / "ours.safetensors", "pt") as handle:
        assert handle.metadata() == {"k": "v"}
    raw = (tmp_path / "ours.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data section 8-byte aligned


def test_reader_matches_library_and_reads_one_tensor(tmp_path: Path) -> None:
    tensors = _sample()
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            got = f.read(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


def test_raw_copy_is_byte_identical(tmp_path: Path) -> None:
    tensors = _sample()
    save_file(tensors, tmp_path / "src.safetensors", metadata={"m": "1"})
    with SafetensorsFile(tmp_path / "src.safetensors") as src:
        plan = {n: src.info(n) for n in src}
        with StreamingWriter(tmp_path / "dst.safetensors", plan, src.metadata) as writer:
            for name in src:
                writer.copy_raw(name, src)
    assert (tmp_path / "dst.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()


def test_raw_copy_falls_back_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file(_sample(), tmp_path / "src.safetensors")

    def unsupported(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    with (
        SafetensorsFile(tmp_path / "src.safetensors") as src,
        StreamingWriter(tmp_path / "dst.safetensors", {n: src.info(n) for n in src}) as writer,
    ):
        for name in src:
            writer.copy_raw(name, src)
    assert load_file(tmp_path / "dst.safetensors").keys() == _sample().keys()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or p.name.startswith("."))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_no_file(tmp_path: Path, interruption: type[BaseException]) -> None:
    tensors = _sample()
    plan = {n: TensorInfo(st.dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    with pytest.raises(interruption), StreamingWriter(tmp_path / "out.safetensors", plan) as writer:
        writer.write("a.weight", tensors["a.weight"])
        raise interruption()
    assert not (tmp_path / "out.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")
    plan = {"a": TensorInfo("F32", (2,))}
    with pytest.raises(KeyboardInterrupt), StreamingWriter(target, plan, overwrite=True):
        raise KeyboardInterrupt()
    assert target.read_bytes() == b"previous"


def test_disk_full_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        save_tensors(tmp_path / "out.safetensors", _sample())
    assert not (tmp_path / "out.safetensors").exists() and _leftovers(tmp_path) == []


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        save_tensors(tmp_path / "out.safetensors", _sample())
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"


def test_out_of_order_or_wrong_shape_writes_are_bugs_not_files(tmp_path: Path) -> None:
    plan = {"a": TensorInfo("F32", (2,)), "b": TensorInfo("F32", (2,))}
    with pytest.raises(RuntimeError, match="out of plan order"), StreamingWriter(tmp_path / "o.safetensors", plan) as w:
        w.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="plan says"), StreamingWriter(tmp_path / "o.safetensors", plan) as w:
        w.write("a", torch.zeros(3))
    assert not (tmp_path / "o.safetensors").exists()


# --- corrupt files --------------------------------------------------------------------------------


def _file(tmp_path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _good(tmp_path: Path) -> Path:
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated_header", "header claims"),
        ("truncated_data", "ends at byte"),
        ("tiny", "too short"),
        ("huge_header_length", "limit"),
        ("bad_json", "not valid JSON"),
        ("not_object", "not a JSON object"),
        ("unknown_dtype", "unknown dtype"),
        ("bad_shape", "invalid shape"),
        ("offsets_out_of_range", "ends at byte"),
        ("overlap", "overlap"),
        ("span_mismatch", "needs"),
        ("duplicate_key", "duplicate key"),
        ("bad_metadata", "__metadata__"),
        ("trillion_elements", "needs"),
    ],
)
def test_corrupt_files_are_refused_with_a_reason(tmp_path: Path, case: str, message: str) -> None:
    good = _good(tmp_path).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    if case == "truncated_header":
        path = tmp_path / "t.safetensors"
        path.write_bytes(good[: 8 + n // 2])
    elif case == "truncated_data":
        path = tmp_path / "t.safetensors"
        path.write_bytes(good[:-10])
    elif case == "tiny":
        path = tmp_path / "t.safetensors"
        path.write_bytes(b"\x01\x02")
    elif case == "huge_header_length":
        path = tmp_path / "t.safetensors"
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    elif case == "bad_json":
        path = _file(tmp_path, None, raw_header=b"{not json")
    elif case == "not_object":
        path = _file(tmp_path, [1, 2])
    elif case == "unknown_dtype":
        path = _file(tmp_path, {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "bad_shape":
        path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "offsets_out_of_range":
        path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "overlap":
        path = _file(
            tmp_path,
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        )
    elif case == "span_mismatch":
        path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "duplicate_key":
        path = _file(
            tmp_path,
            None,
            b"\0" * 4,
            raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        )
    elif case == "bad_metadata":
        path = _file(tmp_path, {"__metadata__": {"k": 1}})
    else:  # a header that claims 10¹² elements must be refused before anything is allocated
        path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptFileError, match=message):
        SafetensorsFile(path)


def test_header_only_read_does_not_touch_data(tmp_path: Path) -> None:
    """read_header works on a file whose data region is sparse (never read)."""
    plan = {"big": TensorInfo("F16", (4096, 4096))}
    header = st.build_header(plan).raw
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + plan["big"].nbytes)
    parsed = read_header(path)
    assert parsed.tensors["big"].shape == (4096, 4096)
