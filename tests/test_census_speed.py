"""The census's fast paths say exactly what the plain ones said (issue 16: ≥ 200 files/s).

Speed lives in bench/bench_census.py; here each shortcut is checked against an independent
oracle: the safetensors library for headers, the per-name regex/substring rules they replace.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import KEYSETS, load_keyset
from helpers_census import TEMPLATES, census_row, write_templates
from safetensors import safe_open

from loratools.errors import CorruptFileError
from loratools.io.safetensors import read_header


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_templates(tmp_path_factory.mktemp("census-templates"))


def _raw_file(path: Path, table: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_read_header_agrees_with_the_safetensors_library(name: str, templates: dict[str, Path]) -> None:
    """Names, order by offset, dtypes, shapes, spans and metadata: as safetensors reads them."""
    header = read_header(templates[name])
    with safe_open(str(templates[name]), framework="np") as handle:
        assert set(header.tensors) == set(handle.keys())
        assert header.metadata == (handle.metadata() or {})
        for key, info in header.tensors.items():
            piece = handle.get_slice(key)
            assert (info.dtype, list(info.shape)) == (piece.get_dtype(), piece.get_shape())
    spans = [(i.start, i.end) for i in header.tensors.values()]
    assert spans == sorted(spans) and spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # the tensors tile the data section
    assert header.data_start + spans[-1][1] == templates[name].stat().st_size


@pytest.mark.parametrize("dtype", [["F16"], {"F16": 1}, 16, None])
def test_unhashable_or_foreign_dtype_is_a_problem_not_an_error(dtype: object, tmp_path: Path) -> None:
    """A hostile header whose dtype is a list or object: `dtype in ITEMSIZE` raised TypeError
    (the census row carried an error); now it is the one-line unknown-dtype refusal."""
    table = {"lora_unet_x.lora_down.weight": {"dtype": dtype, "shape": [1], "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "hostile.safetensors", table, b"\0\0")
    with pytest.raises(CorruptFileError, match="unknown dtype"):
        read_header(path)
    row = census_row(path)
    assert row["error"] is None and len(row["problems"]) == 1 and "unknown dtype" in row["problems"][0]


def test_zero_size_tensors_keep_their_file_order(tmp_path: Path) -> None:
    """Tensors sharing an offset (empty ones) stay in the header's order, as a stable sort kept them."""
    table = {
        "b": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
        "a": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
        "c": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
    }
    header = read_header(_raw_file(tmp_path / "empty.safetensors", table, b"\0\0"))
    assert list(header.tensors) == ["b", "a", "c"]


# --- verdict by names: one search over all names equals the per-name rule it replaced ------------
# The reference: the rules as they were written one name at a time (loratools before issue 16's
# speed work), restated here so the fast path is checked against the rule, not against itself.
_FLUX = re.compile(
    r"(^|[._])(single_transformer_blocks|double_blocks|single_blocks)([._]\d|$)|^lora_unet_(double|single)_blocks_"
)
_SD3 = re.compile(r"(^|[._])joint_blocks[._]\d")
_TB = re.compile(r"(^|[._])transformer_blocks[._]\d")
_UNET = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")
_LANGUAGE = re.compile(
    r"(^|\.)(roberta|bert|deberta|distilbert|electra|albert|xlm_roberta)\.(encoder|embeddings)\."
    r"|(^|\.)model\.layers\.\d+\.(self_attn|mlp)\.|(^|\.)transformer\.h\.\d+\.(attn|mlp)\."
    r"|(^|\.)model\.(decoder|encoder)\.layers\.\d+\.|(^|\.)(encoder|decoder)\.block\.\d+\.layer\.|(^|\.)lm_head$"
)


def _reference_family(names: list[str], widths: set[int]) -> str | None:
    if any(_FLUX.search(n) for n in names):
        return "flux1"
    if any(_SD3.search(n) for n in names):
        return "sd3"
    if any(_TB.search(n) and not _UNET.search(n) for n in names):
        return "sd3" if any("context_embedder" in n for n in names) or 3072 not in widths else "flux1"
    return "language-model" if any(_LANGUAGE.search(n) for n in names) else None


