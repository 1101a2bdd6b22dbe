"""cloneofsimo lora_diffusion formats: ``.pt`` lists placed by shapes, safeloras read and write."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import REAL_LORAS, needs_real
from safetensors import safe_open

from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats import cloneofsimo as c
from loratools.formats.adapters import LoHa, LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.formats.names import name_tables
from loratools.io.pickle import load_pickle
from loratools.synthetic import TINY, make_lora

CLONEOFSIMO = REAL_LORAS / "cloneofsimo_lora"

# file → (family, modules per component, rank, embeddings) as shared/real_loras/README.md lists them
REAL = {
    "lora_disney.pt": ("sd2", {"unet": 128}, 4, 0),
    "lora_illust.pt": ("sd2", {"unet": 128}, 4, 0),
    "lora_pop.pt": ("sd2", {"unet": 128}, 4, 0),
    "lora_kiriko.pt": ("sd2", {"unet": 128, "te1": 92}, 4, 0),  # its .text_encoder.pt companion comes along
    "lora_kiriko.text_encoder.pt": ("sd2", {"te1": 92}, 4, 0),
    "lora_kiriko2.text_encoder.pt": ("sd1", {"te1": 48}, 4, 0),
    "analog_svd_distill.text_encoder.pt": ("sd1", {"te1": 48}, 4, 0),
    "analog_svd_rank4.safetensors": ("sd1", {"unet": 144, "te1": 48}, 4, 0),
    "lora_disney.safetensors": ("sd1", {"unet": 144, "te1": 48}, 1, 2),
    "lora_disney_inpainting.safetensors": ("sd1", {"unet": 144, "te1": 48}, 1, 2),
}

real_files = needs_real("cloneofsimo_lora")


def _factors_equal(a: LoraFile, b: LoraFile) -> bool:
    if a.adapters.keys() != b.adapters.keys():
        return False
    for name, x in a.adapters.items():
        y = b.adapters[name]
        assert isinstance(x, LowRank) and isinstance(y, LowRank)
        if x.up.dtype != y.up.dtype or not torch.equal(x.up, y.up) or not torch.equal(x.down, y.down):
            return False
        if x.alpha != y.alpha:
            return False
    return True


def _pairs_of(path: Path, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if path.suffix == ".pt":
        return c._pairs_of_list(path.name, load_pickle(path))
    with safe_open(path, "pt") as handle:
        count = sum(1 for k in handle.keys() if k.startswith(f"{name}:")) // 2  # noqa: SIM118
        return [(handle.get_tensor(f"{name}:{i}:up"), handle.get_tensor(f"{name}:{i}:down")) for i in range(count)]


def _cloneofsimo_lora(spec, *, geglu: bool = True, text: bool = True, rank: int = 2, seed: int = 0) -> LoraFile:
    """A random LoRA over exactly lora_diffusion's targets, scale 1."""
    generator = torch.Generator().manual_seed(seed)
    shapes = name_tables(spec).modules
    modules = list(c.module_order(spec, "unet", "geglu-0.15" if geglu else "attention"))
    if text:
        modules += c.module_order(spec, "te1", "text")
    adapters = {}
    for name in modules:
        out, inp = shapes[name].shape
        up = torch.randn(out, rank, generator=generator) * 0.1
        down = torch.randn(rank, inp, generator=generator) * 0.1
        adapters[name] = LowRank(up, down, float(rank))
    return LoraFile(adapters, spec, "synthetic")


# --- real files -----------------------------------------------------------------------------------


@real_files
@pytest.mark.parametrize("name", list(REAL))
def test_real_files(name: str) -> None:
    family, components, rank, embeddings = REAL[name]
    lora = load_lora(CLONEOFSIMO / name)
    assert lora.source_format == "cloneofsimo"
    assert lora.family.name == family
    assert lora.components() == components
    assert lora.kinds == {"lora": sum(components.values())}
    assert {a.rank for a in lora.adapters.values()} == {rank}
    assert all(a.alpha == a.rank for a in lora.adapters.values())  # cloneofsimo: W + up @ down
    assert len(lora.embeddings) == embeddings


@real_files
def test_real_dtypes_and_embeddings() -> None:
    analog = load_lora(CLONEOFSIMO / "analog_svd_rank4.safetensors")
    assert {a.up.dtype for a in analog.adapters.values()} == {torch.float16}
    inpainting = load_lora(CLONEOFSIMO / "lora_disney_inpainting.safetensors")
    assert {a.up.dtype for a in inpainting.adapters.values()} == {torch.float16}
    assert set(inpainting.embeddings) == {"<s1>", "<s2>"}
    assert {(tuple(e.shape), e.dtype) for e in inpainting.embeddings.values()} == {((768,), torch.float32)}
    disney = load_lora(CLONEOFSIMO / "lora_disney.safetensors")
    assert {a.up.dtype for a in disney.adapters.values()} == {torch.float32}


