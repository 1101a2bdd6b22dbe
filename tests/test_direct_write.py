"""The streaming writer's O_DIRECT path (io/safetensors.py DirectWriter): whatever the filesystem
does with it — takes it, has no O_DIRECT, refuses a write halfway — the file's bytes are those of
the buffered path, and a failed write still leaves nothing behind."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools.errors import CorruptFileError, OutputError
from loratools.io import safetensors as st
from loratools.io.safetensors import SafetensorsFile, StreamingWriter, tensor_plan

HASH_KEY = "modelspec.hash_sha256"
DIRECT = getattr(os, "O_DIRECT", 0)


def _tensors() -> dict[str, torch.Tensor]:
    """Odd sizes, so tensors start at every alignment: heads, tails, bodies of several chunks."""
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(3, generator=g),  # puts every later offset off the page grid
        "b": torch.randn(1000, 37, generator=g).half(),
        "c": torch.randn(4096 * 5 + 3, generator=g),
        "d": torch.randn(2, 2, generator=g).bfloat16(),
        "e": torch.randn(8192 * 3, generator=g).bfloat16(),  # starts wherever d left off
        "f": torch.arange(4096 * 4, dtype=torch.int32),
        "g": torch.tensor(0.25),
    }


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny thresholds, so test-sized tensors take the direct path in several staging chunks."""
    monkeypatch.setattr(st, "DIRECT_MIN", 4096)
    monkeypatch.setattr(st, "_STAGE_BYTES", 3 * 4096)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Sizes of every write that reached a direct descriptor."""
    sizes: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT:
            assert offset % st.DIRECT_ALIGN == 0 and len(data) % st.DIRECT_ALIGN == 0
            sizes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    yield sizes


def _write(path: Path, tensors: dict[str, torch.Tensor], **kwargs: object) -> bytes:
    with StreamingWriter(path, tensor_plan(tensors), {"k": "v"}, **kwargs) as writer:  # type: ignore[arg-type]
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return path.read_bytes()


def _copy(path: Path, source: Path, **kwargs: object) -> bytes:
    with (
        SafetensorsFile(source) as src,
        StreamingWriter(path, {n: src.info(n) for n in src}, {"k": "v"}, **kwargs) as w,
    ):  # type: ignore[arg-type]
        for name in src:
            w.copy_raw(name, src)
    return path.read_bytes()


def _buffered(make: Callable[[], bytes], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The same output with the direct path switched off."""
    with monkeypatch.context() as m:
        m.setattr(st.DirectWriter, "open", classmethod(lambda cls, path, fd: None))
        return make()


def _needs_direct(folder: Path) -> None:
    if not DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    probe = folder / ".direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | DIRECT))
    except OSError:
        pytest.skip(f"{folder} has no O_DIRECT")
    finally:
        probe.unlink(missing_ok=True)


@pytest.mark.parametrize("hashed", [False, True])
def test_direct_writes_give_the_buffered_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None, spy: list[int], hashed: bool
) -> None:
    _needs_direct(tmp_path)
    tensors = _tensors()
    kwargs = {"data_hash_key": HASH_KEY} if hashed else {}
    ours = _write(tmp_path / "direct.safetensors", tensors, **kwargs)
    assert spy and max(spy) == 3 * 4096  # the path was taken, in more than one chunk per tensor
    assert ours == _buffered(lambda: _write(tmp_path / "buffered.safetensors", tensors, **kwargs), monkeypatch)
    loaded = load_file(tmp_path / "direct.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("hashed", [False, True])
def test_direct_raw_copies_give_the_buffered_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None, spy: list[int], hashed: bool
) -> None:
    _needs_direct(tmp_path)
    source = tmp_path / "source.safetensors"
    _buffered(lambda: _write(source, _tensors()), monkeypatch)
    kwargs = {"data_hash_key": HASH_KEY} if hashed else {}
    ours = _copy(tmp_path / "direct.safetensors", source, **kwargs)
    assert spy
    assert ours == _buffered(lambda: _copy(tmp_path / "buffered.safetensors", source, **kwargs), monkeypatch)
    if hashed:  # the data hash covers exactly the data section
        with SafetensorsFile(tmp_path / "direct.safetensors") as f:
            start = f.span(next(iter(f)))[0]
            assert f.metadata[HASH_KEY] == "0x" + hashlib.sha256(ours[start:]).hexdigest()


