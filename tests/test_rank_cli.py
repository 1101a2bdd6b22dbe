"""The rank-surgery commands: tables, --json, negative numbers, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.formats.adapters import LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.synthetic import TINY, make_lora, write_checkpoint

SD1 = FAMILIES["sd1"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture()
def lora_path(tmp_path: Path) -> Path:
    # full size: the CLI tells a LoRA's family from its shapes, which tiny test widths do not fit
    return save_lora(make_lora(SD1, rank=6, conv=True, alphas="varied"), tmp_path / "in.safetensors", "kohya")


def test_resize_table_and_json(tmp_path: Path, lora_path: Path) -> None:
    code, out, err = run("resize", lora_path, "--rank", "3", "-o", tmp_path / "r.safetensors")
    assert code == 0, err
    assert "6 → 3" in out and "kept" in out and "wrote" in out
    code, out, err = run("resize", lora_path, "--sv-fro", "0.9", "--max-rank", "4", "-o", tmp_path / "d.safetensors", "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["schema"] == "loratools.resize/1" and data["rule"] == "sv-fro 0.9 (max 4)"
    assert max(int(r) for r in data["ranks_after"]) <= 4


def test_piped_table_keeps_each_module_on_one_line(tmp_path: Path, lora_path: Path) -> None:
    """Not a terminal (a pipe, CliRunner): rich would wrap at 80 columns and split module names."""
    code, out, err = run("resize", lora_path, "--rank", "3", "-o", tmp_path / "r.safetensors")
    assert code == 0, err
    lines = out.splitlines()
    for module in load_lora(lora_path).adapters:
        assert sum(module in line for line in lines) == 1, module


def test_rescale_negative_strength(tmp_path: Path, lora_path: Path) -> None:
    code, out, err = run("rescale", lora_path, "--by", "-0.5", "-o", tmp_path / "n.safetensors")
    assert code == 0, err
    assert "alpha+sign" in out
    before, after = load_lora(lora_path), load_lora(tmp_path / "n.safetensors")
    module = next(iter(before.adapters))
    torch.testing.assert_close(after.adapters[module].delta(), -0.5 * before.adapters[module].delta())


def test_blend_weights_and_modes(tmp_path: Path, lora_path: Path) -> None:
    other = save_lora(make_lora(SD1, rank=2, seed=4), tmp_path / "b.safetensors", "kohya")
    code, out, err = run(
        "blend", f"{lora_path}:0.7", f"{other}:-0.3", "-o", tmp_path / "c.safetensors", "--family", "sd1"
    )
    assert code == 0, err
    assert "concat" in out
    code, out, err = run("blend", lora_path, f"{other}:-0.3", "--mode", "svd", "--rank", "4", "--metadata", "fresh",
                         "-o", tmp_path / "s.safetensors", "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["schema"] == "loratools.blend/1" and data["ranks_after"] == {"4": data["module_count"]}
    assert [i["weight"] for i in data["inputs"]] == [1.0, -0.3]


def test_extract_json(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    base = write_checkpoint(spec, tmp_path / "base.safetensors", "single")
    tuned = write_checkpoint(spec, tmp_path / "tuned", "diffusers", seed=1)  # another model entirely
    code, out, err = run("extract", base, tuned, "--rank", "2", "-o", tmp_path / "x.safetensors", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["schema"] == "loratools.extract/1" and data["tuned_layout"] == "diffusers"
    assert data["components"]["unet"]["extracted"] > 0 and data["components"]["te1"]["extracted"] > 0
    code, out, err = run("extract", base, tuned, "--rank", "2", "-o", tmp_path / "y.safetensors", "-q")
    assert code == 0 and "wrote" in out and "│" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resize", "{lora}", "-o", "{out}"], "give a rank rule"),
        (["resize", "{lora}", "--rank", "0", "-o", "{out}"], "≥ 1"),
        (["resize", "{lora}", "--rank", "4", "--sv-fro", "0.9", "-o", "{out}"], "one rank rule"),
        (["resize", "{lora}", "--sv-fro", "1.5", "-o", "{out}"], "(0, 1]"),
        (["resize", "{dora}", "--rank", "2", "-o", "{out}"], "DoRA"),
        (["resize", "{missing}", "--rank", "2", "-o", "{out}"], "no such file"),
        (["rescale", "{lora}", "--by", "0", "-o", "{out}"], "full strength"),
        (["blend", "{lora}", "--rank", "2", "-o", "{out}"], "--mode svd"),
        (["resize", "{lora}", "--rank", "2", "-o", "{lora}", "--overwrite"], "output is an input"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, lora_path: Path, args: list[str], message: str) -> None:
    lora = make_lora(SD1, rank=2, text=False)
    module, a = next(iter(lora.adapters.items()))
    dora = lora.with_adapters(
        {module: LowRank(a.up, a.down, a.alpha, dora_scale=torch.ones(a.up.shape[0]), dora_axis="out")}
    )
    names = {
        "lora": lora_path,
        "out": tmp_path / "o.safetensors",
        "dora": save_lora(dora, tmp_path / "dora.safetensors", "kohya"),
        "missing": tmp_path / "nope.safetensors",
    }
    code, out, err = run(*[a.format(**names) for a in args])
    assert code == 2, (out, err)
    assert message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_demo_resize(tmp_path: Path) -> None:
    """The function the demo calls: writes its files, checks itself against a dense SVD."""
    from io import StringIO

    from rich.console import Console

    from loratools.cli.rank_cmds import demo_resize

    buffer = StringIO()
    report = demo_resize(tmp_path, Console(file=buffer, width=120))
    assert report.rule == "rank 4" and (tmp_path / "sample-lora-fro90.safetensors").exists()
    assert "equal" in buffer.getvalue()
