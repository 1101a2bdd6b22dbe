"""inspect (issue 7): real files, header scan ≡ full load, JSON schema, tree, norms, folders, lies."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from helpers import REAL_LORAS, REPO, needs_real, require_real
from rich.console import Console

from loratools.cli.main import cli
from loratools.cli.render_inspect import describe, layout_tree, norm_bars
from loratools.families import FAMILIES
from loratools.formats.adapters import LoraFile
from loratools.formats.io import load_lora, save_lora
from loratools.formats.kohya import kohya_state_dict
from loratools.formats.names import kohya_text_prefixes, name_tables
from loratools.formats.scan import scan_lora
from loratools.io.safetensors import save_tensors
from loratools.report import inspect_checkpoint, inspect_lora
from loratools.report.lora import summarize_metadata
from loratools.report.schema import INSPECT_CHECKPOINT, INSPECT_LORA
from loratools.synthetic import TINY, make_lora


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def validate(data: dict) -> None:
    schema = INSPECT_LORA if data["kind"] == "lora" else INSPECT_CHECKPOINT
    jsonschema.validate(data, schema)


# --- every real file reports what shared/real_loras/README.md lists -------------------------------

# (file, format, family, modules, components, embeddings). The README lists the U-Net .pt files
# as 128 modules; lora_kiriko.pt has its lora_kiriko.text_encoder.pt companion beside it, which
# lora_diffusion's patch_pipe (and load_lora) reads with it: 128 U-Net + 92 text-encoder modules.
REAL = [
    ("cloneofsimo_lora/lora_disney.pt", "cloneofsimo", "sd2", 128, {"unet": 128}, []),
    ("cloneofsimo_lora/lora_illust.pt", "cloneofsimo", "sd2", 128, {"unet": 128}, []),
    ("cloneofsimo_lora/lora_pop.pt", "cloneofsimo", "sd2", 128, {"unet": 128}, []),
    ("cloneofsimo_lora/lora_kiriko.pt", "cloneofsimo", "sd2", 220, {"unet": 128, "te1": 92}, []),
    ("cloneofsimo_lora/lora_kiriko.text_encoder.pt", "cloneofsimo", "sd2", 92, {"te1": 92}, []),
    ("cloneofsimo_lora/lora_kiriko2.text_encoder.pt", "cloneofsimo", "sd1", 48, {"te1": 48}, []),
    ("cloneofsimo_lora/analog_svd_distill.text_encoder.pt", "cloneofsimo", "sd1", 48, {"te1": 48}, []),
    ("cloneofsimo_lora/lora_kiriko2.ti.pt", "textual-inversion", "sd1", 0, {}, ["<krk>"]),
    ("cloneofsimo_lora/analog_svd_rank4.safetensors", "cloneofsimo", "sd1", 192, {"unet": 144, "te1": 48}, []),
    ("cloneofsimo_lora/lora_disney.safetensors", "cloneofsimo", "sd1", 192, {"unet": 144, "te1": 48}, ["<s1>", "<s2>"]),
    (
        "cloneofsimo_lora/lora_disney_inpainting.safetensors",
        "cloneofsimo",
        "sd1",
        192,
        {"unet": 144, "te1": 48},
        ["<s1>", "<s2>"],
    ),
    ("lycoris_lokr/smart_falcon_4_lokr.safetensors", "kohya", "sd1", 350, {"unet": 278, "te1": 72}, []),
    ("lycoris_lokr/smart_falcon_8_lokr.safetensors", "kohya", "sd1", 350, {"unet": 278, "te1": 72}, []),
    ("lycoris_lokr/smart_falcon_16_lokr.safetensors", "kohya", "sd1", 350, {"unet": 278, "te1": 72}, []),
    ("catundchat_sd15/pytorch_lora_weights.safetensors", "diffusers-attn-processor", "sd1", 128, {"unet": 128}, []),
    ("catundchat_sd15/pytorch_lora_weights.bin", "diffusers-attn-processor", "sd1", 128, {"unet": 128}, []),
]


@needs_real("README.md")
def test_every_real_file_is_listed() -> None:
    listed = {name for name, *_ in REAL}
    on_disk = {str(p.relative_to(REAL_LORAS)) for p in REAL_LORAS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert listed == on_disk


@pytest.mark.parametrize(("name", "fmt", "family", "modules", "components", "embeddings"), REAL)
def test_real_files(name: str, fmt: str, family: str, modules: int, components: dict, embeddings: list) -> None:
    require_real(name)
    code, out, err = run("inspect", "--json", str(REAL_LORAS / name))
    assert code == 0, err
    data = json.loads(out)
    validate(data)
    assert (data["format"], data["family"], data["modules"]) == (fmt, family, modules)
    assert data["components"] == components
    assert data["embeddings"] == embeddings
    assert sum(n["modules"] for n in data["tree"]) == modules
    # the README's ranks
    if "lokr" in name:
        rank = name.split("_")[3]
        assert data["ranks"] == {rank: 350} and data["kinds"] == {"lokr": 350}
        assert data["read"] == "header"
    code, text, err = run("inspect", str(REAL_LORAS / name))
    assert code == 0, err
    assert data["family_title"] in " ".join(text.split())


@needs_real("lycoris_lokr")
def test_real_lokr_metadata_summary() -> None:
    report = inspect_lora(REAL_LORAS / "lycoris_lokr" / "smart_falcon_16_lokr.safetensors")
    summary = report.metadata_summary
    assert summary["training"]["ss_network_module"] == "lycoris.kohya"
    assert summary["stored_hashes"]["sshs_legacy_hash"] == "81b44117"
    tags = json.loads(report.metadata.get("ss_tag_frequency", "{}"))
    if tags:  # top tags are the summed counts, largest first
        totals: dict[str, int] = {}
        for per_dir in tags.values():
            for tag, n in per_dir.items():
                totals[tag.strip()] = totals.get(tag.strip(), 0) + n
        assert summary["tags"]["top"][0][1] == max(totals.values())


# --- the header scan reports what a full load reports ------------------------------------------------


def _kohya_zoo(path: Path) -> Path:
    """A kohya/LyCORIS file with every kind the scanner must read: LoRA, LoCon, Tucker, DoRA, LoHa,
    LoKr, full diff; alphas missing, zero, bf16; an embedding beside them."""
    spec = FAMILIES["sd1"]
    tables = name_tables(spec)
    prefixes = kohya_text_prefixes(spec)
    g = torch.Generator().manual_seed(7)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    def name(module: str) -> str:
        return tables.kohya_name(module, sgm_unet=False, text_prefixes=prefixes)

    linear = [m for m in tables.modules.values() if len(m.shape) == 2]
    convs = [m for m in tables.modules.values() if len(m.shape) == 4 and m.shape[-1] == 3]
    out: dict[str, torch.Tensor] = {}
    m = linear[0]
    out |= {f"{name(m.name)}.lora_down.weight": t(4, m.shape[1]), f"{name(m.name)}.lora_up.weight": t(m.shape[0], 4)}
    out[f"{name(m.name)}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    m = linear[1]  # no alpha
    out |= {f"{name(m.name)}.lora_down.weight": t(2, m.shape[1]), f"{name(m.name)}.lora_up.weight": t(m.shape[0], 2)}
    m = linear[2]  # DoRA (output axis)
    out |= {f"{name(m.name)}.lora_down.weight": t(4, m.shape[1]), f"{name(m.name)}.lora_up.weight": t(m.shape[0], 4)}
    out |= {f"{name(m.name)}.alpha": torch.tensor(4.0), f"{name(m.name)}.dora_scale": t(m.shape[0], 1) + 1}
    m = linear[3]  # LoHa
    out |= {
        f"{name(m.name)}.hada_w1_a": t(m.shape[0], 3),
        f"{name(m.name)}.hada_w1_b": t(3, m.shape[1]),
        f"{name(m.name)}.hada_w2_a": t(m.shape[0], 3),
        f"{name(m.name)}.hada_w2_b": t(3, m.shape[1]),
        f"{name(m.name)}.alpha": torch.tensor(1.5),
    }
    m = linear[4]  # LoKr: w1 full, w2 low rank
    a = 4 if m.shape[0] % 4 == 0 else 1
    c = 4 if m.shape[1] % 4 == 0 else 1
    out |= {
        f"{name(m.name)}.lokr_w1": t(a, c),
        f"{name(m.name)}.lokr_w2_a": t(m.shape[0] // a, 2),
        f"{name(m.name)}.lokr_w2_b": t(2, m.shape[1] // c),
        f"{name(m.name)}.alpha": torch.tensor(1.0),
    }
    m = linear[5]  # full diff
    out[f"{name(m.name)}.diff"] = t(*m.shape)
    m = linear[6]  # alpha 0
    out |= {f"{name(m.name)}.lora_down.weight": t(4, m.shape[1]), f"{name(m.name)}.lora_up.weight": t(m.shape[0], 4)}
    out[f"{name(m.name)}.alpha"] = torch.tensor(0.0)
    m = convs[0]  # LoCon 3×3
    out |= {
        f"{name(m.name)}.lora_down.weight": t(4, m.shape[1], 3, 3),
        f"{name(m.name)}.lora_up.weight": t(m.shape[0], 4, 1, 1),
        f"{name(m.name)}.alpha": torch.tensor(4.0),
    }
    m = convs[1]  # Tucker
    out |= {
        f"{name(m.name)}.lora_down.weight": t(4, m.shape[1], 1, 1),
        f"{name(m.name)}.lora_mid.weight": t(4, 4, 3, 3),
        f"{name(m.name)}.lora_up.weight": t(m.shape[0], 4, 1, 1),
        f"{name(m.name)}.alpha": torch.tensor(8.0),
    }
    out["<tok>"] = t(2, 768)
    save_tensors(path, out, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return path


def _synthetic(tmp: Path) -> list[Path]:
    files = [_kohya_zoo(tmp / "zoo.safetensors")]
    sd1 = make_lora(FAMILIES["sd1"], rank=4, conv=True, alphas="varied", dtype=torch.float16)
    files.append(save_lora(sd1, tmp / "sd1-kohya.safetensors", "kohya"))
    files.append(
        save_lora(sd1.with_adapters(dict(list(sd1.adapters.items())[:40])), tmp / "sd1-d.safetensors", "diffusers")
    )
    sd2 = make_lora(FAMILIES["sd2"], rank=2, text=True, dtype=torch.bfloat16)
    files.append(save_lora(sd2, tmp / "sd2-kohya.safetensors", "kohya"))
    sdxl = make_lora(FAMILIES["sdxl"], rank=1, text=False)
    files.append(save_lora(sdxl, tmp / "sdxl-kohya.safetensors", "kohya"))
    return files


SCANNED_REAL = [
    "lycoris_lokr/smart_falcon_4_lokr.safetensors",
    "catundchat_sd15/pytorch_lora_weights.safetensors",
]


def test_scan_equals_full_load(tmp_path: Path) -> None:
    files = [require_real(n) for n in SCANNED_REAL] + _synthetic(tmp_path)
    for path in files:
        scan = scan_lora(path)
        assert scan is not None, path
        lora = load_lora(path)
        assert (scan.format, scan.family.name) == (lora.source_format, lora.family.name), path
        assert scan.warnings == lora.warnings, path
        assert scan.unmatched == lora.unmatched
        assert set(scan.embeddings) == set(lora.embeddings)
        header_report = inspect_lora(path)
        from loratools.report.lora import _facts_of_loaded

        facts, dtypes, parameters = _facts_of_loaded(lora)
        assert header_report.read == "header"
        assert [vars(f) for f in header_report.module_facts] == [vars(f) for f in facts], path
        assert header_report.dtypes == dict(dtypes) and header_report.parameters == parameters


def test_header_inspect_never_imports_torch(tmp_path: Path) -> None:
    path = save_lora(make_lora(FAMILIES["sdxl"], rank=1, text=False), tmp_path / "x.safetensors", "kohya")
    code = (
        "import sys; from loratools.cli.main import cli\n"
        f"try: cli(['inspect', {str(path)!r}, '--hashes', '--keys'], standalone_mode=False)\n"
        "finally: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NO-TORCH" in done.stderr


# --- metadata that lies ---------------------------------------------------------------------------


def test_metadata_claiming_sd15_on_an_sdxl_lora(tmp_path: Path) -> None:
    lora = make_lora(FAMILIES["sdxl"], rank=1, text=False)
    path = tmp_path / "liar.safetensors"
    save_tensors(
        path,
        kohya_state_dict(lora),
        {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora", "ss_v2": "False"},
    )
    report = inspect_lora(path)
    assert report.family == "sdxl" and report.family_mismatch
    assert report.metadata_claims is not None and report.metadata_claims.startswith("sd1")
    assert any("claims SD 1.x" in w and "SDXL" in w for w in report.warnings)
    code, out, _ = run("inspect", str(path))
    assert code == 0
    text = " ".join(out.split())
    assert "LoRA for SDXL" in text and "disagrees" in text and "warning:" in text
    data = json.loads(run("inspect", "--json", str(path))[1])
    validate(data)
    assert data["family"] == "sdxl" and data["family_mismatch"] is True
    # the same lie in a diffusers file
    d = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    from loratools.io.safetensors import SafetensorsFile

    with SafetensorsFile(d) as fh:
        tensors, meta = fh.read_all(), dict(fh.metadata)
    save_tensors(tmp_path / "d-liar.safetensors", tensors, {**meta, "ss_base_model_version": "sd_v1"})
    report = inspect_lora(tmp_path / "d-liar.safetensors")
    assert report.family == "sdxl" and report.family_mismatch and report.format == "diffusers"


# --- the tree, as rendered ------------------------------------------------------------------------


def _render(renderable: object, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def test_uniform_tree_collapses(tmp_path: Path) -> None:
    lora = make_lora(FAMILIES["sdxl"], rank=4, alpha=2.0, text=True, dtype=torch.float16)
    keep = {m: a for m, a in lora.adapters.items() if not m.startswith("unet.") or ".attentions.0." in m}
    path = save_lora(lora.with_adapters(keep), tmp_path / "xl.safetensors", "kohya")
    report = inspect_lora(path)
    text = _render(layout_tree(report))
    lines = text.splitlines()
    assert lines[0].strip() == f"{report.modules} modules"
    assert any(line.startswith("├── U-Net") and "lora r4 α2 ×0.5" in line for line in lines)
    assert any("layers 0–11 · 6 modules each · lora r4 α2 ×0.5" in line for line in lines)
    assert any("layers 0–31 · 6 modules each" in line for line in lines)
    assert any("down 1 · " in line for line in lines) and any("mid · " in line for line in lines)
    assert not any("attn1.to_q" in line for line in lines)  # uniform groups stay collapsed
    assert len(lines) < 20


def test_varied_tree_expands_to_modules(tmp_path: Path) -> None:
    lora = make_lora(FAMILIES["sd1"], rank=4, text=False, alphas="varied")
    path = save_lora(lora, tmp_path / "v.safetensors", "kohya")
    report = inspect_lora(path)
    text = _render(layout_tree(report))
    assert "attn1.to_q · lora r4" in text  # non-uniform groups open down to their modules
    assert "transformer block 0" in text and "attention 0" in text
    node = report.tree[0]
    assert describe(node).startswith("lora r4 α1…8 (8 values)")


# --- norms ------------------------------------------------------------------------------------------


def _dense_norms(path: Path, every: int = 1) -> dict[str, float]:
    """‖delta()‖ of every ``every``-th module: the dense reference the factor-space norms must equal."""
    lora = load_lora(path)
    out = {}
    for module, adapter in list(lora.adapters.items())[::every]:
        out[module] = float(torch.linalg.vector_norm(adapter.delta().to(torch.float64)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_norms_match_dense(tmp_path: Path, dtype: torch.dtype) -> None:
    lora = make_lora(FAMILIES["sd1"], rank=4, conv=True, text=False, alphas="varied", dtype=dtype)
    path = save_lora(lora, tmp_path / "n.safetensors", "kohya")
    report = inspect_lora(path, norms=True)
    expected = _dense_norms(path, every=3)
    checked = [f for f in report.module_facts if f.module in expected]
    assert len(checked) == len(expected) and {f.kind for f in checked} == {"lora", "locon"}
    for f in checked:
        assert f.norm == pytest.approx(expected[f.module], rel=1e-4)
    norms = {f.module: f.norm or 0.0 for f in report.module_facts}
    total = math.sqrt(sum(v * v for v in norms.values()))
    assert report.norms is not None and report.norms["total"] == pytest.approx(total, rel=1e-9)
    for node in report.tree:  # a block's norm is the root of its modules' summed squares
        for child in node.children:
            members = [v for k, v in norms.items() if k.startswith(child.path + ".") or k == child.path]
            assert child.norm == pytest.approx(math.sqrt(sum(v * v for v in members)), rel=1e-9)


def test_norms_every_kind(tmp_path: Path) -> None:
    path = _kohya_zoo(tmp_path / "zoo.safetensors")
    report = inspect_lora(path, norms=True)
    expected = _dense_norms(path)
    assert {f.kind for f in report.module_facts} >= {"lora", "locon", "tucker", "dora", "loha", "lokr", "full"}
    for f in report.module_facts:
        assert f.norm == pytest.approx(expected[f.module], rel=1e-4, abs=1e-9), f.kind
    assert report.norms is not None and report.norms["dora_note"]
    text = _render(norm_bars(report))
    assert "‖ΔW‖_F (factor space)" in text and "█" in text


def test_norms_real_lokr_and_loaded_paths() -> None:
    for name in ("lycoris_lokr/smart_falcon_4_lokr.safetensors", "cloneofsimo_lora/lora_disney.safetensors"):
        path = require_real(name)
        report = inspect_lora(path, norms=True)
        expected = _dense_norms(path, every=7)  # a sample: dense LoKr products are slow to build
        checked = [f for f in report.module_facts if f.module in expected]
        assert len(checked) == len(expected) > 20
        for f in checked:
            assert f.norm == pytest.approx(expected[f.module], rel=1e-3, abs=1e-6)


def test_norms_cli(tmp_path: Path) -> None:
    path = save_lora(make_lora(FAMILIES["sd1"], rank=2, text=True), tmp_path / "c.safetensors", "kohya")
    code, out, err = run("inspect", "--norms", str(path))
    assert code == 0, err
    assert "‖ΔW‖_F (factor space)" in out and "total ‖ΔW‖_F" in out and "U-Net · down 0" in out
    data = json.loads(run("inspect", "--norms", "--json", str(path))[1])
    validate(data)
    assert all(f["norm"] > 0 for f in data["module_facts"])


# --- keys, checkpoints, folders -------------------------------------------------------------------


def test_keys_listing(tmp_path: Path, tiny_checkpoints: dict) -> None:
    path = save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False), tmp_path / "k.safetensors", "kohya")
    data = json.loads(run("inspect", "--keys", "--json", str(path))[1])
    validate(data)
    assert len(data["keys"]) == data["tensors"] == 3 * data["modules"]
    assert {"key", "shape", "dtype"} <= set(data["keys"][0])
    result = CliRunner().invoke(cli, ["inspect", "--keys", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = [line.split("│") for line in result.stdout.splitlines() if "│" in line]
    shown = {r[0].strip(): (r[1].strip(), r[2].strip()) for r in rows}
    assert shown["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == ("2×320×1×1", "F32")
    ckpt = tiny_checkpoints[("sd1", "single")]
    data = json.loads(run("inspect", "--keys", "--json", str(ckpt))[1])
    validate(data)
    assert len(data["keys"]) == data["tensors"]


def test_checkpoint_json_schema(tiny_checkpoints: dict, family: str, layout: str) -> None:
    data = inspect_checkpoint(tiny_checkpoints[(family, layout)]).to_dict()
    validate(json.loads(json.dumps(data)))


def test_folder_inspect(tmp_path: Path, tiny_checkpoints: dict) -> None:
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False), folder / "a.safetensors", "kohya")
    save_lora(make_lora(FAMILIES["sdxl"], rank=1, text=False), folder / "b.safetensors", "kohya")
    shutil.copy(tiny_checkpoints[("sd2", "single")], folder / "c.safetensors")
    shutil.copytree(tiny_checkpoints[("sd1", "diffusers")], folder / "d-diffusers")
    save_lora(make_lora(FAMILIES["sd1"], rank=2, text=False), folder / "e-peft", "peft")
    (folder / "notes.txt").write_text("not a model")
    code, out, err = run("inspect", str(folder), "--jobs", "2")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "d-diffusers",
        "e-peft",
        "notes.txt",  # issue 13: every entry gets a row (this one: skipped, not a weights file)
    ]
    assert "skipped" in lines[5]
    assert "SD 1.x LoRA" in lines[0] and "SDXL LoRA" in lines[1] and "checkpoint" in lines[2]
    assert "checkpoint · diffusers" in lines[3] and "peft" in lines[4]
    data = json.loads(run("inspect", "--json", str(folder))[1])
    assert [Path(d["path"]).name for d in data] == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "d-diffusers",
        "e-peft",
    ]
    for d in data:
        validate(d)
    # a diffusers folder named directly is one model, not a folder of files
    data = json.loads(run("inspect", "--json", str(folder / "d-diffusers"))[1])
    assert data["kind"] == "checkpoint" and data["container"] == "diffusers"
    # a broken file: its line says why, the others are still shown, the exit status says it failed
    (folder / "f-broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code, out, _ = run("inspect", str(folder))
    assert code == 2
    assert "f-broken.safetensors: error:" in " ".join(out.split()) and "a.safetensors" in out


def test_embedding_only_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "emb.safetensors"
    save_tensors(path, {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})
    report = inspect_lora(path)
    assert (report.format, report.family, report.modules) == ("textual-inversion", "sdxl", 0)
    assert [e.width for e in report.embedding_facts] == [768, 1280]
    validate(json.loads(json.dumps(report.to_dict())))


def test_metadata_summary_tags_and_modelspec() -> None:
    meta = {
        "ss_tag_frequency": json.dumps({"10_a": {"cat": 5, " dog": 2}, "5_b": {"cat": 1, "bird": 7}}),
        "ss_training_started_at": "1700000000.5",
        "modelspec.title": "x",
        "modelspec.thumbnail": "data:" + "A" * 500,
        "merged_from": "a.safetensors, b.safetensors",
        "other": "1",
    }
    summary = summarize_metadata(meta)
    assert summary["tags"]["top"] == [("bird", 7), ("cat", 6), ("dog", 2)]
    assert summary["training"]["ss_training_started_at"].startswith("2023-11-14")
    assert summary["modelspec"]["thumbnail"] == "<505 characters>"
    assert summary["merged_from"] == "a.safetensors, b.safetensors" and summary["other_keys"] == 1


def test_tiny_lora_is_inspected_by_its_names(tmp_path: Path) -> None:
    """Issue 13: a LoRA of widths no full-size model has is inspected (before: refused, exit 2)."""
    path = save_lora(make_lora(TINY["sd1"]), tmp_path / "tiny.safetensors", "kohya")
    code, out, err = run("inspect", str(path))
    assert code == 0 and "SD 1.x names; widths fit no full-size SD 1.x" in out, err


def test_peft_folder_lora(tmp_path: Path) -> None:
    lora: LoraFile = make_lora(FAMILIES["sd1"], rank=2, text=True)
    path = save_lora(lora, tmp_path / "peft", "peft")
    report = inspect_lora(path, keys=True)
    assert (report.format, report.modules, report.read) == ("peft", len(lora.adapters), "tensors")
    assert report.keys is not None and len(report.keys) == report.tensors == 2 * len(lora.adapters)


def test_checkpoint_tree(tiny_checkpoints: dict, family: str) -> None:
    from loratools.cli.render_inspect import checkpoint_tree

    single = inspect_checkpoint(tiny_checkpoints[(family, "single")])
    folder = inspect_checkpoint(tiny_checkpoints[(family, "diffusers")])
    validate(json.loads(json.dumps(single.to_dict())))
    # the same model in two layouts: the same modules per block (SD2's 24th OpenCLIP block aside)
    blocks = {n.key: {c.key: c.modules for c in n.children} for n in single.tree}
    assert blocks["unet"] == {n.key: {c.key: c.modules for c in n.children} for n in folder.tree}["unet"]
    assert sum(n.parameters for n in single.tree) <= single.parameters
    text = _render(checkpoint_tree(single.tree))
    assert "U-Net · " in text and "down 1 · " in text and "mid · " in text
    assert "VAE · " in text and "encoder · " in text and "decoder · " in text
    layers = TINY[family].texts[0].layers
    assert f"layers 0–{layers - 1} · " in text and "each" in text


def _one_module_file(path: Path, params: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A kohya file with SD1's first text-encoder q_proj patched by ``params`` (plus a normal U-Net module)."""
    lora = make_lora(FAMILIES["sd1"], rank=2, text=False)
    tensors = dict(list(kohya_state_dict(lora).items())[:3])
    tensors |= {f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in params.items()}
    save_tensors(path, tensors, metadata or {})
    return path


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lora_down.weight": torch.zeros(0, 768), "lora_up.weight": torch.zeros(768, 0)}, "empty"),
        ({"lora_down.weight": torch.zeros(768), "lora_up.weight": torch.zeros(768, 1)}, ""),
        (
            {"lora_down.weight": torch.ones(2, 768, dtype=torch.int32), "lora_up.weight": torch.ones(768, 2)},
            "floating point",
        ),
        (
            {
                "lokr_w1": torch.ones(4, 4),
                "lokr_w1_a": torch.ones(4, 1),
                "lokr_w1_b": torch.ones(1, 4),
                "lokr_w2": torch.ones(192, 192),
            },
            "both full and factored",
        ),
        (
            {"lora_down.weight": torch.ones(2, 768), "lora_up.weight": torch.ones(768, 2), "dora_scale": torch.ones(5)},
            "fits neither",
        ),
    ],
)
def test_broken_modules_are_one_line_refusals(tmp_path: Path, params: dict, message: str) -> None:
    path = _one_module_file(tmp_path / "b.safetensors", params)
    for args in (["inspect", str(path)], ["inspect", "--json", str(path)]):
        code, _, err = run(*args)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_peft_metadata_that_is_not_a_config(tmp_path: Path) -> None:
    lora = make_lora(FAMILIES["sd1"], rank=2, text=False)
    d = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    from loratools.io.safetensors import SafetensorsFile

    with SafetensorsFile(d) as fh:
        tensors = fh.read_all()
    for value, message in (
        ("[1, 2]", "not an object"),
        ('{"unet.alpha_pattern": {"(": 3}}', "not a regular expression"),
    ):
        bad = tmp_path / "bad.safetensors"
        save_tensors(bad, tensors, {"lora_adapter_metadata": value}, overwrite=True)
        code, _, err = run("inspect", str(bad))
        assert code == 2 and message in err, err


def test_nan_factors_norms_and_diff(tmp_path: Path) -> None:
    down = torch.ones(2, 768)
    down[0, 0] = float("nan")
    path = _one_module_file(
        tmp_path / "nan.safetensors", {"lora_down.weight": down, "lora_up.weight": torch.ones(768, 2)}
    )
    code, out, err = run("inspect", "--norms", "--json", str(path))
    assert code == 0, err
    data = json.loads(out)  # strict JSON: no NaN anywhere
    validate(data)
    assert any("NaN or inf" in w for w in data["warnings"])
    assert [f["norm"] for f in data["module_facts"] if "q_proj" in f["module"]] == [None]
    other = _one_module_file(
        tmp_path / "ok.safetensors", {"lora_down.weight": torch.ones(2, 768), "lora_up.weight": torch.ones(768, 2)}
    )
    # the reader may refuse NaN factors outright (one line), or diff may report them (a note, no NaN in JSON)
    code, out, err = run("diff", "--json", str(path), str(other))
    if code == 0:
        assert any("no finite difference" in n for n in json.loads(out)["notes"])
        assert run("diff", str(path), str(other))[0] == 0
    else:
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
