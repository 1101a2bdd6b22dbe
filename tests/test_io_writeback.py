"""The streaming writer starts writeback as the file grows; the output bytes do not change."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from loratools.io import safetensors as st
from loratools.io.safetensors import StreamingWriter, TensorInfo


def test_writeback_is_started_per_chunk_and_output_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(st, "WRITEBACK_CHUNK", 4096)
    monkeypatch.setattr(st, "start_writeback", lambda fd, offset, n: calls.append((offset, n)))
    tensors = {f"t{i}": torch.full((1024,), float(i)) for i in range(8)}  # 4 KiB each
    plan = {}
    offset = 0
    for name in tensors:
        plan[name] = TensorInfo("F32", (1024,), offset, offset + 4096)
        offset += 4096
    out = tmp_path / "x.safetensors"
    with StreamingWriter(out, plan, {"a": "b"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    assert len(calls) == 8 and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))
    from safetensors.torch import load_file

    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_start_writeback_is_harmless_on_a_real_file(tmp_path: Path) -> None:
    import os

    from loratools.io.atomic import start_writeback

    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, b"x" * 10000)
        start_writeback(fd, 0, 10000)
    finally:
        os.close(fd)
    assert (tmp_path / "f").stat().st_size == 10000
