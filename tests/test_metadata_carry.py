"""LoRA metadata survives every conversion and describes the file written (issue 14, items 3-4).

On the real third-party LoRAs: a LyCORIS LoKr with full kohya ``ss_*`` metadata (resized to a plain
rank-4 LoRA first, so every dialect can hold it) goes A → B → A through every dialect pair and
comes back with the same metadata keys and values; a cloneofsimo safeloras file comes back with
its pair order. Metadata and hashes are read with the ``safetensors`` library and ``hashlib``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import needs_real, real_lora
from safetensors import safe_open
from safetensors.torch import load_file

from loratools.ops.convert import convert_lora
from loratools.ops.resize import resize

LOKR = ("lycoris_lokr", "smart_falcon_4_lokr.safetensors")
SAFELORAS = ("cloneofsimo_lora", "analog_svd_rank4.safetensors")
PLAIN = ("kohya", "diffusers", "peft")


def metadata(path: Path) -> dict[str, str]:
    file = path if path.is_file() else next(path.rglob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def resized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resized") / "r4.safetensors"
    resize(real_lora(*LOKR), out, rank=4)
    return out


@needs_real(*LOKR)
def test_resized_lokr_says_what_it_is(resized: Path) -> None:
    source, meta = metadata(real_lora(*LOKR)), metadata(resized)
    assert set(source) <= set(meta)  # nothing lost
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"
    args = json.loads(meta["ss_network_args"])
    assert "algo" not in args and args["conv_dim"] == "4"
    assert meta["ss_tag_frequency"] == source["ss_tag_frequency"]
    # sshs_* recomputed as sd-scripts does: sha256 of the data section
    raw = resized.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()


@needs_real(*LOKR)
@pytest.mark.parametrize("first", PLAIN)
@pytest.mark.parametrize("second", PLAIN)
def test_metadata_round_trips_through_every_dialect_pair(
    resized: Path, tmp_path: Path, first: str, second: str
) -> None:
    if first == second:
        pytest.skip("same dialect")
    suffix = {"peft": ""}
    start = tmp_path / f"a{suffix.get(first, '.safetensors')}"
    convert_lora(resized, start, first)
    middle = tmp_path / f"b{suffix.get(second, '.safetensors')}"
    convert_lora(start, middle, second)
    back = tmp_path / f"c{suffix.get(first, '.safetensors')}"
    convert_lora(middle, back, first)
    assert metadata(back) == metadata(start)
    training = {k: v for k, v in metadata(resized).items() if k.startswith("ss_") and k != "ss_network_args"}
    assert training.items() <= metadata(middle).items()  # the other dialect keeps the training metadata


@needs_real(*SAFELORAS)
def test_safeloras_rewrite_keeps_pair_order_and_metadata(tmp_path: Path) -> None:
    source = real_lora(*SAFELORAS)
    back = tmp_path / "back.safetensors"
    convert_lora(source, back, "cloneofsimo")
    before, after = load_file(str(source)), load_file(str(back))
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before), "pairs moved"
    assert metadata(back) == metadata(source)


@needs_real(*SAFELORAS)
@pytest.mark.parametrize("via", PLAIN)
def test_safeloras_metadata_survives_other_dialects(tmp_path: Path, via: str) -> None:
    """Through kohya/diffusers/peft and back nothing is lost (those writers may add their own keys;
    the pair order is a safeloras property the others do not hold, so it is the default order then)."""
    source = real_lora(*SAFELORAS)
    middle = tmp_path / ("m" if via == "peft" else "m.safetensors")
    convert_lora(source, middle, via)
    back = tmp_path / "back.safetensors"
    convert_lora(middle, back, "cloneofsimo")
    assert metadata(source).items() <= metadata(back).items()
