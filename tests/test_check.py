"""loratools check: one row per rule per target (rule → generated LoRA → expected finding),
convert --for X then check --for X clean, the real LoRAs against every target, --json schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from helpers import REAL_LORAS, needs_real
from helpers_check import subset, with_kind, write_diffusers, write_kohya, write_raw

from loratools.check import check_lora
from loratools.check.schema import CHECK_SCHEMA
from loratools.cli.main import cli
from loratools.families import FAMILIES

SD1, SD2 = FAMILIES["sd1"], FAMILIES["sd2"]
TARGETS = ("comfyui", "a1111", "forge", "diffusers", "invokeai", "kohya")


def _drop(suffix: str, match: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        for key in [k for k in t if match in k and k.endswith(suffix)]:
            del t[key]

    return mutate


def _orphan(t: dict[str, torch.Tensor]) -> None:
    t["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"] = torch.tensor(1.0)


def _unknown(t: dict[str, torch.Tensor]) -> None:
    for i in range(7):  # 14 keys of modules no SD1 model has
        t[f"lora_unet_nowhere_{i}.lora_down.weight"] = torch.zeros(2, 8)
        t[f"lora_unet_nowhere_{i}.lora_up.weight"] = torch.zeros(8, 2)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "uniform": lambda d: write_kohya(subset(SD1), d / "uniform.safetensors"),
    "varied": lambda d: write_kohya(subset(SD1, alphas="varied"), d / "varied.safetensors"),
    "peft": lambda d: write_diffusers(subset(SD1, alphas="varied"), d / "peft.safetensors"),
    "no_out_proj": lambda d: write_kohya(subset(SD1), d / "noout.safetensors", _drop("", "self_attn_out_proj")),
    "sd2_no_out_proj": lambda d: write_kohya(subset(SD2), d / "sd2noout.safetensors", _drop("", "self_attn_out_proj")),
    "orphan_alpha": lambda d: write_kohya(subset(SD1), d / "orphan.safetensors", _orphan),
    "up_without_down": lambda d: write_kohya(
        subset(SD1), d / "lone.safetensors", _drop("lora_down.weight", "attn1_to_q")
    ),
    "unknown_names": lambda d: write_kohya(subset(SD1), d / "unknown.safetensors", _unknown),
    "dora": lambda d: write_kohya(with_kind(subset(SD1), "dora"), d / "dora.safetensors"),
    "loha": lambda d: write_kohya(with_kind(subset(SD1), "loha"), d / "loha.safetensors"),
    "lokr": lambda d: write_kohya(with_kind(subset(SD1), "lokr"), d / "lokr.safetensors"),
}

# rule → target → expected: "clean", ("refused", substring), ("ignored", short, count), ("wrong", count)
RULES: list[tuple[str, str, object]] = [
    *[("uniform", t, "clean") for t in TARGETS],
    ("varied", "diffusers", ("wrong", 12)),  # attn q/k/v/out + CLIPTextModel modules whose alpha ≠ the default
    ("varied", "comfyui", "clean"),
    ("varied", "kohya", "clean"),
    ("peft", "comfyui", ("ignored", "attention modules ignored", 8)),
    ("peft", "comfyui", ("wrong", 8)),  # alphas only in metadata ⇒ scale 1 (2 modules have alpha = r)
    ("peft", "forge", ("refused", "more than 12")),
    ("peft", "a1111", ("ignored", "peft-spelled modules ignored", 18)),
    ("peft", "invokeai", ("refused", "Unsupported lora format")),
    ("peft", "diffusers", "clean"),
    ("no_out_proj", "diffusers", ("ignored", "q/k/v modules dropped", 3)),
    ("no_out_proj", "a1111", "clean"),  # SD1's CLIP-L attention is four Linear layers
    ("sd2_no_out_proj", "a1111", ("ignored", "q/k/v modules dropped", 3)),
    ("orphan_alpha", "comfyui", ("ignored", "orphan alphas counted as loaded", 1)),
    ("orphan_alpha", "a1111", ("refused", "alpha with no factors")),
    ("orphan_alpha", "invokeai", ("refused", "alpha with no factors")),
    ("orphan_alpha", "kohya", ("ignored", "orphan alphas ignored", 1)),
    ("up_without_down", "comfyui", ("refused", "KeyError")),
    ("up_without_down", "a1111", ("refused", "lora_up without lora_down")),
    ("up_without_down", "kohya", ("ignored", "lone lora_up modules ignored", 1)),
    ("unknown_names", "comfyui", ("ignored", "unknown modules ignored", 7)),
    ("unknown_names", "forge", ("refused", "14 keys unmatched")),
    ("dora", "diffusers", ("wrong", 3)),
    ("dora", "kohya", ("wrong", 3)),
    ("dora", "comfyui", "clean"),
    ("loha", "diffusers", ("refused", "loha modules are not read")),
    ("loha", "kohya", ("ignored", "loha modules ignored", 3)),
    ("loha", "invokeai", "clean"),
    ("lokr", "comfyui", ("wrong", 3)),  # ranks 2 and 4: ComfyUI divides by lokr_w2_b's
    ("lokr", "a1111", ("wrong", 3)),
    ("lokr", "invokeai", "clean"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("check")
    return {name: build(folder) for name, build in BUILDERS.items()}


@pytest.mark.parametrize(("rule", "target", "expected"), RULES, ids=[f"{r}-{t}" for r, t, _ in RULES])
def test_rule(files: dict[str, Path], rule: str, target: str, expected: object) -> None:
    report = next(r for r in check_lora(files[rule], target).reports if r.target == target)
    if expected == "clean":
        assert report.clean, report.verdict
        return
    assert isinstance(expected, tuple)
    what = expected[0]
    if what == "refused":
        assert report.refused and expected[1] in report.refused, report.verdict
    elif what == "ignored":
        group = next((g for g in report.ignored if g.short == expected[1]), None)
        assert group is not None and len(group.names) == expected[2], report.verdict
    else:
        assert len(report.misapplied) == expected[1], report.verdict


def test_varied_alphas_diffusers_names_the_modules(files: dict[str, Path]) -> None:
    """The mis-scaled modules are U-Net attention projections and the CLIPTextModel's, never ff/proj."""
    (report,) = check_lora(files["varied"], "diffusers").reports
    assert report.verdict.startswith("diffusers 0.42: 12 of 18 modules at the wrong strength (per-module alphas)")
    for m in report.misapplied:
        assert ".attn" in m.module or m.module.startswith("te1."), m.module
        assert m.expected != m.applied


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rule", ["varied", "peft", "no_out_proj", "sd2_no_out_proj"])
def test_convert_for_then_check_is_clean(files: dict[str, Path], tmp_path: Path, rule: str, target: str) -> None:
    out = tmp_path / "fixed.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(files[rule]), str(out), "--for", target, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["clean"]
    assert all(r.clean for r in check_lora(out, target).reports), [r.verdict for r in check_lora(out, target).reports]


