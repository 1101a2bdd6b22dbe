"""A census row says what inspect says (header-only where inspect is); remote alphas are coalesced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import real_lora
from helpers_census import TEMPLATES, census_row, sparse_copy, write_corpus, write_templates
from helpers_scale import FakeHub, fake_hub, local_sockets

from loratools.census import read_rows, run_census
from loratools.census.remote import plan_reads
from loratools.io.headers import header_of
from loratools.report import inspect_lora

__all__ = ["fake_hub", "local_sockets"]
FACTS = ("format", "family", "metadata_claims", "family_mismatch", "modules", "components", "kinds", "ranks",
         "alphas", "parameters", "dtypes", "warnings", "metadata", "read")  # fmt: skip
REAL = [
    "catundchat_sd15/pytorch_lora_weights.safetensors",
    "cloneofsimo_lora/analog_svd_rank4.safetensors",
    "cloneofsimo_lora/lora_disney.safetensors",
    "cloneofsimo_lora/lora_disney_inpainting.safetensors",
    "lycoris_lokr/smart_falcon_4_lokr.safetensors",
    "lycoris_lokr/smart_falcon_8_lokr.safetensors",
    "lycoris_lokr/smart_falcon_16_lokr.safetensors",
]


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_templates(tmp_path_factory.mktemp("census-templates"))


def _same_as_inspect(path: Path) -> dict[str, Any]:
    """The census row of ``path``, checked against ``inspect``'s full report of it."""
    full = inspect_lora(path).to_dict()
    light = inspect_lora(path, loads_in=False, tree=False).to_dict()  # the census's call
    assert light == {**full, "loads_in": [], "tree": []}
    row = census_row(path)
    kept = ("format", "family", "metadata_claims", "family_mismatch", "modules", "components", "kinds", "ranks",
            "alphas", "parameters", "dtypes", "read")  # fmt: skip
    assert {k: row[k] for k in kept} == {k: full[k] for k in kept}
    assert list(row["ranks"]) == list(full["ranks"])  # rank order too
    assert row["warnings"] == list(full["warnings"])[:20] and row["problems"] == []
    assert row["training"] == full["metadata_summary"]["training"]
    return row


@pytest.mark.parametrize("name", REAL)
def test_real_loras_census_equals_inspect(name: str) -> None:
    path = real_lora(*name.split("/"))
    if not path.exists():
        pytest.skip(f"{name} not available (LORATOOLS_REAL_LORAS)")
    row = _same_as_inspect(path)
    # safeloras are read from their tensors (all-zero padding pairs dropped): not header-only
    assert (row["read"] == "tensors") == name.startswith("cloneofsimo_lora/")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("layout", ["dense", "sparse", "sparse-alphas-first"])
def test_generated_census_equals_inspect(name: str, layout: str, templates: dict[str, Path], tmp_path: Path) -> None:
    path = templates[name]
    if layout != "dense":
        path = tmp_path / f"{name}.safetensors"
        sparse_copy(templates[name], path, metadata={"ss_base_model_version": "sdxl_base_v1-0"},
                    alphas_first=layout.endswith("first"))  # fmt: skip
    row = _same_as_inspect(path)
    assert row["read"] == "header"
    if layout != "dense" and not name.endswith("sdxl"):  # the metadata claim is carried and compared
        assert row["family_mismatch"] is True


@pytest.mark.parametrize(
    ("slots", "budget", "expected"),
    [
        ([], 100, []),
        ([(10, 12), (12, 14), (14, 16)], 0, [(10, 16)]),  # together: one read
        ([(0, 2), (100, 102), (1000, 1002)], 0, [(0, 2), (100, 102), (1000, 1002)]),
        ([(0, 2), (100, 102), (1000, 1002)], 98, [(0, 102), (1000, 1002)]),  # the smallest gap first
        ([(0, 2), (100, 102), (1000, 1002)], 10_000, [(0, 1002)]),
        ([(1000, 1002), (0, 2), (0, 2)], 0, [(0, 2), (1000, 1002)]),  # unsorted, duplicated
    ],
)
def test_plan_reads(slots: list[tuple[int, int]], budget: int, expected: list[tuple[int, int]]) -> None:
    assert plan_reads(slots, budget) == expected


@pytest.mark.parametrize("alphas_first", [True, False])
def test_remote_alphas_coalesced(
    alphas_first: bool, templates: dict[str, Path], fake_hub: FakeHub, tmp_path: Path
) -> None:
    """Through the loopback hub: alphas stored together cost one request; interleaved ones, at
    most one per alpha; either way the row's alphas are inspect's."""
    path = tmp_path / "a.safetensors"
    sparse_copy(templates["kohya-sd1"], path, alphas_first=alphas_first)
    fake_hub.add("carol/lora", "a.safetensors", path.read_bytes())
    out = tmp_path / "facts.jsonl"
    run_census(["hf://carol/lora"], str(out), alphas=True)
    (row,) = read_rows(out)
    expected = inspect_lora(path).to_dict()
    assert row["alphas"] == expected["alphas"] and row["alphas_read"] is True and row["problems"] == []
    alphas = sum(k.endswith(".alpha") for k in header_of(path).tensors)
    header_requests = 1 if header_of(path).data_start <= 100_000 else 2
    if alphas_first:
        assert row["requests"] == header_requests + 1
    else:
        assert header_requests + 1 < row["requests"] <= header_requests + alphas
    assert row["bytes_read"] == fake_hub.bytes_served < path.stat().st_size


def test_worker_processes_rows_equal_in_process(
    templates: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches in worker processes give the rows one process gives (timings aside)."""
    import loratools.census.run as census_run

    monkeypatch.setattr(census_run, "PROCESS_MIN", 8)
    monkeypatch.setattr(census_run, "BATCH", 3)
    pools: list[int] = []

    class Counted(census_run.ProcessPoolExecutor):
        def __init__(self, workers: int, **kwargs: Any) -> None:
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(census_run, "ProcessPoolExecutor", Counted)
    folder = tmp_path / "corpus"
    write_corpus(folder, {k: templates[k] for k in ("kohya-sd1", "diffusers-sd1", "loha-sd1")}, 14, broken_every=4)
    rows = {}
    for processes in (1, 2):
        out = tmp_path / f"facts-{processes}.jsonl"
        summary = run_census([str(folder)], str(out), processes=processes, jobs=2)
        assert summary.files == 14 and summary.broken == 3
        rows[processes] = {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out)}
    assert rows[1] == rows[2] and pools == [2]


@pytest.mark.parametrize("key", ["emb_params", "<sks>"])
def test_embedding_only_file_is_an_embedding_row(key: str, tmp_path: Path) -> None:
    """inspect calls these ``textual-inversion``; the row's kind said ``lora`` before."""
    import torch

    from loratools.io.safetensors import save_tensors

    path = tmp_path / "emb.safetensors"
    save_tensors(path, {key: torch.zeros(2, 768)}, {})
    row = census_row(path)
    assert row["format"] == "textual-inversion" and row["kind"] == "embedding" and row["family"] == "sd1"