@real_files
@pytest.mark.parametrize(
    ("name", "component", "order"),
    [
        ("lora_disney.pt", "unet", "attention"),
        ("lora_pop.pt", "unet", "attention"),
        ("lora_kiriko.text_encoder.pt", "te1", "text"),
        ("analog_svd_rank4.safetensors", "unet", "geglu-0.14"),
        ("lora_disney.safetensors", "unet", "geglu-0.14"),
        ("lora_disney_inpainting.safetensors", "unet", "geglu-0.14"),
        ("lora_disney.safetensors", "text_encoder", "text"),
    ],
)
def test_real_orders(name: str, component: str, order: str) -> None:
    """Which discovery order each real file was saved in (only one fits its shapes)."""
    pairs = _pairs_of(CLONEOFSIMO / name, component)
    match = c.match_order(pairs, [FAMILIES["sd1"], FAMILIES["sd2"]], ("unet", "te1"))
    assert match.order == order


@real_files
def test_textual_inversion_pt_is_refused() -> None:
    with pytest.raises(InputError, match="textual-inversion"):
        load_lora(CLONEOFSIMO / "lora_kiriko2.ti.pt")


@real_files
def test_unet_pt_companions(tmp_path: Path) -> None:
    shutil.copy(CLONEOFSIMO / "lora_disney.pt", tmp_path / "x.pt")
    assert load_lora(tmp_path / "x.pt").components() == {"unet": 128}
    shutil.copy(CLONEOFSIMO / "lora_kiriko.text_encoder.pt", tmp_path / "x.text_encoder.pt")
    lora = load_lora(tmp_path / "x.pt")
    assert lora.components() == {"unet": 128, "te1": 92}
    alone = load_lora(tmp_path / "x.text_encoder.pt")
    assert alone.components() == {"te1": 92}
    torch.save({"<tok>": torch.zeros(1024)}, tmp_path / "x.ti.pt")
    assert set(load_lora(tmp_path / "x.pt").embeddings) == {"<tok>"}
    # An SD1 text encoder beside an SD2 U-Net: a broken pair, said so.
    shutil.copy(CLONEOFSIMO / "lora_kiriko2.text_encoder.pt", tmp_path / "x.text_encoder.pt")
    with pytest.raises(InputError, match="companion"):
        load_lora(tmp_path / "x.pt")


@real_files
@pytest.mark.parametrize(
    "name", ["analog_svd_rank4.safetensors", "lora_disney_inpainting.safetensors", "lora_kiriko.pt"]
)
def test_real_round_trip(name: str, tmp_path: Path) -> None:
    source = load_lora(CLONEOFSIMO / name)
    out = save_lora(source, tmp_path / "out.safetensors", "cloneofsimo")
    back = load_lora(out)
    assert back.family.name == source.family.name
    assert _factors_equal(source, back)
    assert back.embeddings.keys() == source.embeddings.keys()
    for token, tensor in source.embeddings.items():
        assert back.embeddings[token].dtype == tensor.dtype and torch.equal(back.embeddings[token], tensor)


@real_files
@pytest.mark.parametrize(("name", "component"), [("lora_disney.pt", "unet"), ("lora_kiriko.text_encoder.pt", "te1")])
def test_pt_list_reproduces_real_file(name: str, component: str) -> None:
    original = load_pickle(CLONEOFSIMO / name)
    written = c.pt_list(load_lora(CLONEOFSIMO / name), component)
    assert len(written) == len(original)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(written, original, strict=True))


# --- synthetic lists: every order, refusals --------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("order", ["attention", "geglu-0.15", "geglu-0.14"])
def test_pt_orders(family: str, order: str, tmp_path: Path) -> None:
    spec = TINY[family]
    modules = c.module_order(spec, "unet", order)
    shapes = name_tables(spec).modules
    generator = torch.Generator().manual_seed(1)
    tensors = []
    for name in modules:
        out, inp = shapes[name].shape
        tensors += [torch.randn(out, 2, generator=generator), torch.randn(2, inp, generator=generator)]
    torch.save(tensors, tmp_path / "x.pt")
    lora = load_lora(tmp_path / "x.pt", family=spec)
    assert list(lora.adapters) == list(modules)
    for i, name in enumerate(modules):
        adapter = lora.adapters[name]
        assert isinstance(adapter, LowRank)
        assert adapter.up is not None and torch.equal(adapter.up, tensors[2 * i])
        assert torch.equal(adapter.down, tensors[2 * i + 1]) and adapter.alpha == 2.0


