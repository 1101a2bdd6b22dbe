"""LyCORIS full-diff modules (``diff``/``diff_b``) through resize and blend, in SD-family files.

A full module stays a full module (docs/FORMATS.md §4.4): resize keeps it bit for bit and says
so (it has no rank to cut, and the LoRA it could become has no place for ``diff_b``); blend sums
full deltas as a full delta and ``diff_b`` with the same weights. Files here are written from raw
tensors (a kohya LoRA with some modules replaced by full diffs, linear and 3×3 conv), and every
expected ΔW is a float64 oracle over those raw tensors, never loratools' readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.formats.adapters import Full
from loratools.formats.io import save_lora
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.ops.blend import FULL_SUMMED, blend
from loratools.ops.rank_rule import RankRule
from loratools.ops.resize import FULL_KEPT, resize, resize_module
from loratools.synthetic import TINY, make_lora

SPEC = TINY["sd1"]
ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "diff_b": "bias", "diff": "diff"}
# full diffs on modules that have a bias in SD 1.x: attention out, feed-forward, a resnet 3×3 conv
FULL_SUFFIXES = ("attn1_to_out_0", "ff_net_2", "resnets_0_conv1")


def _read(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f}


def _groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """File stem → {down, up, alpha, diff, bias}, by key suffixes alone."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next(s for s in ROLES if key.endswith("." + s))
        groups.setdefault(key[: -len(suffix) - 1], {})[ROLES[suffix]] = t
    return groups


