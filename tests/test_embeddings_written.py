"""Textual-inversion embeddings are never lost on write: one rule (formats/sidecar.py) for every writer.

FLUX.1 writers dropped them silently; rescale/resize/blend wrote the LoRA before finding out
that its sidecar could not be written. Checked against the raw tensors of the files written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect

from loratools.errors import LoratoolsError
from loratools.formats.io import load_lora
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.ops.blend import blend
from loratools.ops.convert import convert_lora
from loratools.ops.rescale import rescale
from loratools.ops.resize import resize
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]
# OneTrainer's FLUX.1 bundle keys (modules/modelSaver/flux/FluxLoRASaver.py, _get_state_dict)
EMBEDDINGS = {
    "bundle_emb.tok.clip_l": torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),
    "bundle_emb.tok.t5": torch.randn(2, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f}


def _source(tmp_path: Path, dialect: str) -> Path:
    src = tmp_path / "in.safetensors"
    save_tensors(src, {**flux_lora_dialect(SPEC, dialect), **EMBEDDINGS}, {})
    return src


def _ops(src: Path, out: Path, family: object, to: str = "kohya") -> dict[str, Callable[[], object]]:
    return {
        "rescale": lambda: rescale(src, out, 0.5, family=family),  # type: ignore[arg-type]
        "resize": lambda: resize(src, out, rank=1, family=family),  # type: ignore[arg-type]
        "blend": lambda: blend([(src, 1.0), (src, 0.5)], out, family=family),  # type: ignore[arg-type]
        "convert": lambda: convert_lora(src, out, to, family=family),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("op", ["rescale", "resize", "blend", "convert"])
@pytest.mark.parametrize(
    ("dialect", "family"),
    [
        ("kohya", None),
        ("kohya", SPEC),
        ("ai-toolkit", None),
        ("ai-toolkit", SPEC),
        ("xlabs", None),
        ("lycoris-full", None),
    ],
)
def test_flux_embeddings_survive_every_writer_bit_exact(op: str, dialect: str, family: object, tmp_path: Path) -> None:
    """FLUX.1 loaders refuse (diffusers, InvokeAI) or skip keys beside the modules, so the
    embeddings go beside the LoRA, bit for bit, dtype kept; the LoRA file holds none of them."""
    src, out = _source(tmp_path, dialect), tmp_path / "out.safetensors"
    # peft-named modules with no family map have no kohya name: converted within their dialect
    to = "diffusers" if (dialect, family) == ("ai-toolkit", None) else "kohya"
    report = _ops(src, out, family, to)[op]()
    sidecar = tmp_path / "out.embeddings.safetensors"
    assert sidecar.exists(), "FLUX.1 embeddings were dropped"
    written = _read(sidecar)
    assert written.keys() == EMBEDDINGS.keys()
    for key, tensor in EMBEDDINGS.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor)
    assert not any(k.startswith("bundle_emb.") for k in _read(out))
    warnings = report.warnings  # type: ignore[attr-defined]
    assert any("out.embeddings.safetensors" in w and "FLUX.1" in w for w in warnings)


def test_sd_kohya_keeps_them_in_file_and_diffusers_beside(tmp_path: Path) -> None:
    """The SD rule is unchanged: A1111's bundle form in kohya files, a sidecar for diffusers."""
    from loratools.formats.kohya import kohya_state_dict
    from loratools.synthetic import TINY, make_lora

    src = tmp_path / "in.safetensors"
    token = torch.randn(3, 32)
    save_tensors(src, {**kohya_state_dict(make_lora(TINY["sd1"], rank=2)), "<tok>": token}, {})
    rescale(src, tmp_path / "k.safetensors", 0.5, family=TINY["sd1"])
    assert torch.equal(_read(tmp_path / "k.safetensors")["bundle_emb.tok.string_to_param.*"], token)
    assert not (tmp_path / "k.embeddings.safetensors").exists()
    rescale(src, tmp_path / "d.safetensors", 0.5, to="diffusers", family=TINY["sd1"])
    assert torch.equal(_read(tmp_path / "d.embeddings.safetensors")["<tok>"], token)


@pytest.mark.parametrize("op", ["rescale", "resize", "blend", "convert"])
def test_an_existing_sidecar_is_refused_before_the_lora_is_written(op: str, tmp_path: Path) -> None:
    """rescale/resize/blend wrote the LoRA, then refused its sidecar: half an output was left."""
    src, out = _source(tmp_path, "ai-toolkit"), tmp_path / "out.safetensors"
    (tmp_path / "out.embeddings.safetensors").write_bytes(b"the user's embeddings")
    with pytest.raises(LoratoolsError, match="already exists"):
        _ops(src, out, None)[op]()
    assert not out.exists()
    assert (tmp_path / "out.embeddings.safetensors").read_bytes() == b"the user's embeddings"


def test_a_failed_sidecar_takes_the_new_lora_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA and its embeddings are one output: a sidecar that cannot be written removes the
    LoRA just written (rescale left it behind before)."""
    import loratools.io.safetensors as st

    real = st.save_tensors

    def failing(path: object, *args: object, **kwargs: object) -> object:
        if str(path).endswith(".embeddings.safetensors"):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    src, out = _source(tmp_path, "ai-toolkit"), tmp_path / "out.safetensors"
    monkeypatch.setattr(st, "save_tensors", failing)
    with pytest.raises(OSError, match="No space"):
        rescale(src, out, 0.5)
    assert not out.exists()


def test_read_back_the_embeddings_are_the_lora_s_again(tmp_path: Path) -> None:
    """The sidecar holds the embeddings under the names they were read by."""
    src, out = _source(tmp_path, "kohya"), tmp_path / "out.safetensors"
    rescale(src, out, 2.0, family=SPEC)
    assert set(load_lora(src, SPEC).embeddings) == set(_read(tmp_path / "out.embeddings.safetensors"))
