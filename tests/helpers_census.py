"""Generated census corpora: LoRA files of real families and formats at full-size shapes, written
*sparse* — the real header and alpha scalars, the factors a hole — so 10⁴ of them cost their
headers on disk, not gigabytes. Shared by tests/test_census_fast.py and bench/bench_census.py."""

from __future__ import annotations

import json
import math
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratools.families import FAMILIES
from loratools.formats.adapters import LoraFile
from loratools.formats.io import save_lora
from loratools.io.safetensors import read_header
from loratools.synthetic import make_lora

SCALAR_BYTES = 8  # tensors this small (alphas, 0-dim scalars) are copied; the rest is a hole
# ranks as hub LoRAs have them (sd-scripts network_dim presets, diffusers' common r)
HUB_RANKS = (16, 24, 32, 48, 64, 96, 128)
_PACK = {"F16": "<e", "F32": "<f", "F64": "<d"}
# the rank axis of each LoRA factor: down/A are (rank, in, …), up/B are (out, rank, …)
_RANK_AXIS = {"lora_down.weight": 0, "lora_A.weight": 0, "lora_up.weight": 1, "lora_B.weight": 1}
_TEXT_PREFIXES = ("lora_te", "text_encoder")


@dataclass(frozen=True)
class Variant:
    """How one corpus file differs from its template, as hub files of one trainer differ: another
    rank for the plain LoRA factors, another alpha for every module, the text encoders dropped."""

    rank: int | None = None  # None: the template's
    alpha: float | None = None  # None: the template's alphas
    unet_only: bool = False

    def keeps(self, key: str) -> bool:
        return not (self.unet_only and key.startswith(_TEXT_PREFIXES))

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.rank is None:
            return shape
        for suffix, axis in _RANK_AXIS.items():
            if key.endswith("." + suffix):
                return (*shape[:axis], self.rank, *shape[axis + 1 :])
        return shape

    def scalar(self, key: str, dtype: str, raw: bytes) -> bytes:
        if self.alpha is None or not key.endswith(".alpha") or dtype not in _PACK:
            return raw
        return struct.pack(_PACK[dtype], self.alpha)

    def metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """The template's metadata saying this variant's rank/alpha (the readers check a peft
        config's ``r`` against the factors)."""
        out = dict(metadata)
        if self.rank is not None and "ss_network_dim" in out:
            out["ss_network_dim"] = str(self.rank)
        if self.alpha is not None and "ss_network_alpha" in out:
            out["ss_network_alpha"] = f"{self.alpha:g}"
        if "lora_adapter_metadata" in out:
            config = json.loads(out["lora_adapter_metadata"])
            for key in list(config):
                if key.endswith(".r") and self.rank is not None:
                    config[key] = self.rank
                elif key.endswith(".lora_alpha") and self.alpha is not None:
                    config[key] = self.alpha
            if self.unet_only:
                config = {k: v for k, v in config.items() if not k.startswith(_TEXT_PREFIXES)}
            out["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
        return out


def hub_variant(i: int) -> Variant:
    """File ``i``'s variant in a hub-like corpus: a rank of :data:`HUB_RANKS`, alpha = rank,
    rank/2 or 1, a third of the files U-Net only — drawn from ``i`` (the corpus is reproducible)."""
    rng = random.Random(i)
    rank = rng.choice(HUB_RANKS)
    return Variant(rank, rng.choice((float(rank), rank / 2, 1.0)), rng.random() < 1 / 3)


def _subset_kind(kind: str) -> Callable[[], LoraFile]:
    def make() -> LoraFile:
        from helpers_check import subset, with_kind

        return with_kind(subset(FAMILIES["sd1"], rank=4), kind, modules=6)

    return make


# name → (how to make the LoraFile, the format save_lora writes)
TEMPLATES: dict[str, tuple[Callable[[], LoraFile], str]] = {
    "kohya-sd1": (lambda: make_lora(FAMILIES["sd1"], rank=8, alphas="varied", dtype=torch.float16), "kohya"),
    "kohya-sdxl": (lambda: make_lora(FAMILIES["sdxl"], rank=4, dtype=torch.float16), "kohya"),
    "kohya-sd2": (lambda: make_lora(FAMILIES["sd2"], rank=4, dtype=torch.float16), "kohya"),
    "locon-sd1": (lambda: make_lora(FAMILIES["sd1"], rank=4, conv=True, dtype=torch.float16), "kohya"),
    "diffusers-sd1": (lambda: make_lora(FAMILIES["sd1"], rank=4, alpha=4.0, dtype=torch.float16), "diffusers"),
    "diffusers-sdxl": (lambda: make_lora(FAMILIES["sdxl"], rank=4, alpha=4.0, dtype=torch.float16), "diffusers"),
    "loha-sd1": (_subset_kind("loha"), "kohya"),
    "lokr-sd1": (_subset_kind("lokr"), "kohya"),
}


def write_templates(folder: Path, names: list[str] | None = None) -> dict[str, Path]:
    """One real (dense) file per template, written once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or list(TEMPLATES):
        path = folder / f"template-{name}.safetensors"
        if not path.exists():
            make, fmt = TEMPLATES[name]
            save_lora(make(), path, fmt, overwrite=True)
        out[name] = path
    return out


def sparse_copy(
    template: Path,
    dest: Path,
    *,
    metadata: dict[str, str] | None = None,
    alphas_first: bool = False,
    variant: Variant | None = None,
) -> int:
    """Write ``dest``: ``template``'s tensors (names, dtypes, shapes), its metadata updated with
    ``metadata``, the scalars' bytes copied and every other tensor a hole. ``alphas_first``
    stores the scalars together at the start of the data section (a valid layout; kohya's own
    interleaves them with the factors). ``variant``: another rank/alpha/targets than the
    template's. Returns the file size."""
    header = read_header(template)
    variant = variant or Variant()
    order = [(k, i) for k, i in header.tensors.items() if variant.keeps(k)]
    if alphas_first:
        order.sort(key=lambda kv: kv[1].end - kv[1].start > SCALAR_BYTES)  # stable: scalars first
    table: dict[str, object] = {"__metadata__": {**variant.metadata(header.metadata), **(metadata or {})}}
    spans: list[tuple[int, int, int, str, str]] = []  # (new start, old start, nbytes, key, dtype) of scalars
    offset = 0
    for key, info in order:
        shape = variant.shape(key, info.shape)
        nbytes = (info.end - info.start) // max(1, math.prod(info.shape)) * math.prod(shape)
        table[key] = {"dtype": info.dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        if nbytes <= SCALAR_BYTES:
            spans.append((offset, info.start, nbytes, key, info.dtype))
        offset += nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    fd_in = os.open(template, os.O_RDONLY)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, len(raw).to_bytes(8, "little") + raw)
        os.ftruncate(fd, start + offset)
        values = [
            variant.scalar(key, dtype, os.pread(fd_in, n, header.data_start + old)) for _, old, n, key, dtype in spans
        ]
        if alphas_first and spans:  # one contiguous block
            os.pwrite(fd, b"".join(values), start + spans[0][0])
        else:
            for (new, *_), value in zip(spans, values, strict=True):
                os.pwrite(fd, value, start + new)
    finally:
        os.close(fd)
        os.close(fd_in)
    return start + offset


def write_corpus(
    folder: Path,
    templates: dict[str, Path],
    files: int,
    *,
    broken_every: int = 50,
    alphas_first: bool = True,
    hub_like: bool = False,
) -> list[Path]:
    """``files`` sparse LoRAs cycling through ``templates`` (each with its own ``ss_output_name``,
    so no two headers are equal), scalars stored first unless not ``alphas_first``; every ``broken_every``-th file is
    instead a truncated header, a Git LFS pointer or a ``.pt`` pickle name (never opened).
    ``hub_like``: each file also a :func:`hub_variant` of its template (ranks 16–128, varied
    alphas and targets), so key layouts repeat as they do on a hub, not once per template."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(templates)
    out = []
    for i in range(files):
        if broken_every and i % broken_every == broken_every - 1:
            kind = (i // broken_every) % 3
            if kind == 0:
                path = folder / f"{i:06d}-truncated.safetensors"
                path.write_bytes(templates[names[0]].read_bytes()[:4096])
            elif kind == 1:
                path = folder / f"{i:06d}-pointer.safetensors"
                path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
            else:
                path = folder / f"{i:06d}-pickle.pt"
                path.write_bytes(b"\x80\x04N.")
        else:
            name = names[i % len(names)]
            path = folder / f"{i:06d}-{name}.safetensors"
            variant = hub_variant(i) if hub_like else None
            sparse_copy(templates[name], path, metadata={"ss_output_name": f"lora-{i}"}, alphas_first=alphas_first,
                        variant=variant)  # fmt: skip
        out.append(path)
    return out


def census_row(path: Path) -> dict[str, Any]:
    """The census row of one local file, as ``loratools census`` describes it."""
    from loratools.census.facts import describe, empty_row
    from loratools.census.sources import Entry

    st = path.stat()
    entry = Entry("local", f"{st.st_size}:{st.st_mtime_ns}", str(path), st.st_size)
    return describe(entry, path, empty_row(entry))
