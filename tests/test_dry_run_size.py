"""--dry-run reports the exact size of the real output, for every writer, and writes nothing anywhere.

The oracle is the file system: after the real run, ``os.stat`` of every file the command left at
OUTPUT (and the embeddings sidecar beside it). The dry run may not create a file at all — not at
OUTPUT, not beside it, not in a temporary folder (``tempfile`` is made to refuse during it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.formats.adapters import LoKr, LoraFile
from loratools.formats.io import save_lora
from loratools.synthetic import TINY, make_lora, write_checkpoint

SPEC = TINY["sd1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD1 inputs: two LoRAs (one fp16, ss_ metadata), a LoKr, a base with ModelSpec keys, a tuned copy."""
    root = tmp_path_factory.mktemp("dry-size")
    a_lora = make_lora(SPEC, rank=4, conv=True, alphas="varied", dtype=torch.float16)
    a_lora.metadata.update({"ss_network_dim": "4", "ss_output_name": "a"})  # sshs_* hashes are rewritten
    a = save_lora(a_lora, root / "a.safetensors", "kohya")
    b = save_lora(make_lora(SPEC, rank=2, seed=1), root / "b.safetensors", "kohya")
    gen = torch.Generator().manual_seed(2)
    adapters = {}
    for module, lowrank in list(make_lora(SPEC, rank=1, text=False).adapters.items())[:6]:
        out, inp = lowrank.up.shape[0], lowrank.down.shape[1]  # type: ignore[union-attr]
        if lowrank.down.dim() == 2 and out % 4 == 0 and inp % 4 == 0:  # type: ignore[union-attr]
            adapters[module] = LoKr(1.0, w1=torch.randn(4, 4, generator=gen),
                                    w2a=torch.randn(out // 4, 1, generator=gen),
                                    w2b=torch.randn(1, inp // 4, generator=gen))  # fmt: skip
    lokr = save_lora(LoraFile(adapters, SPEC, "synthetic"), root / "lokr.safetensors", "kohya")
    attention = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")  # cloneofsimo's reach
    # full width: the cloneofsimo writer orders modules by the real SD1 shapes, which TINY does not have
    full = make_lora(FAMILIES["sd1"], rank=1, text=False, alphas="varied", dtype=torch.float16)
    attn = {m: ad for m, ad in full.adapters.items() if m.endswith(attention)}
    attn_path = save_lora(LoraFile(attn, FAMILIES["sd1"], "synthetic"), root / "attn.safetensors", "kohya")
    with_tokens = make_lora(SPEC, rank=2, seed=3)
    with_tokens.embeddings["<sks>"] = torch.randn(2, SPEC.texts[0].hidden)
    emb = save_lora(with_tokens, root / "emb.safetensors", "kohya")
    modelspec = {"modelspec.title": "tiny base", "modelspec.architecture": "stable-diffusion-v1"}
    base = write_checkpoint(SPEC, root / "base.safetensors", "single", metadata=modelspec)
    plain = write_checkpoint(SPEC, root / "plain.safetensors", "single")
    folder = write_checkpoint(SPEC, root / "base-diffusers", "diffusers")
    tuned = write_checkpoint(SPEC, root / "tuned.safetensors", "single", seed=1)
    return {"a": Path(a), "b": Path(b), "lokr": Path(lokr), "attn": Path(attn_path), "emb": Path(emb), "base": base, "plain": plain, "folder": folder,
            "tuned": tuned}  # fmt: skip


def _commands(p: dict[str, Path], out: Path) -> dict[str, list[str]]:
    a, b, base = str(p["a"]), str(p["b"]), str(p["base"])
    convert = {f"convert-{fmt}": ["convert", a, str(out / f"c-{fmt}.safetensors"), "--to", fmt]
               for fmt in ("kohya", "diffusers")}  # fmt: skip
    return {
        **convert,
        "convert-cloneofsimo": [
            "convert",
            str(p["attn"]),
            str(out / "c-clone.safetensors"),
            "--to",
            "cloneofsimo",
            "--bake",
        ],
        "convert-peft": ["convert", a, str(out / "c-peft"), "--to", "peft"],
        "convert-embeddings-sidecar": ["convert", str(p["emb"]), str(out / "c-emb.safetensors"), "--to", "diffusers"],
        "convert-for-comfyui": ["convert", b, str(out / "for.safetensors"), "--for", "comfyui"],
        "convert-to-lora": ["convert", str(p["lokr"]), str(out / "l.safetensors"), "--to-lora", "--rank", "2"],
        "convert-ckpt-fp16": ["convert", base, str(out / "ck.safetensors"), "--dtype", "fp16"],
        "convert-ckpt-diffusers": ["convert", base, str(out / "ck-diffusers"), "--to", "diffusers"],
        "rescale": ["rescale", a, "--by", "-0.5", "-o", str(out / "r.safetensors")],
        "resize": ["resize", a, "--rank", "2", "-o", str(out / "s.safetensors")],
        "resize-dynamic": ["resize", a, "--sv-fro", "0.8", "-o", str(out / "sd.safetensors")],
        "blend": ["blend", f"{a}:0.7", b, "-o", str(out / "b.safetensors")],
        "merge-file": ["merge", str(p["plain"]), f"{a}:0.8", "-o", str(out / "m.safetensors")],
        "merge-modelspec": ["merge", base, f"{a}:0.8", "-o", str(out / "mm.safetensors")],
        "merge-new-folder": ["merge", base, a, "--to", "diffusers", "-o", str(out / "m-diffusers")],
        "merge-same-folder": ["merge", str(p["folder"]), a, b, "-o", str(out / "mf-diffusers")],
        "unmerge": ["unmerge", base, f"{a}:0.8", "-o", str(out / "u.safetensors")],
        "extract": ["extract", str(p["plain"]), str(p["tuned"]), "--rank", "2", "-o", str(out / "e.safetensors")],
    }


NAMES = list(
    _commands({k: Path(k) for k in ("a", "b", "lokr", "attn", "emb", "base", "plain", "folder", "tuned")}, Path())
)
# Today's dry run writes the output into a temporary folder and measures it; merge/unmerge plan
# without writing, but their size leaves out the ModelSpec hash placeholder and a folder's other files.
MERGE_SIZE_WRONG = {"merge-modelspec", "merge-new-folder", "merge-same-folder", "unmerge"}
XFAIL = {
    name: "merge's planned size misses the modelspec.hash_sha256 placeholder / folder files"
    if name in MERGE_SIZE_WRONG
    else "the dry run writes into a temporary folder"
    for name in NAMES
    if name != "merge-file"
}
CASES = NAMES


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder, by os.walk/os.stat (the oracle)."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.stat(Path(top) / f).st_size for top, _, files in os.walk(path) for f in files)


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(Path(top, f).relative_to(folder)), os.stat(Path(top, f)).st_size)
                  for top, _, files in os.walk(folder) for f in files)  # fmt: skip


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return result.stdout


def _no_temp_files(*_: object, **__: object) -> None:
    raise AssertionError("a dry run created a temporary file or folder")


@pytest.mark.parametrize("name", CASES)
def test_dry_run_size_is_the_real_size(
    name: str, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = _commands(inputs, out)[name]
    output = Path(args[args.index("-o") + 1] if "-o" in args else args[2])
    before = listing(out), listing(inputs["a"].parent)
    with monkeypatch.context() as patch:
        for fn in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"):
            patch.setattr(tempfile, fn, _no_temp_files)
        dry = json.loads(_invoke([*args, "--dry-run", "--json"]))
        said = CliRunner().invoke(cli, [*args, "--dry-run"]).output
    assert (listing(out), listing(inputs["a"].parent)) == before, "a dry run left files behind"
    assert not output.exists()
    assert dry["dry_run"] is True
    assert f"({dry['output_bytes']} bytes); nothing written" in " ".join(said.split())
    _invoke(args)
    sidecar = output.with_name(f"{output.name.split('.')[0]}.embeddings.safetensors")
    real = disk_bytes(output) + (disk_bytes(sidecar) if sidecar.exists() else 0)
    assert dry["output_bytes"] == real


@pytest.mark.parametrize(
    ("metadata", "hash_key"),
    [(None, None), ({"format": "pt"}, None), ({"title": "Ünïcode ✓", "n": ""}, None),
     ({"modelspec.title": "x"}, "modelspec.hash_sha256"), (None, "modelspec.hash_sha256")],
)  # fmt: skip
def test_planned_file_size_is_the_written_size(metadata: dict | None, hash_key: str | None, tmp_path: Path) -> None:
    """file_size (the plan) against the file StreamingWriter writes, read back by the safetensors library."""
    from safetensors import safe_open

    from loratools.io.safetensors import StreamingWriter, file_size, tensor_plan

    gen = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=gen).half(), "a": torch.randn(7, generator=gen),
               "z": torch.zeros(0), "i": torch.arange(3)}  # fmt: skip
    plan = tensor_plan(tensors)
    path = tmp_path / "x.safetensors"
    with StreamingWriter(path, plan, metadata, data_hash_key=hash_key) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert file_size(plan, metadata, hash_key) == path.stat().st_size
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata() or {}
        assert list(handle.keys()) == sorted(tensors) and all(torch.equal(handle.get_tensor(n), t)
                                                              for n, t in tensors.items())  # fmt: skip
    assert set(stored) == set(metadata or {}) | ({hash_key} if hash_key else set())
    if hash_key:
        import hashlib

        data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
        assert stored[hash_key] == "0x" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("command", ["merge", "convert", "rescale"])