def test_order_details() -> None:
    spec = FAMILIES["sd1"]
    unet = c.module_order(spec, "unet", "geglu-0.15")
    assert len(unet) == 144 and len(c.module_order(spec, "unet", "attention")) == 128
    assert unet[0] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet[8] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert unet[-1].startswith("unet.mid_block.")  # the mid block is registered last
    assert c.module_order(spec, "unet", "geglu-0.14")[4].endswith("ff.net.0.proj")
    text = c.module_order(spec, "te1", "text")
    assert [n.rsplit(".", 1)[1] for n in text[:4]] == ["k_proj", "v_proj", "q_proj", "out_proj"]
    assert len(c.module_order(FAMILIES["sd2"], "te1", "text")) == 92  # the HF encoder's 23 layers


def test_pt_refusals(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    modules = c.module_order(spec, "unet", "attention")
    shapes = name_tables(spec).modules
    tensors = []
    for name in modules:
        out, inp = shapes[name].shape
        tensors += [torch.ones(out, 2), torch.ones(2, inp)]
    moved = tensors[-16:] + tensors[:-16]  # mid block first: shapes no longer fit
    torch.save(moved, tmp_path / "moved.pt")
    with pytest.raises(InputError, match="fit no lora_diffusion module order"):
        load_lora(tmp_path / "moved.pt", family=spec)
    torch.save(tensors[:-1], tmp_path / "odd.pt")
    with pytest.raises(InputError, match="pairs"):
        load_lora(tmp_path / "odd.pt", family=spec)
    torch.save([torch.ones(4, 2, 1, 1), torch.ones(2, 4, 3, 3)], tmp_path / "conv.pt")
    with pytest.raises(InputError, match="conv"):
        load_lora(tmp_path / "conv.pt", family=spec)


def test_ambiguous_orders_refused() -> None:
    spec = TINY["sd1"]
    twin = spec.scaled(name="sd1-twin", title="SD 1.x twin")
    shapes = name_tables(spec).modules
    pairs = [
        (torch.ones(shapes[n].shape[0], 1), torch.ones(1, shapes[n].shape[1]))
        for n in c.module_order(spec, "te1", "text")
    ]
    with pytest.raises(InputError, match="more than one"):
        c.match_order(pairs, [spec, twin], ("unet", "te1"))


# --- writing ----------------------------------------------------------------------------------------


def test_safeloras_round_trip_and_layout(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    lora = _cloneofsimo_lora(spec)
    lora.embeddings["<tok>"] = torch.randn(12)
    tensors, metadata = c.safeloras_state_dict(lora)
    c8 = spec.unet.model_channels
    assert tensors["unet:8:up"].shape == (8 * c8, 2)  # GEGLU ninth: the diffusers >= 0.15 order
    assert metadata["unet:0:rank"] == "2" and metadata["<tok>"] == "<embed>"
    assert metadata["text_encoder"] == '["CLIPAttention"]'
    path = save_lora(lora, tmp_path / "x.safetensors", "cloneofsimo")
    back = load_lora(path, family=spec)
    assert _factors_equal(lora, back)
    assert torch.equal(back.embeddings["<tok>"], lora.embeddings["<tok>"])
    for name, adapter in lora.adapters.items():
        assert torch.equal(adapter.delta(), back.adapters[name].delta())


def test_safeloras_dtype(tmp_path: Path) -> None:
    spec = TINY["sd2"]
    lora = _cloneofsimo_lora(spec, geglu=False)
    lora.embeddings["<tok>"] = torch.randn(16)
    back = load_lora(save_lora(lora, tmp_path / "x.safetensors", "cloneofsimo", dtype=torch.float16), family=spec)
    assert {a.up.dtype for a in back.adapters.values()} == {torch.float16}
    assert back.embeddings["<tok>"].dtype == torch.float32
    assert back.components() == lora.components()


def test_partial_lora_is_padded(tmp_path: Path) -> None:
    """lora_diffusion needs a pair for every module it finds: the missing ones are written as zeros."""
    spec = TINY["sd1"]
    full = _cloneofsimo_lora(spec, text=False)
    partial = full.with_adapters({n: a for n, a in full.adapters.items() if ".attn2.to_k" in n or ".attn2.to_v" in n})
    tensors, metadata = c.safeloras_state_dict(partial)
    assert len(tensors) == 2 * 128 and "GEGLU" not in metadata["unet"]
    back = load_lora(save_lora(partial, tmp_path / "x.safetensors", "cloneofsimo"), family=spec)
    assert _factors_equal(partial, back)
    assert any("all-zero" in w for w in back.warnings)


def test_pt_list_round_trip(tmp_path: Path) -> None:
    spec = TINY["sd2"]
    lora = _cloneofsimo_lora(spec)
    torch.save(c.pt_list(lora, "unet"), tmp_path / "x.pt")
    torch.save(c.pt_list(lora, "text_encoder"), tmp_path / "x.text_encoder.pt")
    back = load_lora(tmp_path / "x.pt", family=spec)
    assert _factors_equal(lora, back)


def test_scale_must_be_one_or_baked(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    lora = _cloneofsimo_lora(spec)
    lora = lora.with_adapters({n: LowRank(a.up, a.down, 0.5) for n, a in lora.adapters.items()})
    with pytest.raises(InputError) as caught:
        save_lora(lora, tmp_path / "x.safetensors", "cloneofsimo")
    assert "--bake" in caught.value.one_line() and "alpha" in caught.value.message
    baked = c.bake_scale(lora)
    assert all(a.alpha == a.rank for a in baked.adapters.values())
    back = load_lora(save_lora(baked, tmp_path / "x.safetensors", "cloneofsimo"), family=spec)
    for name, adapter in lora.adapters.items():
        torch.testing.assert_close(back.adapters[name].delta(), adapter.delta())
    tensors, _ = c.safeloras_state_dict(lora, bake=True)
    assert len(tensors) == 2 * len(lora.adapters)


def test_unrepresentable_refused(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    kohya_like = make_lora(spec, alpha=4.0)  # proj_in/out, ff.net.2, mlp: not lora_diffusion targets
    with pytest.raises(InputError, match="outside"):
        save_lora(kohya_like, tmp_path / "a.safetensors", "cloneofsimo")
    lora = _cloneofsimo_lora(spec, text=False)
    name = next(iter(lora.adapters))
    a = lora.adapters[name]
    assert isinstance(a, LowRank)
    dora = dict(lora.adapters)
    dora[name] = LowRank(a.up, a.down, a.alpha, dora_scale=torch.ones(a.up.shape[0]), dora_axis="out")
    with pytest.raises(InputError, match="DoRA"):
        c.safeloras_state_dict(lora.with_adapters(dora))
    loha = dict(lora.adapters)
    loha[name] = LoHa(a.up, a.down, a.up, a.down, a.alpha)
    with pytest.raises(InputError, match="loha"):
        c.safeloras_state_dict(lora.with_adapters(loha))
    with pytest.raises(InputError, match="SDXL"):
        c.safeloras_state_dict(LoraFile({}, TINY["sdxl"], "synthetic"))
    assert not (tmp_path / "a.safetensors").exists()


def _unplaced_pairs(tmp_path: Path, container: str) -> tuple[Path, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Five pairs of a tiny model no SD 1.x/2.x module order fits (24 × 12 widths, rank 2)."""
    generator = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(24, 2, generator=generator), torch.randn(2, 12, generator=generator)) for _ in range(5)]
    if container == "pt":
        path = tmp_path / "tiny.pt"
        torch.save([t for pair in pairs for t in pair], path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        tensors = {
            f"unet:{i}:{side}": t for i, pair in enumerate(pairs) for side, t in zip(("up", "down"), pair, strict=True)
        }
        save_file(tensors, str(path), {"unet": '["CrossAttention", "Attention"]'})
    return path, pairs


@pytest.mark.parametrize("container", ["pt", "safeloras"])
def test_pairs_of_an_unknown_model_are_read_not_refused(tmp_path: Path, container: str) -> None:
    """Issue 13: nothing readable is refused; the pairs are kept in order and act per pair."""
    from click.testing import CliRunner

    from loratools.cli.main import cli

    path, pairs = _unplaced_pairs(tmp_path, container)
    lora = load_lora(path)
    assert lora.family is None and lora.source_format == "cloneofsimo"
    assert lora.verdict.note.startswith("cloneofsimo, unknown model, 5 pairs")
    assert list(lora.adapters) == [f"unet:{i}" for i in range(5)]
    dense = [up @ down for up, down in pairs]
    runner = CliRunner()
    inspected = runner.invoke(cli, ["inspect", str(path)], catch_exceptions=False)
    assert inspected.exit_code == 0, inspected.output
    scaled = runner.invoke(cli, ["rescale", str(path), "--by", "0.5", "-o", str(tmp_path / "s.safetensors")])
    assert scaled.exit_code == 0, scaled.output
    back = load_lora(tmp_path / "s.safetensors")
    for i, reference in enumerate(dense):
        torch.testing.assert_close(back.adapters[f"unet:{i}"].delta(), 0.5 * reference)
    resized = runner.invoke(cli, ["resize", str(path), "--rank", "1", "-o", str(tmp_path / "r.safetensors")])
    assert resized.exit_code == 0, resized.output
    small = load_lora(tmp_path / "r.safetensors")
    for i, reference in enumerate(dense):
        u, s, vh = torch.linalg.svd(reference)
        torch.testing.assert_close(small.adapters[f"unet:{i}"].delta(), s[0] * torch.outer(u[:, 0], vh[0]))
