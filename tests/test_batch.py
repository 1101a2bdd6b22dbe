"""Batch mode: many files, folders and globs through every file-in/file-out LoRA command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_scale import local_sockets

from loratools.batch import EXIT_SOME_FAILED, Task, plan_tasks, run_tasks
from loratools.batch.complete import is_complete
from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats.io import save_lora
from loratools.synthetic import make_lora

SD1 = FAMILIES["sd1"]
pytestmark = pytest.mark.usefixtures("local_sockets")  # worker pools talk over Unix sockets
__all__ = ["local_sockets"]


def run(*args: object, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good LoRAs (one in a subfolder), a truncated one, a foreign pickle, a text file."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    save_lora(make_lora(SD1, rank=4, alphas="varied", seed=1), root / "a.safetensors", "kohya")
    save_lora(make_lora(SD1, rank=2, seed=2), root / "sub" / "b.safetensors", "kohya")
    (root / "broken.safetensors").write_bytes((root / "a.safetensors").read_bytes()[:4000])
    (root / "foreign.bin").write_bytes(b"\x00" * 64)
    (root / "notes.txt").write_text("not a weight file")
    return root


def by_name(records: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {Path(str(r["file"])).name: r for r in records}


def test_folder_mixed_outcomes_and_outputs_equal_single_command(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run("resize", corpus, "-r", "--rank", "2", "-o", f"{out}/", "-j", "2", "--json")
    assert code == EXIT_SOME_FAILED, err
    rows = by_name(json.loads(stdout))
    assert set(rows) == {"a.safetensors", "b.safetensors", "broken.safetensors", "foreign.bin"}  # not notes.txt
    assert {n: r["status"] for n, r in rows.items()} == {
        "a.safetensors": "ok", "b.safetensors": "ok", "broken.safetensors": "failed", "foreign.bin": "failed",
    }  # fmt: skip
    assert "truncated" in str(rows["broken.safetensors"]["error"]) and rows["broken.safetensors"]["exit_code"] == 2
    assert "pickle" in str(rows["foreign.bin"]["error"])
    assert all(r["schema"] == "loratools.batch.result/1" for r in rows.values())
    assert (out / "sub" / "b.safetensors").is_file()  # subfolders kept
    assert rows["a.safetensors"]["output_bytes"] == (out / "a.safetensors").stat().st_size
    code, _, err = run("resize", corpus / "a.safetensors", "--rank", "2", "-o", tmp_path / "single.safetensors")
    assert code == 0, err
    assert (out / "a.safetensors").read_bytes() == (tmp_path / "single.safetensors").read_bytes()
    assert not list(out.rglob(".*partial"))


def test_rerun_skips_complete_and_overwrite_redoes(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    args = ("rescale", corpus / "a.safetensors", corpus / "sub" / "b.safetensors", "--by", "0.5", "-o", out)
    out.mkdir()
    assert run(*args, "-j", "1")[0] == 0
    first = (out / "a.safetensors").stat().st_mtime_ns
    code, stdout, _ = run(*args, "--json")
    assert code == 0 and {r["status"] for r in json.loads(stdout)} == {"skipped"}
    assert (out / "a.safetensors").stat().st_mtime_ns == first
    (out / "b.safetensors").write_bytes(b"not complete")  # someone else's file: never replaced silently
    code, stdout, _ = run(*args, "--json")
    rows = by_name(json.loads(stdout))
    assert code == EXIT_SOME_FAILED and rows["b.safetensors"]["exit_code"] == 3
    code, stdout, _ = run(*args, "--json", "--overwrite")
    assert code == 0 and {r["status"] for r in json.loads(stdout)} == {"ok"}
    assert is_complete(out / "b.safetensors")


def test_name_template_glob_and_table(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "o"
    code, stdout, err = run("batch", "convert", f"{corpus}/*.safetensors", "-o", out, "--to", "diffusers",
                            "--name", "{stem}-diffusers{suffix}")  # fmt: skip
    assert code == EXIT_SOME_FAILED, err
    assert (out / "a-diffusers.safetensors").is_file() and not (out / "broken-diffusers.safetensors").exists()
    assert "1 ok, 1 failed of 2 files" in stdout and "broken.safetensors" in stdout


def test_blend_with_one_partner(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "o"
    partner = f"{corpus / 'sub' / 'b.safetensors'}:0.5"
    code, _, err = run("blend", corpus / "a.safetensors", "--with", partner, "-o", f"{out}/", "--json")
    assert code == 0, err
    code, _, err = run("blend", corpus / "a.safetensors", partner, "-o", tmp_path / "one.safetensors")
    assert code == 0, err
    assert (out / "a.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()


def test_inspect_batch_json(corpus: Path) -> None:
    code, stdout, _ = run("batch", "inspect", corpus, "-j", "1", "--json")
    rows = by_name(json.loads(stdout))
    assert code == EXIT_SOME_FAILED and rows["a.safetensors"]["status"] == "ok"
    report = rows["a.safetensors"]["report"]
    assert isinstance(report, dict) and report["family"] == "sd1" and report["modules"] > 0


def test_plan_refuses_collisions_and_self_output(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="both be written"):
        plan_tasks("resize", [str(corpus / "a.safetensors"), str(tmp_path / "x" / "a.safetensors")], str(tmp_path))
    with pytest.raises(InputError, match="own input"):
        plan_tasks("resize", [str(corpus / "a.safetensors")], str(corpus))
    with pytest.raises(InputError, match="no such"):
        plan_tasks("resize", [str(tmp_path / "missing")], str(tmp_path))


def test_a_killed_worker_costs_nothing(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file's first attempt kills its worker process after leaving a half-written temporary:
    the pool is rebuilt, every file is retried, every output exists exactly once, no leftovers."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("LORATOOLS_BATCH_KILL_ONCE", str(marks))
    out = tmp_path / "out"
    tasks = plan_tasks("rescale", [str(corpus / "a.safetensors"), str(corpus / "sub")], str(out),
                       options={"by": 2.0})  # fmt: skip
    results = run_tasks(tasks, jobs=2)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert len(list(marks.iterdir())) == 2


def test_worker_uses_one_thread(tmp_path: Path, corpus: Path) -> None:
    from loratools.batch import default_jobs

    assert 1 <= default_jobs(100) <= len(os.sched_getaffinity(0))
    assert default_jobs(1) == 1
    task = Task("inspect", str(corpus / "a.safetensors"), None)
    (result,) = run_tasks([task])
    assert result.status == "ok" and result.output is None


def test_check_batch_is_one_registration(corpus: Path) -> None:
    code, stdout, _ = run("check", corpus, "--for", "comfyui", "-j", "1", "--json")
    rows = by_name(json.loads(stdout))
    assert (
        code == EXIT_SOME_FAILED and rows["a.safetensors"]["status"] == "ok" and rows["a.safetensors"]["output"] is None
    )
    assert rows["a.safetensors"]["report"]["schema"].startswith("loratools.check")
    assert rows["broken.safetensors"]["status"] == "failed"