def test_full_size_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy: list[int]) -> None:
    """The real DIRECT_MIN and staging size: one tensor spans chunks, small ones stay buffered."""
    _needs_direct(tmp_path)
    g = torch.Generator().manual_seed(5)
    tensors = {"norm": torch.randn(77, generator=g), "big": torch.randn((st._STAGE_BYTES + 12345) // 4, generator=g)}
    tensors["small"] = torch.randn(st.DIRECT_MIN // 8, generator=g)
    ours = _write(tmp_path / "direct.safetensors", tensors)
    assert len(spy) == 2 and spy[0] == st._STAGE_BYTES  # only "big" went direct, in two writes
    assert ours == _buffered(lambda: _write(tmp_path / "buffered.safetensors", tensors), monkeypatch)


def test_small_tensors_open_no_direct_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real = st.DirectWriter.open.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(st.DirectWriter, "open", classmethod(lambda cls, p, fd: opened.append(p) or real(cls, p, fd)))
    tensors = {"a": torch.randn(3), "b": torch.randn(1000)}  # a LoRA's worth
    ours = _write(tmp_path / "small.safetensors", tensors)
    assert opened == []
    assert ours == _buffered(lambda: _write(tmp_path / "buffered.safetensors", tensors), monkeypatch)


@pytest.mark.parametrize("refuse_after", [0, 2])
@pytest.mark.parametrize("number", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_refused_direct_write_falls_back_to_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None, refuse_after: int, number: int
) -> None:
    """A filesystem that opens O_DIRECT but refuses the writes, at the first or halfway through a tensor."""
    _needs_direct(tmp_path)
    real = os.pwrite
    direct_writes = {"n": 0}

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT:
            direct_writes["n"] += 1
            if direct_writes["n"] > refuse_after:
                raise OSError(number, os.strerror(number))
        return real(fd, data, offset)

    source = tmp_path / "source.safetensors"
    _buffered(lambda: _write(source, _tensors()), monkeypatch)
    makers: dict[str, Callable[[Path], bytes]] = {
        "write": lambda p: _write(p, _tensors(), data_hash_key=HASH_KEY),
        "copy": lambda p: _copy(p, source, data_hash_key=HASH_KEY),
    }
    for name, make in makers.items():
        expected = _buffered(lambda: make(tmp_path / f"{name}-buffered.safetensors"), monkeypatch)  # noqa: B023
        direct_writes["n"] = 0
        with monkeypatch.context() as m:
            m.setattr(os, "pwrite", pwrite)
            assert make(tmp_path / f"{name}-refused.safetensors") == expected
        assert direct_writes["n"] == refuse_after + 1  # refused once, then never tried again


def test_no_o_direct_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None) -> None:
    """A platform without os.O_DIRECT (macOS): no descriptor, the buffered bytes."""
    expected = _buffered(lambda: _write(tmp_path / "buffered.safetensors", _tensors()), monkeypatch)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert _write(tmp_path / "plain.safetensors", _tensors()) == expected


def test_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None) -> None:
    """/dev/shm (tmpfs: no O_DIRECT before Linux 6.6, a no-op after): the buffered bytes either way."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    expected = _buffered(lambda: _write(tmp_path / "buffered.safetensors", _tensors()), monkeypatch)
    out = shm / f"loratools-test-{os.getpid()}.safetensors"
    try:
        assert _write(out, _tensors()) == expected
    finally:
        out.unlink(missing_ok=True)


def test_disk_full_on_a_direct_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None
) -> None:
    _needs_direct(tmp_path)
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="disk full"):
        _write(tmp_path / "out.safetensors", _tensors(), overwrite=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_write_that_takes_nothing_is_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwrite returning 0 ends the loop as ENOSPC instead of spinning forever."""
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(OSError) as caught:
        st.DirectWriter(-1)._pwrite(-1, memoryview(b"x"), 0, direct=False)
    assert caught.value.errno == errno.ENOSPC


def test_truncated_source_in_a_direct_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None) -> None:
    _needs_direct(tmp_path)
    source = tmp_path / "source.safetensors"
    _buffered(lambda: _write(source, _tensors()), monkeypatch)
    with SafetensorsFile(source) as src:
        os.truncate(source, src.span("c")[0] + 100)  # after opening: the header still promises "c"
        plan = {n: src.info(n) for n in src}
        with pytest.raises(CorruptFileError, match="truncated"), StreamingWriter(tmp_path / "o.safetensors", plan) as w:
            for name in src:
                w.copy_raw(name, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]