def _delta(group: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW in float64 as a matrix (out, in·kh·kw): ``diff``, or ``alpha/r · up @ down``."""
    if "diff" in group:
        return group["diff"].double().reshape(group["diff"].shape[0], -1)
    down, up = group["down"].double(), group["up"].double()
    rank = down.shape[0]
    scale = float(group["alpha"]) / rank if "alpha" in group else 1.0
    return scale * up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)


def _truncate(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _is_full(stem: str) -> bool:
    return stem.endswith(FULL_SUFFIXES)


def _mixed(
    path: Path, *, seed: int, full: bool = True, lora: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A LyCORIS file in kohya names: full diffs (with diff_b) on the FULL_SUFFIXES modules, LoRA/LoCon
    on the rest (``lora=False``: those left out; ``full=False``: no full modules)."""
    tmp = path.with_suffix(".kohya.safetensors")
    save_lora(make_lora(SPEC, rank=4, conv=True, seed=seed, alphas="varied", dtype=dtype), tmp, "kohya")
    g = torch.Generator().manual_seed(seed + 100)
    raw = _read(tmp)
    groups = _groups(raw)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in raw.items():  # the kohya writer's key order
        stem = next(s for s in groups if key.startswith(s + "."))
        if _is_full(stem) and full:
            if f"{stem}.diff" not in tensors:
                shape = (groups[stem]["up"].shape[0], *groups[stem]["down"].shape[1:])
                tensors[f"{stem}.diff"] = (0.1 * torch.randn(*shape, generator=g)).to(dtype)
                tensors[f"{stem}.diff_b"] = (0.1 * torch.randn(shape[0], generator=g)).to(dtype)
        elif lora:
            tensors[key] = t
    tmp.unlink()
    save_tensors(path, tensors, {"ss_network_module": "lycoris.kohya"})
    return tensors


def test_resize_module_keeps_a_full_diff_as_it_is() -> None:
    adapter = Full(torch.randn(20, 30), torch.randn(20))
    resized, row = resize_module("full", adapter, RankRule(rank=1))
    assert resized is adapter
    assert (row.kind, row.old_rank, row.new_rank, row.unchanged, row.fro_kept) == ("full", None, None, True, 1.0)


@pytest.mark.parametrize("rule", [{"rank": 1}, {"sv_fro": 0.8}])
def test_resize_keeps_full_modules_bit_for_bit_and_truncates_the_rest(rule: dict, tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    before = _mixed(src, seed=1)
    report = resize(src, out, family=SPEC, **rule)
    after = _read(out)
    assert list(after) == list(before)  # full modules under their own keys, nothing dropped
    assert {k: t.dtype for k, t in after.items()} == {k: t.dtype for k, t in before.items()}
    new = _groups(after)
    full_stems = [s for s in _groups(before) if _is_full(s)]
    assert full_stems and any(len(new[s]["diff"].shape) == 4 for s in full_stems)
    for stem, group in _groups(before).items():
        if _is_full(stem):
            assert torch.equal(new[stem]["diff"], group["diff"]) and torch.equal(new[stem]["bias"], group["bias"])
            continue
        d_in, d_out = _delta(group), _delta(new[stem])
        k = int(torch.linalg.matrix_rank(d_out, rtol=1e-5))
        assert k == 1 if "rank" in rule else 1 <= k <= 4
        torch.testing.assert_close(d_out, _truncate(d_in, k), rtol=1e-4, atol=1e-6)
    rows = [m for m in report.modules if m.kind == "full"]
    assert len(rows) == len(full_stems)
    assert all(m.old_rank is None and m.new_rank is None and m.unchanged and m.fro_kept == 1.0 for m in rows)
    assert f"{len(full_stems)} {FULL_KEPT}" in report.warnings


def test_resize_of_an_all_full_file_writes_it_back_unchanged(tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    before = _mixed(src, seed=2, lora=False, dtype=torch.float16)
    report = resize(src, out, rank=2, family=SPEC)
    after = _read(out)
    assert list(after) == list(before) and all(torch.equal(after[k], t) for k, t in before.items())
    assert report.to_dict()["ranks_after"] == {"full": len(_groups(before))}


@pytest.mark.parametrize(("mode", "rule"), [("concat", {}), ("svd", {"rank": 2})])
def test_blend_sums_full_deltas_as_full_deltas_and_diff_b_with_the_same_weights(
    mode: str, rule: dict, tmp_path: Path
) -> None:
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    ta, tb = _mixed(a, seed=3, dtype=torch.float16), _mixed(b, seed=4, dtype=torch.float16)
    wa, wb = 0.7, -0.3
    report = blend([(a, wa), (b, wb)], out, mode=mode, family=SPEC, **rule)
    after = _read(out)
    ga, gb, new = _groups(ta), _groups(tb), _groups(after)
    assert list(after)[: len(ta)] == list(ta) if mode == "concat" else list(after) == list(ta)
    for stem in ga:
        want = wa * _delta(ga[stem]) + wb * _delta(gb[stem])
        if _is_full(stem):
            assert set(new[stem]) == {"diff", "bias"}  # still a full diff, its bias kept
            assert new[stem]["diff"].shape == ga[stem]["diff"].shape and new[stem]["diff"].dtype == torch.float16
            oracle = (wa * ga[stem]["bias"].double() + wb * gb[stem]["bias"].double()).to(torch.float16)
            torch.testing.assert_close(new[stem]["bias"], oracle, rtol=0, atol=0)
            torch.testing.assert_close(_delta(new[stem]), want.to(torch.float16).double(), rtol=0, atol=0)
        elif mode == "concat":
            torch.testing.assert_close(_delta(new[stem]), want, rtol=2e-3, atol=2e-4)  # fp16 factors
        else:
            torch.testing.assert_close(_delta(new[stem]), _truncate(want, 2), rtol=2e-2, atol=2e-3)
    full = [m for m in report.modules if m.kind == "full"]
    assert len(full) == sum(map(_is_full, ga)) and all(m.new_rank is None for m in full)
    assert (f"{len(full)} {FULL_SUMMED}" in report.warnings) == (mode == "svd")


@pytest.mark.parametrize("full_first", [True, False])
def test_blend_of_a_full_module_with_a_lora_one_is_their_exact_sum_as_a_full_diff(
    full_first: bool, tmp_path: Path
) -> None:
    """One input has a module as a full diff, the other as LoRA factors: the sum is dense, so the
    output module is a full diff (in either input order), diff_b the full input's, weighted."""
    full_path, lora_path, out = (
        tmp_path / "full.safetensors",
        tmp_path / "lora.safetensors",
        tmp_path / "out.safetensors",
    )
    tf, tl = _mixed(full_path, seed=5), _mixed(lora_path, seed=6, full=False)
    wf, wl = 1.5, 0.5
    pairs = [(full_path, wf), (lora_path, wl)]
    blend(pairs if full_first else pairs[::-1], out, family=SPEC)
    gf, gl, new = _groups(tf), _groups(tl), _groups(_read(out))
    assert set(new) == set(gl)  # in the first input's order
    for stem, group in gl.items():
        if _is_full(stem):
            assert set(new[stem]) == {"diff", "bias"}
            want = wf * gf[stem]["diff"].double().reshape(group["up"].shape[0], -1) + wl * _delta(group)
            torch.testing.assert_close(_delta(new[stem]), want.float().double(), rtol=0, atol=0)
            torch.testing.assert_close(new[stem]["bias"], wf * gf[stem]["bias"])
        else:
            want = (wf * _delta(gf[stem]) + wl * _delta(group)) if stem in gf else wl * _delta(group)
            torch.testing.assert_close(_delta(new[stem]), want, rtol=1e-5, atol=1e-7)


def test_cli_says_what_happened_to_full_modules(tmp_path: Path) -> None:
    """The warnings reach the terminal, and blend's summary names full modules (its rank sort read
    every rank as an int)."""
    src = tmp_path / "in.safetensors"
    _mixed(src, seed=7)
    runner = CliRunner()
    resized = runner.invoke(cli, ["resize", str(src), "--rank", "1", "-o", str(tmp_path / "r.safetensors")])
    assert resized.exit_code == 0, resized.output
    assert "full modules kept as they are" in " ".join(resized.output.split())
    blended = runner.invoke(
        cli,
        ["blend", str(src), f"{src}:-0.5", "--mode", "svd", "--rank", "1", "-o", str(tmp_path / "b.safetensors")],
    )
    assert blended.exit_code == 0, blended.output
    text = " ".join(blended.output.split())
    assert "full×" in text and "summed exactly as full diffs" in text


def test_convert_to_lora_says_what_happened_to_diff_b(tmp_path: Path) -> None:
    """``convert --to-lora`` makes full modules LoRA factors; their bias difference has no place
    there, so it must be kept beside them or named in a warning, never dropped unsaid."""
    from loratools.ops.convert import convert_lora

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _mixed(src, seed=8, lora=False)
    report = convert_lora(src, out, "kohya", family=SPEC, to_lora=True, rank=2)
    assert any(k.endswith(".diff_b") for k in _read(out)) or any("diff_b" in w for w in report.warnings)


def test_convert_to_lora_names_the_modules_whose_diff_b_it_drops(tmp_path: Path) -> None:
    """One warning: how many, the first five module names, "and N more"; and the CLI prints it."""
    from loratools.ops.convert import convert_lora

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    raw = _mixed(src, seed=9, lora=False)
    biased = [k for k in raw if k.endswith(".diff_b")]
    report = convert_lora(src, out, "kohya", family=SPEC, to_lora=True, rank=2)
    assert not any(k.endswith(".diff_b") for k in _read(out))
    dropped = [w for w in report.warnings if "diff_b" in w]
    assert len(dropped) == 1 and dropped[0].startswith(f"{len(biased)} full modules")
    assert f"and {len(biased) - 5} more" in dropped[0] and dropped[0].count("unet.") == 5
    result = CliRunner().invoke(
        cli, ["convert", str(src), str(tmp_path / "cli.safetensors"), "--to-lora", "--rank", "2"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"warning: {len(biased)} full modules' diff_b (bias difference) dropped by --to-lora" in text


@pytest.mark.parametrize("command", ["resize", "convert"])
def test_refusal_of_full_modules_names_the_convert_to_lora_command(command: str, tmp_path: Path) -> None:
    """diffusers has no full modules: the refusal's way out is a command that exists from where
    the user stands (resize has no --to-lora; `loratools convert … --to-lora` does)."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _mixed(src, seed=10)
    args = {"resize": ["resize", str(src), "--rank", "1", "-o", str(out)], "convert": ["convert", str(src), str(out)]}
    result = CliRunner().invoke(cli, [*args[command], "--to", "diffusers"])
    assert result.exit_code != 0 and not out.exists()
    text = " ".join(result.output.split())
    assert "diffusers cannot hold" in text and "full modules exactly" in text
    assert "`loratools convert … --to diffusers --to-lora --rank N`" in text and "--to kohya keeps them" in text


@pytest.mark.parametrize("command", ["resize", "blend"])
def test_json_tallies_full_modules_as_full_after_the_ranks(command: str, tmp_path: Path) -> None:
    """``ranks_after`` counts a full module under "full" (it was "None", read as a missing value),
    numeric ranks ascending before it, and the counts add up to the modules of the file."""
    src = tmp_path / "in.safetensors"
    _mixed(src, seed=11)
    groups = _groups(_read(src))
    out = str(tmp_path / "out.safetensors")
    args = {
        "resize": ["resize", str(src), "--sv-fro", "0.5", "-o", out, "--json"],
        "blend": ["blend", str(src), f"{src}:0.5", "--mode", "svd", "--rank", "2", "-o", out, "--json"],
    }[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    tally = data["ranks_after"]
    assert list(tally)[-1] == "full" and tally["full"] == sum("diff" in g for g in groups.values())
    numeric = [int(r) for r in list(tally)[:-1]]
    assert numeric == sorted(numeric) and sum(tally.values()) == len(groups)
