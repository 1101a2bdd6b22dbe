"""--engine ray: the same per-file work as Ray tasks (a local Ray with 2 CPUs); skipped without Ray."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_scale import local_sockets

from loratools.batch import plan_tasks, run_tasks
from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.formats.io import save_lora
from loratools.synthetic import make_lora

ray = pytest.importorskip("ray")
__all__ = ["local_sockets"]
pytestmark = pytest.mark.usefixtures("local_sockets")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-corpus")
    for i in range(3):
        save_lora(make_lora(FAMILIES["sd1"], rank=4, seed=i), root / f"l{i}.safetensors", "kohya")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return root


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray for the module; each task's first attempt on a file kills its worker when
    the marker folder (the fixture's value) is armed by a test."""
    import socket

    marks = tmp_path_factory.mktemp("kill-marks")
    saved = socket.socket.connect, socket.create_connection
    from helpers_scale import _connect, _create_connection

    socket.socket.connect, socket.create_connection = _connect, _create_connection  # type: ignore[method-assign]
    env = {"LORATOOLS_BATCH_KILL_ONCE": str(marks / "armed")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        yield marks
    finally:
        ray.shutdown()
        socket.socket.connect, socket.create_connection = saved  # type: ignore[method-assign]


def test_ray_equals_serial(tmp_path: Path, corpus: Path, local_ray: Path) -> None:
    args = ["batch", "resize", str(corpus), "--rank", "2", "-o", str(tmp_path / "ray"), "--engine", "ray"]
    code = CliRunner().invoke(cli, args).exit_code
    serial = run_tasks(plan_tasks("resize", [str(corpus)], str(tmp_path / "serial"), options={"rank": 2}))
    assert [r.status for r in serial] == ["failed", "ok", "ok", "ok"]
    assert code == 4
    for name in ("l0", "l1", "l2"):
        assert (tmp_path / "ray" / f"{name}.safetensors").read_bytes() == (
            tmp_path / "serial" / f"{name}.safetensors"
        ).read_bytes()


def test_ray_json_matches_serial_records(tmp_path: Path, corpus: Path, local_ray: Path) -> None:
    result = CliRunner().invoke(cli, ["rescale", str(corpus), "--by", "0.5", "-o", str(tmp_path / "o"),
                                      "--engine", "ray", "--json"])  # fmt: skip
    rows = json.loads(result.stdout)
    serial = run_tasks(plan_tasks("rescale", [str(corpus)], str(tmp_path / "s"), options={"by": 0.5}))
    assert [(Path(r["file"]).name, r["status"], r["error"]) for r in rows] == [
        (Path(r.file).name, r.status, r.error) for r in serial
    ]


def test_killed_worker_every_output_exactly_once(tmp_path: Path, corpus: Path, local_ray: Path) -> None:
    """Every file's first attempt leaves a half-written temporary and SIGKILLs its Ray worker;
    Ray retries the task, and every output exists exactly once with no leftovers."""
    armed = local_ray / "armed"
    armed.mkdir()
    try:
        out = tmp_path / "out"
        tasks = plan_tasks("rescale", [str(corpus / f"l{i}.safetensors") for i in range(3)], str(out),
                           options={"by": 2.0})  # fmt: skip
        results = run_tasks(tasks, engine="ray")
        assert [r.status for r in results] == ["ok"] * 3, [r.error for r in results]
        assert sorted(p.name for p in out.iterdir()) == [f"l{i}.safetensors" for i in range(3)]
        assert len(list(armed.iterdir())) == 3  # every file's worker was killed once
        serial = run_tasks(plan_tasks("rescale", [str(corpus / "l0.safetensors")], str(tmp_path / "s"),
                                      options={"by": 2.0}))  # fmt: skip
        assert serial[0].status == "ok"
        assert (out / "l0.safetensors").read_bytes() == (tmp_path / "s" / "l0.safetensors").read_bytes()
    finally:
        for mark in armed.iterdir():
            mark.unlink()
        armed.rmdir()
