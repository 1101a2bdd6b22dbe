"""The thread policy (loratools/threads.py): limits, env respected, bits independent of threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools import threads
from loratools.cli.main import COMMANDS, cli
from loratools.ops.delta import DeltaEngine, Job, Term
from loratools.ops.extract import extract
from loratools.ops.parallel import map_ordered
from loratools.synthetic import TINY, make_lora, write_checkpoint


@pytest.fixture(autouse=True)
def _reset() -> None:
    yield
    threads.set_threads(None)


def test_threads_option_limits_workers_and_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
    monkeypatch.setattr(threads, "_USER_ENV", {})
    assert threads.module_workers() == 8 and threads.module_workers(3) == 3
    assert threads.gemm_threads() == 8 and threads.gemm_threads(1000) == 1
    threads.set_threads(2)
    assert threads.module_workers() == 2 and threads.gemm_threads() == 2


def test_user_env_is_the_limit_and_busy_cores_cut_gemm_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(threads, "_USER_ENV", {"MKL_NUM_THREADS": "3", "OMP_NUM_THREADS": "junk"})
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 3)
    assert threads.user_limit() == 3 and threads.module_workers() == 3
    assert threads.gemm_threads() == 1  # one core free
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
    assert threads.gemm_threads() == 3


def test_batch_and_census_pool_sizes_are_decided_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "_USER_ENV", {})
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 3)
    assert threads.file_workers(100) == 5 and threads.file_workers(2) == 2  # free cores, ≤ files
    threads.set_threads(2)
    assert threads.file_workers(100) == 2  # --threads caps the worker processes too
    assert threads.io_workers(remote=False) == 4 and threads.io_workers(remote=True) == 16
    assert threads.io_workers(remote=True, limit=3) == 3


def test_prepare_environment_keeps_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_USER_ENV", {"OMP_NUM_THREADS": "4"})
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    threads.prepare_environment()
    import os

    assert os.environ["OMP_NUM_THREADS"] == "4" and os.environ["MKL_NUM_THREADS"] == "1"


def test_free_cores_reads_the_running_count() -> None:
    assert 1 <= threads.free_cores() <= threads.cores()
    assert set(threads.describe()) >= {"cores", "module_workers", "gemm_threads"}


def test_map_ordered_keeps_order_and_bounds_what_is_in_flight() -> None:
    pulled: list[int] = []

    def items():  # type: ignore[no-untyped-def]
        for i in range(20):
            pulled.append(i)
            yield i

    seen = []
    for i, value in enumerate(map_ordered(lambda x: (x, torch.get_num_threads()), items(), workers=2)):
        seen.append(value)
        assert len(pulled) <= i + 3  # at most workers + 1 ahead
    assert [v[0] for v in seen] == list(range(20)) and {v[1] for v in seen} == {1}


def test_every_numeric_command_has_threads_and_loading_is_lazy() -> None:
    for name in ("inspect", "diff", "convert", "merge", "unmerge", "rescale", "resize", "blend", "extract"):
        assert name in cli.commands
        assert any(p.name == "threads" for p in cli.commands[name].params), name
    assert set(COMMANDS) <= set(cli.commands)
    result = CliRunner().invoke(cli, ["resize", "--threads", "0", "x", "-o", "y", "--rank", "1"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_extract_bits_do_not_depend_on_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TINY["sd1"]
    base = write_checkpoint(spec, tmp_path / "base.safetensors", "single")
    tuned = write_checkpoint(spec, tmp_path / "tuned.safetensors", "single", seed=1)
    outs = []
    for count in (1, 2, 3):
        threads.set_threads(count)
        out = tmp_path / f"x{count}.safetensors"
        extract(base, tuned, out, rank=2)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_merge_engine_bits_do_not_depend_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    lora = make_lora(TINY["sdxl"], rank=8, conv=True)
    generator = torch.Generator().manual_seed(0)
    jobs = {
        name: Job(torch.randn(a.delta_shape(), generator=generator).half(), [Term(a, 0.7)])
        for name, a in list(lora.adapters.items())[:40]
    }
    results = []
    for count in (1, 2):
        monkeypatch.setattr(threads, "gemm_threads", lambda flops=None, c=count: c)
        results.append(DeltaEngine("cpu").patch(jobs))
    for name in jobs:
        assert torch.equal(results[0][name], results[1][name])


def test_gpu_script_skips_cleanly_without_cuda() -> None:
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_all.sh would run the real benchmark")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(repo / "bench" / "gpu_all.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "skipped" in done.stdout


# Run with no thread variables set, as an API caller's process starts. The oracle finds numpy's
# OpenBLAS on its own (the wheel's numpy.libs folder, not /proc/self/maps) and asks it directly.
BLAS_PROBE = """
import ctypes, glob, os, sys
import numpy
libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs", "*openblas*.so*"))
if not libs:
    print("no-openblas"); sys.exit(0)
lib = ctypes.CDLL(libs[0])
get = next(getattr(lib, n) for n in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                                     "openblas_get_num_threads") if hasattr(lib, n))
from loratools.threads import numpy_blas_threads
start = get()
with numpy_blas_threads(1):
    inside = get()
    numpy.ones((300, 300)) @ numpy.ones((300, 300))
print(start, inside, get())
"""


def test_numpy_blas_threads_sets_openblas_without_env_vars() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in threads.ENV_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", BLAS_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "no-openblas":
        pytest.skip("this numpy does not bundle OpenBLAS (an MKL or Accelerate build)")
    start, inside, after = (int(x) for x in done.stdout.split())
    if start < 2:
        pytest.skip("OpenBLAS started with one thread: nothing to lower")
    assert inside == 1 and after == start
