"""map_modules: order, errors, torch's thread count restored, and bits independent of workers."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from loratools.ops import parallel as parallel_ops
from loratools.ops.lowrank import RankRule
from loratools.ops.parallel import map_modules
from loratools.ops.resize import resize_lora
from loratools.synthetic import TINY, make_lora


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_in_item_order_with_progress(workers: int) -> None:
    ticks: list[int] = []
    assert map_modules(lambda x: x * x, list(range(50)), workers=workers, progress=ticks.append) == [
        x * x for x in range(50)
    ]
    assert ticks == [1] * 50


@pytest.mark.parametrize("workers", [1, 2])
def test_first_error_in_item_order_is_raised_and_threads_restored(workers: int) -> None:
    before = torch.get_num_threads()

    def fail_on_odd(x: int) -> int:
        if x % 2:
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 1"):
        map_modules(fail_on_odd, list(range(10)), workers=workers)
    assert torch.get_num_threads() == before


def test_workers_run_single_threaded_and_concurrently() -> None:
    seen: set[tuple[int, int]] = set()
    barrier = threading.Barrier(2, timeout=10)

    def record(_: int) -> None:
        seen.add((threading.get_ident(), torch.get_num_threads()))
        barrier.wait()  # both workers must be inside at once, or this times out

    map_modules(record, [0, 1], workers=2)
    assert len({ident for ident, _ in seen}) == 2 and {threads for _, threads in seen} == {1}


@pytest.mark.parametrize("rule", [RankRule(rank=2), RankRule(sv_fro=0.9)], ids=["rank", "sv_fro"])
def test_resize_bits_do_not_depend_on_worker_count(monkeypatch: pytest.MonkeyPatch, rule: RankRule) -> None:
    lora = make_lora(TINY["sdxl"], rank=6)
    parallel, _ = resize_lora(lora, rule)
    # resize_lora imports map_modules when it runs (the numpy path keeps torch out of resize's imports)
    monkeypatch.setattr(parallel_ops, "map_modules", functools.partial(map_modules, workers=1))
    serial, _ = resize_lora(lora, rule)
    for module, adapter in parallel.adapters.items():
        other = serial.adapters[module]
        assert torch.equal(adapter.up, other.up) and torch.equal(adapter.down, other.down), module
