"""The census's layout cache (census/layouts.py) changes no row: cached rows equal the rows the
readers give each file afresh, and its key holds every metadata key the readers read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers_census import TEMPLATES, Variant, sparse_copy, write_corpus, write_templates
from helpers_scale import FakeHub, fake_hub, local_sockets  # noqa: F401  (fixtures)
from safetensors.torch import load_file

from loratools.census import read_rows, run_census
from loratools.census.layouts import CACHE, READER_METADATA_KEYS, MetadataRecorder, layout_key
from loratools.formats.kohya import read_kohya
from loratools.formats.peft import read_peft
from loratools.io.safetensors import read_header


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_templates(tmp_path_factory.mktemp("census-templates"))


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out)}


def _census(sources: list[str], out: Path, layout_cache: bool, **kwargs: Any) -> dict[str, dict[str, Any]]:
    CACHE.clear()
    summary = run_census(sources, str(out), restart=True, layout_cache=layout_cache, **kwargs)
    assert (summary.layout_hits > 0) == layout_cache and (summary.layout_misses > 0) == layout_cache
    return _rows(out)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_readers_read_no_metadata_key_outside_the_layout_key(name: str, templates: dict[str, Path]) -> None:
    """The readers, given a recording metadata mapping, look up only keys the layout key holds:
    a reader that starts reading another key makes this fail before the cache serves stale rows."""
    tensors = load_file(str(templates[name]))
    metadata = MetadataRecorder(read_header(templates[name]).metadata)
    reader = read_peft if name.startswith("diffusers") else read_kohya
    reader(tensors, metadata)
    assert metadata.read and set(metadata.read) <= set(READER_METADATA_KEYS)
    # the claim keys of docs/FORMATS.md §1.4 and diffusers' LoraConfig key, spelled out here
    assert set(READER_METADATA_KEYS) >= {"ss_base_model_version", "modelspec.architecture", "ss_v2"}
    assert "lora_adapter_metadata" in READER_METADATA_KEYS


def _pairs(folder: Path, templates: dict[str, Path]) -> None:
    """Files that share names, dtypes and shapes but differ in an input the readers read: the
    alpha values, the family claim, diffusers' LoraConfig alpha; and in what they do not."""
    folder.mkdir()
    kohya, diffusers = templates["kohya-sd1"], templates["diffusers-sd1"]
    cases: list[tuple[Path, dict[str, str], Variant]] = [
        (kohya, {}, Variant(alpha=1.0)),
        (kohya, {}, Variant(alpha=2.0)),
        (kohya, {"ss_base_model_version": "sdxl_base_v1-0"}, Variant(alpha=1.0)),
        (kohya, {"ss_base_model_version": "sdxl_v9"}, Variant(alpha=1.0)),
        (kohya, {"ss_v2": "True", "ss_base_model_version": ""}, Variant(alpha=1.0)),
        (kohya, {"ss_output_name": "other", "ss_training_started_at": "1700000000"}, Variant(alpha=1.0)),
        (kohya, {"ss_tag_frequency": json.dumps({"set": {"cat": 3}}), "ss_sd_model_name": "x"}, Variant(alpha=1.0)),
        (diffusers, {}, Variant(rank=16, alpha=16.0)),
        (diffusers, {}, Variant(rank=16, alpha=4.0)),
        (diffusers, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, Variant(rank=16, alpha=4.0)),
        (diffusers, {"lora_adapter_metadata": ""}, Variant(rank=16)),
    ]
    for i, (template, metadata, variant) in enumerate(cases):
        for alphas_first in (True, False):
            sparse_copy(template, folder / f"{i:02d}-{int(alphas_first)}.safetensors", metadata=metadata,
                        variant=variant, alphas_first=alphas_first)  # fmt: skip


@pytest.mark.parametrize("corpus", ["pairs", "hub-like"])
def test_cached_rows_equal_uncached(corpus: str, templates: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    if corpus == "pairs":
        _pairs(folder, templates)
    else:
        write_corpus(folder, templates, 40, hub_like=True, broken_every=7)
        write_corpus(folder, templates, 24, broken_every=0)  # the templates' own, twice each
    fresh = _census([str(folder)], tmp_path / "fresh.jsonl", layout_cache=False, processes=1)
    CACHE.clear()
    summary = run_census([str(folder)], str(tmp_path / "cached.jsonl"), restart=True, processes=1)
    cached = _rows(tmp_path / "cached.jsonl")
    assert cached == fresh
    assert summary.layout_hits > 0 and summary.layout_misses > 0
    assert summary.layout_hits + summary.layout_misses == sum(not r["problems"] for r in cached.values())
    if corpus == "pairs":  # the inputs that differ do show in the rows
        alphas = {json.dumps(r["alphas"], sort_keys=True) for r in cached.values()}
        claims = {r["metadata_claims"] for r in cached.values()}
        assert len(alphas) >= 4 and len(claims) >= 4


def test_a_file_flagging_embeddings_is_not_cached(templates: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    first = next(iter(read_header(templates["kohya-sd1"]).tensors))
    sparse_copy(templates["kohya-sd1"], path, metadata={first: "<embed>"})
    assert layout_key(read_header(path), path) is None
    sparse_copy(templates["kohya-sd1"], path)
    assert layout_key(read_header(path), path) is not None


def test_fake_hub_rows_equal_uncached(templates: dict[str, Path], fake_hub: FakeHub, tmp_path: Path) -> None:  # noqa: F811
    """Stand-ins of remote files (alphas read or not): the cache changes no row."""
    folder = tmp_path / "corpus"
    paths = write_corpus(folder, {k: templates[k] for k in ("kohya-sd1", "diffusers-sd1")}, 12, hub_like=False,
                         broken_every=5)  # fmt: skip
    for i, path in enumerate(paths):
        fake_hub.add(f"dana/lora-{i % 3}", path.name, path.read_bytes())
    for alphas in (False, True):
        fresh = _census(["hf://dana"], tmp_path / "fresh.jsonl", layout_cache=False, alphas=alphas)
        cached = _census(["hf://dana"], tmp_path / "cached.jsonl", layout_cache=True, alphas=alphas)
        strip = ("bytes_read", "requests")  # equal too, but counted per request
        assert {k: {f: v for f, v in r.items() if f not in strip} for k, r in cached.items()} == {
            k: {f: v for f, v in r.items() if f not in strip} for k, r in fresh.items()
        }
