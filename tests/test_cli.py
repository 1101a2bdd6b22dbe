"""The command line: thin over the API, one-line errors, no partial outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import REPO, needs_real

from loratools.cli.main import cli
from loratools.io.checkpoint import open_checkpoint
from loratools.synthetic import TINY


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_inspect_text(tiny_checkpoints: dict[tuple[str, str], Path], family: str, layout: str) -> None:
    code, out, err = run("inspect", str(tiny_checkpoints[(family, layout)]))
    assert code == 0, err
    assert TINY[family].title in out
    assert "U-Net" in out and "VAE" in out


def test_inspect_json_schema(tiny_checkpoints: dict[tuple[str, str], Path], family: str, layout: str) -> None:
    code, out, _ = run("inspect", "--json", str(tiny_checkpoints[(family, layout)]))
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "loratools.inspect.checkpoint/1" and data["kind"] == "checkpoint"
    assert data["family"] == family
    assert data["layout"] == (TINY[family].single_layout if layout == "single" else "diffusers")
    assert data["missing_count"] == 0 and data["unknown_count"] == 0
    with open_checkpoint(tiny_checkpoints[(family, layout)]) as ckpt:
        assert data["tensors"] == len(ckpt)
        assert data["parameters"] == sum(ckpt.info(k).numel for k in ckpt)
    names = {c["name"] for c in data["components"]}
    assert {"unet", "te1", "vae"} <= names
    for required in (
        "container",
        "file_format",
        "file_bytes",
        "variant",
        "prediction",
        "architecture",
        "metadata",
        "dtypes",
    ):
        assert required in data


def test_convert_round_trip_cli(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, family: str) -> None:
    single = tiny_checkpoints[(family, "single")]
    code, _, err = run("convert", str(single), str(tmp_path / "d"), "--to", "diffusers")
    assert code == 0, err
    code, _, err = run("convert", str(tmp_path / "d"), str(tmp_path / "s.safetensors"), "--to", "single")
    assert code == 0, err
    with open_checkpoint(single) as a, open_checkpoint(tmp_path / "s.safetensors") as b:
        for key in b:
            assert torch.equal(a.read(key), b.read(key)), key


def test_convert_dtype_and_json(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    code, out, _ = run(
        "convert",
        str(tiny_checkpoints[("sd1", "single")]),
        str(tmp_path / "h.safetensors"),
        "--dtype",
        "fp16",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["tensors_written"] == 1145
    with open_checkpoint(tmp_path / "h.safetensors") as ckpt:
        assert ckpt.info("model.diffusion_model.out.2.weight").dtype == "F16"
        assert ckpt.info("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == "I64"


def test_output_is_never_an_input(tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    path = tiny_checkpoints[("sd1", "single")]
    before = path.read_bytes()
    code, _, err = run("convert", str(path), str(path), "--overwrite")
    assert code != 0 and err.startswith("error:") and path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x00\x00\x00\x00\x00\x10\x00{",
        b"garbage that is not a model",
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}       ',
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    for args in (["inspect", str(bad)], ["convert", str(bad), str(tmp_path / "out.safetensors")]):
        code, _out, err = run(*args)
        assert code != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
        assert not (tmp_path / "out.safetensors").exists()
        assert bad.read_bytes() == content


def test_missing_and_folder_inputs(tmp_path: Path) -> None:
    code, _, err = run("inspect", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "no such file" in err
    code, _, err = run("inspect", str(tmp_path))
    assert code == 2 and "neither a diffusers model nor a peft adapter" in err


def test_hostile_pickle_through_the_cli(tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {sentinel}",)

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload()}, path)
    code, _, err = run("inspect", str(path))
    assert code == 2 and err.startswith("error: model.ckpt: pickle would call") and not sentinel.exists()


def test_mixed_family_is_an_error(tmp_path: Path) -> None:
    from loratools.io.safetensors import save_tensors
    from loratools.synthetic import single_file_plan

    plan = {
        **{k: v for k, v in single_file_plan(TINY["sd2"]).items() if k.startswith("model.")},
        **{k: v for k, v in single_file_plan(TINY["sd1"]).items() if k.startswith("cond_stage_model.")},
    }
    save_tensors(
        tmp_path / "mixed.safetensors", {k: torch.zeros(v.shape, dtype=v.torch_dtype) for k, v in plan.items()}
    )
    code, _, err = run("inspect", str(tmp_path / "mixed.safetensors"))
    assert code == 2 and "mixed model families" in err


_SLOW_CONVERT = """
import sys, time
from loratools.io import safetensors as st
original = st.StreamingWriter.write
calls = []
def slow(self, name, tensor):
    # The first write announces itself and then waits for the test's signal: the signal lands
    # mid-write however slow the machine is (a fixed per-tensor delay raced the poll loop).
    if not calls:
        calls.append(name)
        print("writing", flush=True)
        time.sleep(120)
    original(self, name, tensor)
