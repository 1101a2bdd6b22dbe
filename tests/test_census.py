"""census: rows from headers only, for a local folder and through a loopback fake Hub."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers_scale import FakeHub, fake_hub, local_sockets

from loratools.census import read_rows, run_census
from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.formats.io import save_lora
from loratools.synthetic import make_lora

__all__ = ["fake_hub", "local_sockets"]
SD1 = FAMILIES["sd1"]
FACTS = ("format", "family", "metadata_claims", "family_mismatch", "modules", "components", "kinds", "ranks",
         "parameters", "dtypes")  # fmt: skip


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two kohya LoRAs (one with varied alphas and a trigger phrase), a truncated one, an LFS
    pointer and a pickle."""
    root = tmp_path_factory.mktemp("census-src")
    a = make_lora(SD1, rank=4, alphas="varied", seed=1)
    a.metadata.update({"ss_sd_model_name": "v1-5-pruned.safetensors", "modelspec.trigger_phrase": "sks, style",
                       "sshs_model_hash": "abc123"})  # fmt: skip
    save_lora(a, root / "a.safetensors", "kohya")
    save_lora(make_lora(SD1, rank=2, seed=2), root / "b.safetensors", "kohya")
    data = {p.name: p.read_bytes() for p in root.iterdir()}
    data["broken.safetensors"] = data["a.safetensors"][: len(data["a.safetensors"]) // 2]
    data["pointer.safetensors"] = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n"
    data["evil.pt"] = pickle.dumps({"x": 1})
    return data


def inspect_json(path: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a census opened a pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    import torch

    monkeypatch.setattr(torch, "load", refuse)


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(r["path"]).name: r for r in rows}


def test_local_folder_rows_equal_inspect(
    tmp_path: Path, loras: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "loras"
    (folder / "deep").mkdir(parents=True)
    for name, data in loras.items():
        (folder / ("deep" if name == "b.safetensors" else "") / name).write_bytes(data)
    (folder / "readme.txt").write_text("not a LoRA")
    never_unpickle(monkeypatch)
    summary = run_census([str(folder)], str(tmp_path / "facts.jsonl"))
    rows = by_name(read_rows(tmp_path / "facts.jsonl"))
    assert set(rows) == {"a.safetensors", "b.safetensors", "broken.safetensors", "pointer.safetensors", "evil.pt"}
    expected = inspect_json(folder / "a.safetensors")
    a = rows["a.safetensors"]
    assert {k: a[k] for k in FACTS} == {k: expected[k] for k in FACTS}
    assert a["alphas"] == expected["alphas"] and a["alphas_read"] and a["read"] == "header"
    assert a["ss_sd_model_name"] == a["base_model"] == "v1-5-pruned.safetensors"
    assert a["trigger_words"] == ["sks", "style"]
    hashes = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
    assert a["stored_hashes"] == {k: v for k, v in expected["metadata"].items() if k in hashes}
    assert a["size"] == len(loras["a.safetensors"]) and a["problems"] == [] and a["error"] is None
    assert rows["broken.safetensors"]["problems"][0].startswith("truncated:")
    assert rows["pointer.safetensors"]["problems"][0].startswith("lfs-pointer:")
    assert rows["evil.pt"]["kind"] == "pickle" and rows["evil.pt"]["problems"][0].startswith("pickle:")
    assert summary.files == 5 and summary.broken == 3
    assert summary.families_formats["sd1"] == {"kohya": 2}
    assert dict(summary.problems) == {"truncated": 1, "lfs-pointer": 1, "pickle": 1}


def _hub(hub: FakeHub, loras: dict[str, bytes]) -> None:
    hub.add("alice/style", "a.safetensors", loras["a.safetensors"])
    hub.add("alice/style", "v2/b.safetensors", loras["b.safetensors"])
    hub.add("alice/style", "README.md", b"# not a weight")
    hub.add("alice/broken", "broken.safetensors", loras["broken.safetensors"])
    hub.add("alice/broken", "evil.pt", loras["evil.pt"])
    hub.add("alice/broken", "gone.safetensors", loras["b.safetensors"])
    hub.add("bob/other", "b.safetensors", loras["b.safetensors"])
    hub.repos["bob/other"].tags = ["checkpoint"]


def test_fake_hub_rows_resume_and_bytes(
    tmp_path: Path, loras: dict[str, bytes], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hub(fake_hub, loras)
    never_unpickle(monkeypatch)
    served_files = fake_hub.repos["alice/broken"].files
    original_read = served_files["gone.safetensors"].read

    def vanish(start: int, end: int) -> bytes:  # listed, then deleted before its header is read
        served_files.pop("gone.safetensors", None)
        return original_read(start, end)

    served_files["gone.safetensors"].read = vanish  # type: ignore[method-assign]
    out = tmp_path / "facts.jsonl"
    seen: list[str] = []

    def interrupt(row: dict[str, Any]) -> None:
        seen.append(row["key"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_census(["hf://alice/style"], str(out), jobs=1, progress=interrupt)
    assert len(read_rows(out)) == 1
    served_before = fake_hub.bytes_served
    summary = run_census(["hf://alice"], str(out), jobs=2, alphas=True)
    rows = read_rows(out)
    assert len(rows) == len({r["key"] for r in rows}) == 5 and summary.resumed == 1 and summary.new == 4
    named = {f"{r['repo']}/{r['path']}": r for r in rows}
    a = named["alice/style/a.safetensors"]
    assert a["revision"] == fake_hub.repos["alice/style"].sha and a["key"].startswith("alice/style@")
    assert a["lfs_sha256"] is not None
    expected = inspect_json_bytes(tmp_path, loras["a.safetensors"])
    assert {k: a[k] for k in FACTS} == {k: expected[k] for k in FACTS}
    b = named["alice/style/v2/b.safetensors"]
    assert b["modules"] == inspect_json_bytes(tmp_path, loras["b.safetensors"])["modules"]
    assert named["alice/broken/evil.pt"]["kind"] == "pickle" and named["alice/broken/evil.pt"]["requests"] == 0
    assert named["alice/broken/broken.safetensors"]["problems"][0].startswith("truncated")
    assert (
        "EntryNotFound" in (named["alice/broken/gone.safetensors"]["error"] or "")
        or named["alice/broken/gone.safetensors"]["problems"]
    )
    # every byte the hub served is on some row, and headers only: far less than the files
    # (the interrupted run's bytes include a file in flight whose row was never written)
    assert sum(r["bytes_read"] for r in rows if r["key"] != seen[0]) == fake_hub.bytes_served - served_before > 0
    total = sum(r["size"] or 0 for r in rows)
    assert fake_hub.bytes_served < total


def inspect_json_bytes(tmp_path: Path, data: bytes) -> dict[str, Any]:
    path = tmp_path / f"copy-{len(data)}.safetensors"
    path.write_bytes(data)
    return inspect_json(path)


def test_alphas_off_by_default_and_search(tmp_path: Path, loras: dict[str, bytes], fake_hub: FakeHub) -> None:
    _hub(fake_hub, loras)
    out = tmp_path / "facts.jsonl"
    run_census(["hf://?filter=lora&search=style"], str(out))
    (row,) = [r for r in read_rows(out) if r["path"] == "a.safetensors"]
    assert row["alphas"] is None and row["alphas_read"] is False and row["requests"] <= 2
    assert row["modules"] == inspect_json_bytes(tmp_path, loras["a.safetensors"])["modules"]
    assert {r["repo"] for r in read_rows(out)} == {"alice/style"}


def test_cli_parquet(tmp_path: Path, loras: dict[str, bytes], fake_hub: FakeHub) -> None:
    pytest.importorskip("pyarrow")
    _hub(fake_hub, loras)
    out = tmp_path / "facts.parquet"
    result = CliRunner().invoke(cli, ["census", "hf://alice/style", "hf://bob/other", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["schema"] == "loratools.census.summary/1" and summary["files"] == 3
    assert summary["families_formats"] == {"sd1": {"kohya": 3}}
    rows = read_rows(out)
    assert {r["path"] for r in rows} == {"a.safetensors", "v2/b.safetensors", "b.safetensors"}
    assert all(isinstance(r["components"], dict) for r in rows)
    assert not list(tmp_path.glob(".*journal*"))
    result = CliRunner().invoke(cli, ["census", "hf://alice/style", "-o", str(out), "--json"])
    assert json.loads(result.stdout)["new"] == 0
