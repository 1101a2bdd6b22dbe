"""parse_header's table cache (io/safetensors.py, issue 16): headers that differ only in their
``__metadata__`` value share one validated tensor table, and give exactly what a full parse gives
— including its refusals, and for headers built to confuse where the metadata value is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratools.errors import CorruptFileError
from loratools.io.safetensors import TensorInfo, read_header

# one layout: three F16 tensors tiling 2·(4·3 + 3·4 + 1) bytes
TABLE = {
    "b.weight": {"dtype": "F16", "shape": [3, 4], "data_offsets": [24, 48]},
    "a.weight": {"dtype": "F16", "shape": [4, 3], "data_offsets": [0, 24]},
    "a.alpha": {"dtype": "F16", "shape": [], "data_offsets": [48, 50]},
}
DATA_SIZE = 50


def write(path: Path, text: str, data_size: int = DATA_SIZE) -> Path:
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)  # the padding of real writers: varies with the metadata's length
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * data_size)
    return path


def header_text(metadata: object, table: dict[str, object] = TABLE, *, first: bool = True) -> str:
    body = json.dumps(table, separators=(",", ":"))[1:-1]
    meta = f'"__metadata__":{json.dumps(metadata, separators=(",", ":"))}'
    return "{" + (f"{meta},{body}" if first else f"{body},{meta}") + "}"


def expected(table: dict[str, dict[str, object]]) -> dict[str, TensorInfo]:
    infos = {k: TensorInfo(str(v["dtype"]), tuple(v["shape"]), *v["data_offsets"]) for k, v in table.items()}  # type: ignore[call-overload, misc]
    return dict(sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)))


@pytest.mark.parametrize("first", [True, False], ids=["metadata-first", "metadata-last"])
def test_one_layout_many_metadata(tmp_path: Path, first: bool) -> None:
    metadatas = [{"ss_output_name": f"lora-{i}", "note": "x" * i + '"quoted" \\ \u00e9'} for i in range(6)]
    headers = [
        read_header(write(tmp_path / f"{i}.safetensors", header_text(m, first=first))) for i, m in enumerate(metadatas)
    ]
    for header, metadata in zip(headers, metadatas, strict=True):
        assert header.tensors == expected(TABLE)
        assert list(header.tensors) == ["a.weight", "b.weight", "a.alpha"]  # file order
        assert header.metadata == metadata
        assert header.data_start == header.file_size - DATA_SIZE
    # served from the first one's validated table (the same TensorInfo objects), each its own dict
    assert headers[-1].tensors["a.weight"] is headers[0].tensors["a.weight"]
    assert headers[-1].tensors is not headers[0].tensors


@pytest.mark.parametrize(
    ("metadata_text", "message"),
    [
        ('{"a":"1","a":"2"}', "duplicate key 'a'"),
        ('{"a":1}', "__metadata__ must map strings to strings"),
        ('{"a":"1"', "not valid JSON"),
        ('["a"]', "__metadata__ must map strings to strings"),
    ],
)
def test_cached_layout_still_refuses_bad_metadata(tmp_path: Path, metadata_text: str, message: str) -> None:
    read_header(write(tmp_path / "good.safetensors", header_text({"k": "v"})))
    bad = header_text({"k": "v"}).replace('{"k":"v"}', metadata_text, 1)
    with pytest.raises(CorruptFileError, match=message):
        read_header(write(tmp_path / "bad.safetensors", bad))


def test_cached_layout_checks_the_data_size(tmp_path: Path) -> None:
    read_header(write(tmp_path / "good.safetensors", header_text({"k": "v"})))
    with pytest.raises(CorruptFileError, match="after the last tensor"):
        read_header(write(tmp_path / "long.safetensors", header_text({"k": "w"}), DATA_SIZE + 8))


def test_metadata_key_nested_in_an_entry_is_not_the_metadata(tmp_path: Path) -> None:
    # the only literal "__metadata__" sits in a tensor entry's extra field (ignored by readers),
    # while the real top-level key is spelled with an escape: the nested value is never the metadata
    def text(nested: str) -> str:
        table = {**TABLE, "a.alpha": {**TABLE["a.alpha"], "__metadata__": {"k": nested}}}
        return header_text({"k": "top"}, table).replace(
            '"__metadata__":{"k":"top"}', '"\\u005f_metadata__":{"k":"top"}', 1
        )

    first = read_header(write(tmp_path / "1.safetensors", text("top")))
    second = read_header(write(tmp_path / "2.safetensors", text("nested")))
    assert first.metadata == second.metadata == {"k": "top"}


def test_metadata_key_as_the_tail_of_a_tensor_name(tmp_path: Path) -> None:
    # a tensor named `x"__metadata__` holds the only literal occurrence; there is no metadata
    table = dict(TABLE)
    table['x"__metadata__'] = table.pop("a.alpha")
    text = json.dumps(table, separators=(",", ":"))
    for name in ("1", "2"):
        header = read_header(write(tmp_path / f"{name}.safetensors", text))
        assert header.metadata == {}
        assert header.tensors == expected(table)