def _reference_is_flux(keys: list[str]) -> bool:
    double = ("add_q_proj", "to_add_out", "ff_context", "norm1_context")
    return any(
        "double_blocks" in k
        or "single_blocks" in k
        or "single_transformer_blocks" in k
        or ("transformer_blocks" in k and any(n in k for n in double))
        or "SelfAttention" in k
        or "DenseReluDense" in k
        for k in keys
    )


def _name_sets() -> list[tuple[str, list[str]]]:
    """Every component of the real key sets (as checkpoint keys and as module names, kohya-style
    too), the templates' keys, and hand-made edge cases: anchors, newlines, the SD3/FLUX.1 tie."""
    sets: list[tuple[str, list[str]]] = []
    for path in sorted(KEYSETS.glob("*.json.gz")):
        stem = path.name.removesuffix(".json.gz")
        for component, keys in load_keyset(stem)["components"].items():
            modules = [k.removesuffix(".weight") for k in keys]
            sets += [(f"{stem}/{component}", list(keys)), (f"{stem}/{component}/modules", modules)]
            sets.append((f"{stem}/{component}/kohya", ["lora_unet_" + m.replace(".", "_") for m in modules]))
    edge = [
        ["lora_unet_double_blocks_0_img_attn_proj"],
        ["x.double_blocks"],
        ["double_blocksx.1"],
        ["a\ndouble_blocks.1"],  # a newline inside a name: per-name path
        ["a.b\nlm_head"],
        ["lm_head"],
        ["model.lm_head", "unet.down_blocks.0.x"],
        ["transformer_blocks.0.attn"],
        ["transformer_blocks.0.attn", "context_embedder"],
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"],
        ["down_blocks.1.attentions.0.transformer_blocks.0.attn1", "transformer_blocks.3.ff_context"],
        ["xtransformer_blocks.0"],
        ["joint_blocks_3_x", "foo"],
        ["lora_unet_joint_blocks_0_x"],
        ["model.diffusion_model.joint_blocks.0.x"],
        ["xjoint_blocks.0", "model_layers.0.self_attn.q"],
        ["text_model.encoder.layers.0.self_attn", "model.encoder.layers.1.fc"],
        ["base_model.model.model.layers.3.self_attn.q_proj"],
        ["encoder.block.0.layer.0.SelfAttention.q"],
        [],
        [""],
    ]
    return sets + [(f"edge{i}", names) for i, names in enumerate(edge)]


def test_model_by_names_equals_the_per_name_rule(templates: dict[str, Path]) -> None:
    from loratools.formats.verdict import is_flux_lora, model_by_names

    sets = _name_sets() + [(name, list(read_header(p).tensors)) for name, p in templates.items()]
    assert len(sets) > 100  # 12 key sets × their components × 3 spellings, and more
    for name, names in sets:
        for widths in ({3072}, {320}):
            got = model_by_names(names, iter(widths))
            assert (got.family if got else None) == _reference_family(names, widths), name
        assert is_flux_lora(names) == _reference_is_flux(names), name


def test_layout_cache_keeps_metadata_flagged_embeddings_apart(tmp_path: Path) -> None:
    """Two headers with the same names, one whose metadata flags a key ``<embed>``: the cached
    per-layout facts must not carry one file's answer to the other (in either order)."""
    import torch

    from loratools.errors import InputError
    from loratools.formats.scan import scan_lora
    from loratools.io.safetensors import save_tensors

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{name}.lora_down.weight": torch.zeros(4, 320),
        f"{name}.lora_up.weight": torch.zeros(320, 4),
        f"{name}.alpha": torch.tensor(4.0),
        "mytoken": torch.zeros(1, 768),
    }
    flagged = tmp_path / "flagged.safetensors"
    plain = tmp_path / "plain.safetensors"
    save_tensors(flagged, tensors, {"mytoken": "<embed>"})
    save_tensors(plain, tensors, {})
    for path in (flagged, plain, flagged, plain):
        if path == flagged:
            scan = scan_lora(path)
            assert scan is not None and set(scan.embeddings) == {"mytoken"} and len(scan.modules) == 1
        else:
            with pytest.raises(InputError, match="unknown keys beside kohya ones: mytoken"):
                scan_lora(path)
