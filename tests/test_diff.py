"""diff: LoRAs by canonical module (factor-space ΔW differences), checkpoints by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.formats.adapters import LoHa, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.report.diff import delta_difference, diff
from loratools.report.schema import DIFF
from loratools.synthetic import TINY, make_lora, write_checkpoint


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _dense(adapter: object) -> torch.Tensor:
    return adapter.delta().to(torch.float64).reshape(-1)  # type: ignore[attr-defined]


def test_delta_difference_matches_dense() -> None:
    g = torch.Generator().manual_seed(1)
    a = LowRank(torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g), 2.0)
    b = LowRank(torch.randn(40, 8, generator=g), torch.randn(8, 30, generator=g), 8.0)
    c = LoHa(*(torch.randn(*s, generator=g) for s in ((40, 2), (2, 30), (40, 2), (2, 30))), alpha=1.0)
    for x, y in ((a, b), (a, c), (b, c), (a, a)):
        diff_norm, norm_x, norm_y = delta_difference(x, y)
        assert diff_norm == pytest.approx(float(torch.linalg.vector_norm(_dense(x) - _dense(y))), rel=1e-6, abs=1e-9)
        assert norm_x == pytest.approx(float(torch.linalg.vector_norm(_dense(x))), rel=1e-6)
        assert norm_y == pytest.approx(float(torch.linalg.vector_norm(_dense(y))), rel=1e-6)
    assert delta_difference(a, a)[0] < 1e-9 * delta_difference(a, a)[1]  # no cancellation noise


def test_lora_diff(tmp_path: Path) -> None:
    spec = FAMILIES["sd1"]
    a = make_lora(spec, rank=4, alphas="varied")
    b = make_lora(spec, rank=4, alphas="varied")
    names = list(b.adapters)
    changed = names[3]
    b.adapters[changed] = LowRank(b.adapters[changed].up * 1.5, b.adapters[changed].down, b.adapters[changed].alpha)
    b.adapters[names[4]] = LowRank(b.adapters[names[4]].up, b.adapters[names[4]].down, 99.0)
    dropped = names[5]
    del b.adapters[dropped]
    pa = save_lora(a, tmp_path / "a.safetensors", "kohya")
    pb = save_lora(b, tmp_path / "b.safetensors", "diffusers")  # another dialect: compared by canonical name
    report = diff(pa, pb)
    data = json.loads(json.dumps(report.to_dict()))
    jsonschema.validate(data, DIFF)
    assert report.only_a == [dropped] and report.only_b == []
    assert {(c["name"], c["field"]) for c in report.changed_facts} == {(names[4], "alpha")}
    by_name = {e.name: e for e in report.entries}
    la, lb = load_lora(pa), load_lora(pb)
    expected = float(torch.linalg.vector_norm(_dense(la.adapters[changed]) - _dense(lb.adapters[changed])))
    assert by_name[changed].status == "changed" and by_name[changed].diff_norm == pytest.approx(expected, rel=1e-5)
    assert by_name[dropped].status == "only_a"
    assert report.identical == len(a.adapters) - 3 and report.differing == 3
    code, out, err = run("diff", str(pa), str(pb))
    assert code == 0, err
    assert "only in A: 1" in out and "identical" in out and "alpha" in out


def test_checkpoint_diff_same_and_across_layouts(tmp_path: Path, tiny_checkpoints: dict) -> None:
    single, folder = tiny_checkpoints[("sd1", "single")], tiny_checkpoints[("sd1", "diffusers")]
    report = diff(single, folder)  # same model (seed 0) in two layouts
    jsonschema.validate(json.loads(json.dumps(report.to_dict())), DIFF)
    assert report.total_diff_norm == 0 and all(e.status == "same" for e in report.entries)
    assert any("canonical" in n for n in report.notes)
    other = write_checkpoint(TINY["sd1"], tmp_path / "seed1.safetensors", "single", seed=1)
    report = diff(single, other)
    assert report.total_diff_norm and report.total_diff_norm > 0 and report.only_a == report.only_b == []
    entry = next(e for e in report.entries if e.status == "changed")
    from loratools.io.checkpoint import open_checkpoint

    with open_checkpoint(single) as x, open_checkpoint(other) as y:
        expected = float(torch.linalg.vector_norm(x.read(entry.name).double() - y.read(entry.name).double()))
    assert entry.diff_norm == pytest.approx(expected, rel=1e-9)
    code, out, err = run("diff", "--json", str(single), str(other))
    assert code == 0, err and json.loads(out)["kind"] == "checkpoint"


def test_diff_refuses_lora_against_checkpoint(tmp_path: Path, tiny_checkpoints: dict) -> None:
    lora = save_lora(make_lora(FAMILIES["sd1"], rank=1, text=False), tmp_path / "l.safetensors", "kohya")
    code, _, err = run("diff", str(lora), str(tiny_checkpoints[("sd1", "single")]))
    assert code == 2 and err.startswith("error: A is a lora, B is a checkpoint")
    code, _, err = run("diff", str(lora), str(tmp_path / "missing.safetensors"))
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