st.StreamingWriter.write = slow
from loratools.cli.main import main
sys.argv = ["loratools", "convert", sys.argv[1], sys.argv[2], "--dtype", "fp16"]
print("started", flush=True)
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, sig: int
) -> None:
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(tiny_checkpoints[("sdxl", "single")]), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (130, 143), err
    assert err.strip().splitlines() == [
        f"error: {'terminated' if sig == signal.SIGTERM else 'interrupted'}; nothing was written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_demo_runs() -> None:
    code, out, err = run("demo")
    assert code == 0, err
    assert "bit-exact" in out


def test_help_teaches() -> None:
    for command in ("inspect", "convert", "demo"):
        code, out, _ = run(command, "--help")
        assert code == 0 and ("Examples" in out or command == "demo")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    (command,) = re.findall(r"^step tests bash -c '(.+)'$", ci, re.M)  # .ci/run's test step
    assert f"\n{command}\n" in readme
    assert "torch==2.13.0" in command


def test_ruff_clean() -> None:
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "loratools", "tests", "bench", "fixtures"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ruff.returncode == 0, ruff.stdout[-2000:]


def test_lora_through_the_cli(tmp_path: Path) -> None:
    from loratools.classify import classify
    from loratools.families import FAMILIES
    from loratools.formats.io import save_lora
    from loratools.synthetic import make_lora

    kohya = save_lora(make_lora(FAMILIES["sdxl"], rank=1, text=False), tmp_path / "k.safetensors", "kohya")
    assert classify(kohya) == "lora"
    code, out, err = run("convert", str(kohya), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["exact"] and report["modules"] == 722 and report["output_format"] == "diffusers"
    code, out, _ = run("inspect", "--json", str(tmp_path / "d.safetensors"))
    assert code == 0 and json.loads(out)["family"] == "sdxl" and json.loads(out)["modules"] == 722
    # a LoRA whose shapes fit no full-size model (here: a tiny test LoRA) converts by its SD names
    # (issue 13: the family is a report; before, this was refused with "no module of this file fits")
    tiny = save_lora(make_lora(TINY["sd1"]), tmp_path / "tiny.safetensors", "kohya")
    code, _, err = run("convert", str(tiny), str(tmp_path / "t.safetensors"), "--to", "diffusers")
    assert code == 0, err
    code, out, _ = run("inspect", "--json", str(tmp_path / "t.safetensors"))
    assert code == 0 and json.loads(out)["model"]["fit"] == "names"
    code, _, err = run("convert", str(kohya), str(tmp_path / "c.safetensors"), "--to", "single")
    assert code == 2 and "is a LoRA" in err
    assert not (tmp_path / "c.safetensors").exists()


@needs_real("lycoris_lokr")
def test_lora_inspect_json_on_real_files() -> None:
    from helpers import REAL_LORAS

    code, out, err = run("inspect", "--json", str(REAL_LORAS / "lycoris_lokr" / "smart_falcon_16_lokr.safetensors"))
    assert code == 0, err
    data = json.loads(out)
    assert data["schema"] == "loratools.inspect.lora/1" and data["kind"] == "lora"
    assert (data["format"], data["family"], data["modules"]) == ("kohya", "sd1", 350)
    assert data["components"] == {"te1": 72, "unet": 278} and data["kinds"] == {"lokr": 350}
    assert data["metadata_claims"] is None or data["metadata_claims"].startswith("sd1")


def test_python_dash_m_runs_the_cli() -> None:
    """``python -m loratools`` is the ``loratools`` script (it failed: no ``loratools.__main__``)."""
    done = subprocess.run([sys.executable, "-m", "loratools", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Usage: loratools" in done.stdout