def test_convert_for_refuses_what_the_target_cannot_read(files: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(files["dora"]), str(tmp_path / "o.safetensors"), "--for", "kohya"])
    assert result.exit_code != 0 and "DoRA" in result.output and not (tmp_path / "o.safetensors").exists()
    result = CliRunner().invoke(
        cli, ["convert", str(files["loha"]), str(tmp_path / "o.safetensors"), "--for", "diffusers"]
    )
    assert result.exit_code != 0 and "--to-lora" in result.output


def test_json_schema_and_bad_target(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["check", str(files["peft"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    jsonschema.validate(data, CHECK_SCHEMA)
    assert [t["target"] for t in data["targets"]] == list(TARGETS)
    result = CliRunner().invoke(cli, ["check", str(files["peft"]), "--for", "webui9"])
    assert result.exit_code != 0 and "valid targets: comfyui, a1111" in result.output


def test_check_writes_nothing(files: dict[str, Path]) -> None:
    before = sorted(p.name for p in files["peft"].parent.iterdir())
    CliRunner().invoke(cli, ["check", str(files["peft"])])
    assert sorted(p.name for p in files["peft"].parent.iterdir()) == before


# Real third-party files: target → expected verdict start (docs/CHECK.md §5 has the table).
REAL = {
    "lycoris_lokr/smart_falcon_4_lokr.safetensors": {
        "comfyui": "ComfyUI: loads all 350 modules at the right strength",
        "a1111": "A1111: loads all 350",
        "forge": "Forge: loads all 350",
        "diffusers": "diffusers 0.42: refuses the file (lokr modules are not read",
        "invokeai": "InvokeAI: loads all 350",
        "kohya": "kohya sd-scripts: 350 lokr modules ignored",
    },
    "catundchat_sd15/pytorch_lora_weights.safetensors": {
        "comfyui": "ComfyUI: loads all 128",
        "a1111": "A1111: 128 attn-processor-spelled modules ignored",
        "forge": "Forge: loads all 128",
        "diffusers": "diffusers 0.42: 128 un-prefixed modules ignored",
        "invokeai": "InvokeAI: refuses the file",
        "kohya": "kohya sd-scripts: 128 attn-processor-spelled modules ignored",
    },
    "cloneofsimo_lora/analog_svd_rank4.safetensors": {
        "comfyui": "ComfyUI: 192 cloneofsimo-spelled modules ignored",
        "a1111": "A1111: refuses the file",
        "forge": "Forge: refuses the file",
        "diffusers": "diffusers 0.42: refuses the file",
        "invokeai": "InvokeAI: refuses the file",
        "kohya": "kohya sd-scripts: 192 cloneofsimo-spelled modules ignored",
    },
    "cloneofsimo_lora/lora_disney.pt": {t: "refuses the file" for t in TARGETS},
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_files_against_every_target(name: str) -> None:
    path = REAL_LORAS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    result = check_lora(path)
    for report in result.reports:
        expected = REAL[name][report.target]
        assert expected in report.verdict, (report.target, report.verdict)


@needs_real("catundchat_sd15", "pytorch_lora_weights.bin")
def test_real_pickle_matches_its_safetensors_twin() -> None:
    a = check_lora(REAL_LORAS / "catundchat_sd15" / "pytorch_lora_weights.bin")
    b = check_lora(REAL_LORAS / "catundchat_sd15" / "pytorch_lora_weights.safetensors")
    assert [r.verdict for r in a.reports] == [r.verdict for r in b.reports]


def test_done_when_full_size_sd15(tmp_path: Path) -> None:
    """The issue's cases on a full SD1.5 module set (264 modules, rank 2): kohya per-module alphas
    vs diffusers; the diffusers file (alphas only in lora_adapter_metadata) vs ComfyUI, and the
    convert --for comfyui that fixes it."""
    from loratools.synthetic import make_lora

    lora = make_lora(SD1, rank=2, alphas="varied")
    kohya = write_kohya(lora, tmp_path / "kohya.safetensors")
    (report,) = check_lora(kohya, "diffusers").reports
    assert report.verdict == "diffusers 0.42: 175 of 264 modules at the wrong strength (per-module alphas)"
    peft = write_diffusers(lora, tmp_path / "pytorch_lora_weights.safetensors")
    (report,) = check_lora(peft, "comfyui").reports
    (attention,) = [g for g in report.ignored if g.short == "attention modules ignored"]
    assert len(attention.names) == 128 and all(".attn" in n for n in attention.names)
    assert all("alpha only in metadata" in m.why for m in report.misapplied) and report.misapplied
    fixed = tmp_path / "fixed.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(peft), str(fixed), "--for", "comfyui"])
    assert result.exit_code == 0, result.output
    assert "ComfyUI: loads all 264 modules at the right strength" in result.output


def test_inspect_shows_loads_in(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(files["peft"])])
    assert result.exit_code == 0, result.output
    assert "loads in: ComfyUI: " in result.output and "diffusers 0.42 ✓" in result.output


def test_base_checkpoint_key_set(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """--base: the checkpoint's real modules decide; a base without the middle block's attention
    (an SSD-1B-like pruned model) leaves those LoRA modules out."""
    from safetensors.torch import load_file

    from loratools.synthetic import TINY, make_lora

    spec = TINY["sd1"]
    path = write_kohya(make_lora(spec, rank=2), tmp_path / "tiny.safetensors")
    full = tiny_checkpoints[("sd1", "single")]
    assert check_lora(path, "comfyui", base=full).clean
    tensors = {k: v for k, v in load_file(str(full)).items() if "middle_block.1." not in k}
    pruned = write_raw(tensors, tmp_path / "pruned.safetensors")
    (report,) = check_lora(path, "comfyui", base=pruned).reports
    (group,) = report.ignored
    assert group.short == "modules not in the base ignored" and group.names
    assert all(n.startswith("unet.mid_block.attentions.0.") for n in group.names)
