"""hf:// inputs, offline, against a Hugging Face cache folder laid out the way huggingface_hub keeps it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import REAL_LORAS, REPO, require_real

from loratools.classify import classify
from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats.io import load_lora, save_lora
from loratools.io.checkpoint import open_checkpoint
from loratools.io.hub import HubRef, parse, resolve
from loratools.synthetic import make_lora

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``models--alice--sd-loras`` with two revisions (main and an older commit) and a model folder."""
    import huggingface_hub.constants

    require_real("lycoris_lokr")
    cache = tmp_path / "hub"
    repo = cache / "models--alice--sd-loras"
    main = repo / "snapshots" / SHA
    (main / "loras").mkdir(parents=True)
    shutil.copy(REAL_LORAS / "lycoris_lokr" / "smart_falcon_4_lokr.safetensors", main / "loras" / "falcon.safetensors")
    save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False), main / "loras" / "mine.safetensors", "kohya")
    save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False), main / "adapter", "peft")
    shutil.copytree(tiny_checkpoints[("sd1", "diffusers")], main / "model")
    old = repo / "snapshots" / OLD / "loras"
    old.mkdir(parents=True)
    shutil.copy(REAL_LORAS / "lycoris_lokr" / "smart_falcon_8_lokr.safetensors", old / "falcon.safetensors")
    save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False, seed=1), old / "mine.safetensors", "kohya")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_parse() -> None:
    assert parse("hf://alice/sd-loras/loras/x.safetensors") == HubRef("alice/sd-loras", "loras/x.safetensors", None)
    assert parse("hf://alice/sd-loras/x.safetensors@v1.0").revision == "v1.0"
    assert parse("hf://alice/sd-loras@abc/x.safetensors") == HubRef("alice/sd-loras", "x.safetensors", "abc")
    assert parse("hf://alice/sd-loras") == HubRef("alice/sd-loras", "", None)
    assert parse("hf://datasets/bob/data/a.safetensors").repo_type == "dataset"
    for bad in ("hf://alice", "hf://", "hf://alice/repo/x.safetensors@"):
        with pytest.raises(InputError, match="expected hf://owner/repo"):
            parse(bad)
    assert resolve("local/file.safetensors") == Path("local/file.safetensors")  # local paths pass through


def test_every_entry_point_resolves(hub_cache: Path) -> None:
    ref = "hf://alice/sd-loras/loras/falcon.safetensors"
    assert resolve(ref).read_bytes() == (REAL_LORAS / "lycoris_lokr" / "smart_falcon_4_lokr.safetensors").read_bytes()
    assert classify(ref) == "lora"
    assert len(load_lora(ref).adapters) == 350
    assert len(load_lora(f"hf://alice/sd-loras/loras/falcon.safetensors@{OLD}").adapters) == 350
    assert resolve(f"hf://alice/sd-loras/loras/falcon.safetensors@{OLD}").parent.parent.name == OLD
    assert load_lora("hf://alice/sd-loras/adapter").source_format == "peft"
    with open_checkpoint("hf://alice/sd-loras/model") as ckpt:
        assert ckpt.container == "diffusers" and len(ckpt) > 100


def test_cli_inspect_and_diff(hub_cache: Path) -> None:
    ref = "hf://alice/sd-loras/loras/falcon.safetensors"
    result = CliRunner().invoke(cli, ["inspect", "--json", ref])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == ref and (data["family"], data["modules"]) == ("sd1", 350)
    result = CliRunner().invoke(cli, ["inspect", "--json", "hf://alice/sd-loras/model"])
    assert result.exit_code == 0 and json.loads(result.stdout)["container"] == "diffusers"
    result = CliRunner().invoke(cli, ["inspect", "hf://alice/sd-loras/loras"])  # a folder of files
    assert result.exit_code == 0 and "falcon.safetensors" in result.stdout and "mine.safetensors" in result.stdout
    mine = "hf://alice/sd-loras/loras/mine.safetensors"
    result = CliRunner().invoke(cli, ["diff", "--json", mine, f"{mine}@{OLD}"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["a"]["path"] == mine and report["b"]["path"] == f"{mine}@{OLD}"
    assert report["identical"] == 0 and report["differing"] == report["a"]["modules"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("hf://alice/nope/x.safetensors", "not in the local Hugging Face cache"),
        ("hf://alice/sd-loras/loras/missing.safetensors", "not in the local Hugging Face cache"),
        ("hf://alice/sd-loras/loras/falcon.safetensors@v9", "not in the local Hugging Face cache"),
        ("hf://alice/sd-loras/nothing-here", "no folder 'nothing-here'"),
        ("hf://alice", "expected hf://owner/repo"),
    ],
)
def test_errors_are_one_line(hub_cache: Path, ref: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["inspect", ref])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_process_offline_with_env(hub_cache: Path) -> None:
    """The real command line, huggingface_hub configured by environment only (HF_HUB_CACHE, offline)."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", "inspect", "--json", "hf://alice/sd-loras/loras/mine.safetensors"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules"] == len(make_lora(FAMILIES["sd1"], rank=2, text=False).adapters)


def test_convert_reads_hub_inputs(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "single.safetensors"
    result = CliRunner().invoke(cli, ["convert", "hf://alice/sd-loras/model", str(out), "--to", "single"])
    assert result.exit_code == 0, result.stderr
    with open_checkpoint(out) as ckpt:
        assert ckpt.container == "single_file"
    result = CliRunner().invoke(
        cli,
        ["convert", "hf://alice/sd-loras/loras/mine.safetensors", str(tmp_path / "d.safetensors"), "--to", "diffusers"],
    )
    assert result.exit_code == 0, result.stderr


def test_merge_reads_a_hub_base(hub_cache: Path, tmp_path: Path) -> None:
    """Regression: merge built ``Path("hf://…")`` (folding it to ``hf:/…``) before resolving it."""
    from loratools.synthetic import TINY

    lora = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "tiny.safetensors", "kohya")
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", "hf://alice/sd-loras/model", f"{lora}:0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open_checkpoint(out) as ckpt:
        assert ckpt.container == "diffusers"