def test_dry_run_refuses_an_existing_output(command: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    """A dry run fails where the real run would: OUTPUT exists and --overwrite was not given."""
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    args = {
        "merge": ["merge", str(inputs["plain"]), str(inputs["a"]), "-o", str(taken)],
        "convert": ["convert", str(inputs["base"]), str(taken), "--dtype", "fp16"],
        "rescale": ["rescale", str(inputs["a"]), "--by", "2", "-o", str(taken)],
    }[command]
    result = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert result.exit_code != 0 and "exists" in result.stderr and taken.read_bytes() == b"x"
    assert _invoke([*args, "--dry-run", "--overwrite", "--json"]) and taken.read_bytes() == b"x"


CHECKPOINT_WRITERS = [n for n in NAMES if n.startswith(("merge", "unmerge", "convert-ckpt"))]


@pytest.mark.parametrize("name", CHECKPOINT_WRITERS)
def test_checkpoint_dry_runs_read_no_base_tensor(
    name: str, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint's shapes are in its header: the dry run plans from them and reads no tensor of it."""
    from loratools.io.checkpoint import Checkpoint

    def refuse(self: Checkpoint, name: str) -> None:
        raise AssertionError(f"a dry run read {name}")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    args = _commands(inputs, tmp_path)[name]
    assert json.loads(_invoke([*args, "--dry-run", "--json"]))["output_bytes"] > 0
