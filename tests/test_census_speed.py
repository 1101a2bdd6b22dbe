"""The census's fast paths say exactly what the plain ones said (issue 16: ≥ 200 files/s).

Speed lives in bench/bench_census.py; here each shortcut is checked against an independent
oracle: the safetensors library for headers, the per-name regex/substring rules they replace.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers_census import TEMPLATES, write_templates
from safetensors import safe_open

from loratools.census.facts import describe, empty_row
from loratools.census.sources import Entry
from loratools.errors import CorruptFileError
from loratools.io.safetensors import read_header


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_templates(tmp_path_factory.mktemp("census-templates"))


def _row(path: Path) -> dict[str, Any]:
    st = path.stat()
    entry = Entry("local", f"{st.st_size}:{st.st_mtime_ns}", str(path), st.st_size)
    return describe(entry, path, empty_row(entry))


def _raw_file(path: Path, table: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_read_header_agrees_with_the_safetensors_library(name: str, templates: dict[str, Path]) -> None:
    """Names, order by offset, dtypes, shapes, spans and metadata: as safetensors reads them."""
    header = read_header(templates[name])
    with safe_open(str(templates[name]), framework="np") as handle:
        assert set(header.tensors) == set(handle.keys())
        assert header.metadata == (handle.metadata() or {})
        for key, info in header.tensors.items():
            piece = handle.get_slice(key)
            assert (info.dtype, list(info.shape)) == (piece.get_dtype(), piece.get_shape())
    spans = [(i.start, i.end) for i in header.tensors.values()]
    assert spans == sorted(spans) and spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # the tensors tile the data section
    assert header.data_start + spans[-1][1] == templates[name].stat().st_size


@pytest.mark.parametrize("dtype", [["F16"], {"F16": 1}, 16, None])
def test_unhashable_or_foreign_dtype_is_a_problem_not_an_error(dtype: object, tmp_path: Path) -> None:
    """A hostile header whose dtype is a list or object: `dtype in ITEMSIZE` raised TypeError
    (the census row carried an error); now it is the one-line unknown-dtype refusal."""
    table = {"lora_unet_x.lora_down.weight": {"dtype": dtype, "shape": [1], "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "hostile.safetensors", table, b"\0\0")
    with pytest.raises(CorruptFileError, match="unknown dtype"):
        read_header(path)
    row = _row(path)
    assert row["error"] is None and len(row["problems"]) == 1 and "unknown dtype" in row["problems"][0]


def test_zero_size_tensors_keep_their_file_order(tmp_path: Path) -> None:
    """Tensors sharing an offset (empty ones) stay in the header's order, as a stable sort kept them."""
    table = {
        "b": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
        "a": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
        "c": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
    }
    header = read_header(_raw_file(tmp_path / "empty.safetensors", table, b"\0\0"))
    assert list(header.tensors) == ["b", "a", "c"]
