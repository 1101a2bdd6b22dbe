"""merge/unmerge --dry-run plan from headers alone: torch is never imported (issue 18 item 5).

Checked in a fresh interpreter (``sys.modules`` after the command ran through the real entry
point), as tests/test_cli_imports.py does; and the numpy NaN/inf check of header views against
formats/adapters.py ``is_finite`` on the tensors, dtype by dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratools.formats.adapters import is_finite
from loratools.formats.io import load_lora, save_lora
from loratools.formats.scan import header_lora
from loratools.ops.merge import merge
from loratools.ops.merge_plan import adapter_finite
from loratools.synthetic import TINY, make_lora, write_checkpoint

SCRIPT = """
import json, sys
from loratools.cli.main import cli
try:
    cli(sys.argv[1:], prog_name="loratools")
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""
# without an NVIDIA driver `--device auto` is CPU for certain; with one, only torch can say
GPU_DRIVER = Path("/proc/driver/nvidia/gpus").is_dir()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    spec = TINY["sd1"]
    base = write_checkpoint(spec, root / "sd1.safetensors", "single", dtype=torch.float16)
    folder = write_checkpoint(spec, root / "sd1-diffusers", "diffusers", dtype=torch.float16)
    lora = save_lora(make_lora(spec, rank=4, dtype=torch.float16), root / "k.safetensors", "kohya")
    damaged = make_lora(spec, rank=4, seed=1)
    first = next(iter(damaged.adapters.values()))
    first.up[0, 0] = float("nan")  # type: ignore[union-attr]
    nan = save_lora(damaged, root / "nan.safetensors", "kohya")
    peft = save_lora(make_lora(spec, rank=2, seed=2), root / "p.safetensors", "diffusers")
    return {"base": base, "folder": folder, "lora": Path(lora), "nan": Path(nan), "peft": Path(peft), "root": root}


def _modules(argv: list[str]) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "{base}", "{lora}:0.7", "--dry-run"],
        ["merge", "{base}", "{lora}:w=0.8,lbw=OUTALL", "{peft}:-0.5", "--dry-run", "--json"],
        ["merge", "{folder}", "{lora}:unet=1,te=0.5", "--dry-run", "--dtype", "bf16"],
        ["merge", "{base}", "{nan}", "--skip-nonfinite", "--dry-run"],
        ["unmerge", "{base}", "{lora}:0.7", "--dry-run", "--json"],
    ],
)
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_dry_run_imports_no_torch(files: dict[str, Path], command: list[str], device: str) -> None:
    if device == "auto" and GPU_DRIVER:
        pytest.skip("an NVIDIA driver: whether CUDA works is torch's answer")
    argv = [part.format(**files) for part in command]
    argv += ["-o", str(files["root"] / "out.safetensors"), "--device", device]
    modules = _modules(argv)
    assert "torch" not in modules
    assert not any(m.startswith("torch.") for m in modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1.0])
def test_header_finite_check_matches_tensors(tmp_path: Path, dtype: torch.dtype, value: float) -> None:
    lora = make_lora(TINY["sd1"], rank=2, dtype=dtype)
    module = list(lora.adapters)[3]
    lora.adapters[module].down[1, 0] = value  # type: ignore[union-attr]
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    tensors = load_lora(path, allow_nonfinite=True)
    views = header_lora(path)
    assert views is not None and list(views.adapters) == list(tensors.adapters)
    for name, adapter in tensors.adapters.items():
        assert adapter_finite(views.adapters[name]) == is_finite(adapter), name
    assert adapter_finite(views.adapters[module]) == (value == 1.0)


def test_dry_run_report_is_the_real_runs_plan(files: dict[str, Path], tmp_path: Path) -> None:
    """The header plan and the engine's walk agree on what the output holds and its size."""
    inputs = [f"{files['lora']}:0.7", f"{files['peft']}:w=0.5,lbw=OUTALL"]
    dry = merge(files["base"], inputs, tmp_path / "dry.safetensors", dry_run=True, device="cpu").to_dict()
    real = merge(files["base"], inputs, tmp_path / "out.safetensors", device="cpu").to_dict()
    assert (tmp_path / "out.safetensors").stat().st_size == dry["output_bytes"]
    for key in ("loras", "patched", "tensors", "tensor_bytes", "output_bytes", "dtype_plan", "warnings"):
        assert dry[key] == real[key], key
