"""Pickles are read weights-only: tensors come back, code never runs."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from loratools.errors import CorruptFileError, InputError, UnsafePickleError
from loratools.io.checkpoint import open_checkpoint
from loratools.io.pickle import load_pickle


class _Payload:
    """Unpickling this would call a function of the attacker's choice."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def _hostile_files(tmp_path: Path, sentinel: Path) -> list[Path]:
    payloads = [
        _Payload(os.system, f"touch {sentinel}"),
        _Payload(eval, f"open({str(sentinel)!r}, 'w').close()"),
        _Payload(exec, f"open({str(sentinel)!r}, 'w').close()"),
    ]
    files = []
    for i, payload in enumerate(payloads):
        zipped = tmp_path / f"hostile{i}.ckpt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "evil": payload}, zipped)  # zip container
        legacy = tmp_path / f"hostile{i}.pt"
        legacy.write_bytes(pickle.dumps({"w": torch.ones(2), "evil": payload}))  # bare pickle
        files += [zipped, legacy]
    return files


def test_reduce_payloads_are_refused_without_running(tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    for path in _hostile_files(tmp_path, sentinel):
        before = path.read_bytes()
        with pytest.raises(
            UnsafePickleError, match=rf"{path.name}: pickle would call ((posix|os)\.system|_*builtins?_*\.(eval|exec))"
        ):
            load_pickle(path)
        assert not sentinel.exists(), f"{path.name} ran its payload"
        assert path.read_bytes() == before


def test_nested_state_dict_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.arange(3)}, "global_step": 875000, "epoch": 3}, path)
    assert list(load_pickle(path)) == ["a"]
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["a"] and torch.equal(ckpt.read("a"), torch.arange(3))


def test_non_tensor_entries_are_reported_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"a": torch.ones(1), "note": "hello", "step": 5}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["a"]
        assert sorted(ckpt.dropped) == ["note", "step"]


def test_list_pickle_loads_but_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save([torch.ones(4, 2), torch.ones(2, 4)], path)
    assert isinstance(load_pickle(path), list)
    with pytest.raises(InputError, match="not a state dict"):
        open_checkpoint(path)


def test_zip_member_escaping_the_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "traversal.pt"
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            target.writestr(item, source.read(item))
        target.writestr("../../etc/evil", b"x")
    with pytest.raises(UnsafePickleError, match="escapes"):
        load_pickle(path)


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))
    with pytest.raises(UnsafePickleError, match="inflate"):
        load_pickle(path)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04broken"])
def test_damaged_pickles_are_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises((CorruptFileError, UnsafePickleError), match=r"bad\.pt"):
        load_pickle(path)
