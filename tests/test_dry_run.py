"""--dry-run on every writing command: the exact output size, nothing at OUTPUT; convert --to-lora guard rails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.dryrun import tree_bytes
from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats.adapters import LoKr, LoraFile
from loratools.formats.io import save_lora
from loratools.ops.convert import convert_lora
from loratools.synthetic import TINY, make_lora, write_checkpoint

SD1 = FAMILIES["sd1"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small full-width SD1 LoRAs (rank 1, U-Net only, fp16) and a LoKr of rank-1 halves."""
    root = tmp_path_factory.mktemp("dry")
    a = save_lora(make_lora(SD1, rank=2, text=False, dtype=torch.float16), root / "a.safetensors", "kohya")
    b = save_lora(make_lora(SD1, rank=1, text=False, seed=1, dtype=torch.float16), root / "b.safetensors", "kohya")
    gen = torch.Generator().manual_seed(2)
    adapters = {}
    for module, lowrank in list(make_lora(SD1, rank=1, text=False).adapters.items())[:12]:
        out, inp = lowrank.up.shape[0], lowrank.down.shape[1]  # type: ignore[union-attr]
        if lowrank.down.dim() == 2:  # type: ignore[union-attr]
            w1 = torch.randn(4, 4, generator=gen)
            adapters[module] = LoKr(1.0, w1=w1, w2a=torch.randn(out // 4, 1, generator=gen),
                                    w2b=torch.randn(1, inp // 4, generator=gen))  # fmt: skip
    lokr = save_lora(LoraFile(adapters, SD1, "synthetic"), root / "lokr.safetensors", "kohya")
    tuned = write_checkpoint(TINY["sd1"], root / "tuned.safetensors", "single", seed=1)
    return {"a": Path(a), "b": Path(b), "lokr": Path(lokr), "tuned": Path(tuned)}


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.stderr or result.output
    return result.output


def _commands(loras: dict[str, Path], tiny: dict, out: Path) -> dict[str, list[str]]:
    a, b = str(loras["a"]), str(loras["b"])
    return {
        "convert-lora": ["convert", a, str(out / "c.safetensors"), "--to", "diffusers"],
        "convert-peft": ["convert", a, str(out / "peft"), "--to", "peft"],
        "convert-to-lora": ["convert", str(loras["lokr"]), str(out / "l.safetensors"), "--to-lora", "--rank", "2"],
        "convert-checkpoint": ["convert", str(tiny[("sd1", "single")]), str(out / "ckpt"), "--to", "diffusers"],
        "rescale": ["rescale", a, "--by", "-0.5", "-o", str(out / "r.safetensors")],
        "resize": ["resize", a, "--rank", "1", "-o", str(out / "s.safetensors")],
        "blend": ["blend", f"{a}:0.7", b, "-o", str(out / "b.safetensors")],
        "extract": [
            "extract",
            str(tiny[("sd1", "single")]),
            str(loras["tuned"]),
            "--rank",
            "2",
            "-o",
            str(out / "e.safetensors"),
        ],
    }


@pytest.mark.parametrize(
    "name",
    ["convert-lora", "convert-peft", "convert-to-lora", "convert-checkpoint", "rescale", "resize", "blend", "extract"],
)
def test_dry_run_size_is_the_real_size(name: str, loras: dict, tiny_checkpoints: dict, tmp_path: Path) -> None:
    args = _commands(loras, tiny_checkpoints, tmp_path)[name]
    output = Path(args[args.index("-o") + 1] if "-o" in args else args[2])
    dry = json.loads(_run(*args, "--dry-run", "--json"))
    assert not output.exists(), "a dry run wrote its output"
    assert dry["dry_run"] is True and dry["output_bytes"] > 0
    text = _run(*args, "--dry-run")
    assert "nothing written" in text and f"({dry['output_bytes']} bytes)" in text and not output.exists()
    _run(*args)
    extra = output.with_name(f"{output.name.split('.')[0]}.embeddings.safetensors")
    assert tree_bytes(output) + tree_bytes(extra) == dry["output_bytes"]


def test_dry_run_refuses_what_the_real_run_refuses(loras: dict, tmp_path: Path) -> None:
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["rescale", str(loras["a"]), "--by", "2", "-o", str(taken), "--dry-run"])
    assert result.exit_code != 0 and "exists" in result.stderr and taken.read_bytes() == b"x"
    result = CliRunner().invoke(cli, ["resize", str(loras["a"]), "--rank", "1", "-o", str(loras["a"]), "--dry-run"])
    assert result.exit_code != 0 and "input" in result.stderr


def test_to_lora_guard_rails(loras: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="two rules for one choice"):
        convert_lora(loras["lokr"], tmp_path / "x.safetensors", "kohya", to_lora=True, rank=4, error=0.1)
    heard: list[str] = []
    report = convert_lora(loras["lokr"], tmp_path / "y.safetensors", "kohya", to_lora=True, error=0.0,
                          max_rank=2, notify=heard.append)  # fmt: skip
    assert report.capped == report.refactorized > 0  # kron(4×4 full, rank 1) has rank 4 > --max-rank 2
    assert heard and heard[0].startswith("output: ~")
    assert report.estimated_bytes > 4 * report.input_bytes and any("× the input" in w for w in report.warnings)
    assert any(line.startswith("warning:") and "× the input" in line for line in heard)
    result = CliRunner().invoke(cli, ["convert", "--help"])
    assert "loratools resize" in result.output and "--max-rank" in result.output


def test_module_bars_learn_their_total() -> None:
    from loratools.ops.parallel import map_modules

    seen: list[tuple[str, int]] = []

    class Recorder:
        def __call__(self, n: int) -> None:
            seen.append(("advance", n))

        def set_total(self, total: int) -> None:
            seen.append(("total", total))

    assert map_modules(lambda x: x * 2, [1, 2, 3], workers=1, progress=Recorder()) == [2, 4, 6]
    assert seen == [("total", 3), ("advance", 1), ("advance", 1), ("advance", 1)]
