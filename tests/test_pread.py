"""The one data-section read loop (io/pread.py) and its truncation error, through each reader.

Every reader checks the header's offsets against the file's size when it opens the file, so a
truncated data section reaches the read loop only when the file shrinks after that check (another
process rewriting it). Each test shrinks the file at that moment and expects the one error:
``CorruptFileError`` naming the file, "file ended while reading tensor data". Before io/pread.py
the three loops said three things: the numpy resize path fell back to torch, which then refused
the file for its header offsets; ``inspect --norms`` raised a bare OSError.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loratools.errors import CorruptFileError
from loratools.formats.io import save_lora
from loratools.formats.scan import scan_lora
from loratools.io.pread import read_exact, read_span
from loratools.io.safetensors import SafetensorsFile
from loratools.io.source import open_source
from loratools.ops import rank_numpy
from loratools.ops.norms import scan_norms
from loratools.ops.resize import resize
from loratools.synthetic import TINY, make_lora

MESSAGE = "file ended while reading tensor data"


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return Path(save_lora(make_lora(TINY["sd1"], rank=8), tmp_path / "shrinks.safetensors", "kohya"))


def _shrink(path: Path, keep: float = 1.0) -> None:
    """Cut the file to ``keep`` of its size, and by 2 bytes at least: the last tensor of a kohya
    file (sorted keys: a module's ``lora_up.weight``, never an alpha the scan reads) ends early."""
    os.truncate(path, min(int(path.stat().st_size * keep), path.stat().st_size - 2))


def _expect_truncated(exc: pytest.ExceptionInfo[CorruptFileError], path: Path) -> None:
    assert MESSAGE in exc.value.message and path.name in exc.value.message


def test_read_exact_fills_and_refuses_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "bytes.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert bytes(read_span(path, 10, 1000)) == path.read_bytes()[10:1010]
    view = memoryview(bytearray(30))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptFileError) as exc:
            read_exact(fd, view, 1000, path)
    finally:
        os.close(fd)
    _expect_truncated(exc, path)


def test_safetensors_file_read_all(lora: Path) -> None:
    with SafetensorsFile(lora) as handle:
        _shrink(lora)
        with pytest.raises(CorruptFileError) as exc:
            handle.read_all()
    _expect_truncated(exc, lora)


def test_scan_reads_alphas(lora: Path) -> None:
    opened = open_source(lora)
    opened.header()
    _shrink(lora, keep=0.25)  # alphas of most modules are gone
    with pytest.raises(CorruptFileError) as exc:
        scan_lora(opened)
    _expect_truncated(exc, lora)


def test_scan_norms(lora: Path) -> None:
    scan = scan_lora(lora)
    assert scan is not None
    _shrink(lora)
    with pytest.raises(CorruptFileError) as exc:
        scan_norms(scan)
    _expect_truncated(exc, lora)


def test_numpy_resize_path(lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def scan_then_shrink(path: str | os.PathLike[str], family: object = None) -> object:
        scan = scan_lora(path, family)  # type: ignore[arg-type]
        _shrink(Path(path))
        return scan

    monkeypatch.setattr(rank_numpy, "scan_lora", scan_then_shrink)
    with pytest.raises(CorruptFileError) as exc:
        resize(lora, tmp_path / "out.safetensors", rank=4)
    _expect_truncated(exc, lora)
    assert not (tmp_path / "out.safetensors").exists()
