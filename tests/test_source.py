"""An input is opened once (issue 13 §6): a pickle is unpickled once per command, and the
names-only paths (inspect without --norms/--hashes, check) never read a safetensors file's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loratools.io.pickle as pickles
from loratools.cli.main import cli
from loratools.formats.io import load_lora, save_lora
from loratools.io.safetensors import SafetensorsFile
from loratools.io.source import PICKLE, SAFETENSORS, open_source
from loratools.synthetic import TINY, make_lora, write_checkpoint


def _pickled_lora(tmp_path: Path) -> Path:
    kohya = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "p.safetensors", "kohya")
    path = tmp_path / "a.ckpt"
    torch.save(load_file(kohya), path)
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{src}", "{out}.safetensors", "--to", "diffusers"],
        ["convert", "{src}", "{out}.safetensors", "--to", "kohya"],
        ["inspect", "{src}"],
        ["inspect", "{src}", "--json", "--keys"],
        ["inspect", "{src}", "--norms", "--hashes"],
    ],
    ids=["convert-diffusers", "convert-kohya", "inspect", "inspect-json-keys", "inspect-norms-hashes"],
)
def test_a_pickle_is_unpickled_once_per_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    source = _pickled_lora(tmp_path)
    calls: list[Path] = []
    original = pickles.load_pickle_raw

    def counted(path: str | Path) -> object:
        calls.append(Path(path))
        return original(path)

    monkeypatch.setattr(pickles, "load_pickle_raw", counted)
    argv = [a.format(src=source, out=tmp_path / "out") for a in args]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls == [source]


def _pickled_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    single = write_checkpoint(TINY["sd1"], tmp_path / "base.safetensors", "single")
    path = tmp_path / "base.ckpt"
    torch.save(load_file(single), path)
    return path, single


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{ckpt}"],
        ["inspect", "{ckpt}", "--json", "--keys"],
        ["convert", "{ckpt}", "{out}.safetensors"],
        ["merge", "{ckpt}", "{lora}", "-o", "{out}.safetensors"],
        ["diff", "{ckpt}", "{single}"],
    ],
    ids=["inspect", "inspect-json-keys", "convert", "merge", "diff"],
)
def test_a_pickle_checkpoint_is_unpickled_once_per_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Classifying a pickle unpickles it; every later step reuses that object (counted at
    torch.load, beneath every reader)."""
    ckpt, single = _pickled_checkpoint(tmp_path)
    lora = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "l.safetensors", "kohya")
    calls: list[object] = []
    original = torch.load

    def counted(*a: object, **k: object) -> object:
        calls.append(a[0])
        return original(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", counted)
    argv = [a.format(ckpt=ckpt, single=single, lora=lora, out=tmp_path / "out") for a in args]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [Path(str(c)) for c in calls] == [ckpt]


def test_open_source_tells_the_kind_from_bytes(tmp_path: Path) -> None:
    kohya = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "a.safetensors", "kohya")
    unnamed = tmp_path / "a.weights"
    unnamed.write_bytes(kohya.read_bytes())
    assert open_source(unnamed).kind == SAFETENSORS
    assert open_source(_pickled_lora(tmp_path)).kind == PICKLE
    opened = open_source(kohya)
    assert open_source(opened) is opened and load_lora(opened).adapters.keys() == load_lora(kohya).adapters.keys()


@pytest.mark.parametrize(
    ("family", "fmt"),
    [("sd1", "kohya"), ("sd1", "diffusers"), ("sdxl", "kohya"), ("sdxl", "diffusers")],
)
@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["check"]])
def test_names_only_paths_read_no_tensor_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, fmt: str, command: list[str]
) -> None:
    """Tiny-width LoRAs (no full-size family fits: names only) included."""
    path = save_lora(make_lora(TINY[family], rank=2), tmp_path / "a.safetensors", fmt)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("tensor data read on a names-only path")

    for name in ("read_all", "read", "tensor", "get_tensor"):
        if hasattr(SafetensorsFile, name):
            monkeypatch.setattr(SafetensorsFile, name, refuse)
    result = CliRunner().invoke(cli, [*command, str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
