"""A census row's layout facts, cached per exact header layout (issue 16: ≥ 200 files/s).

What ``inspect`` says of a LoRA's modules (format, family, counts per component, kinds, ranks,
alphas, dtypes, parameters, warnings) is a function of what its readers read: the tensors'
names, dtypes and shapes in file order, the values of its one-element tensors (the alphas), and
a few metadata keys — the family claim (:func:`loratools.formats.resolve.claimed_family`) and
diffusers' ``lora_adapter_metadata`` LoraConfig (:func:`loratools.formats.keys.configs_from_metadata`).
:func:`layout_key` digests exactly those inputs, so two files with one key get one set of facts
and a census describes each layout once, through the readers (one rule in one place), and
every other file of it from this cache. Metadata-derived fields that vary per file (training
summary, trigger words, hashes, base model) are never cached (:mod:`.facts`).

Files whose metadata flags a tensor as an embedding (safeloras' ``<embed>``, another input of
the scan) are not cached. ``tests/test_census_layouts.py`` checks the readers read no other
metadata key (a recording mapping) and that cached rows equal uncached ones.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..formats.keys import EMBED_FLAG, PEFT_METADATA_KEY
from ..formats.resolve import claimed_family
from ..io.safetensors import Header

SCALAR_BYTES = 8  # tensors this small are read into the key: every value a header scan can read
GAP = 4096  # scalars closer than this are read in one pread
MAX_LAYOUTS = 4096  # ~2 KB of facts each


class MetadataRecorder(dict[str, str]):
    """A metadata mapping that records the keys looked up in it (``get``, ``[]``, ``in``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.append(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.append(str(key))
        return super().__contains__(key)


def _claim_keys() -> tuple[str, ...]:
    # the keys claimed_family reads when nothing claims (it reads them all), asked of the
    # function itself so that its list stays the only one
    probe = MetadataRecorder()
    claimed_family(probe)
    return tuple(dict.fromkeys(probe.read))


# the metadata keys the header readers read (tests/test_census_layouts.py records them)
READER_METADATA_KEYS = (*_claim_keys(), PEFT_METADATA_KEY)


def scalar_bytes(header: Header, path: Path) -> bytes:
    """The stored bytes of every tensor of at most :data:`SCALAR_BYTES` (alphas), in file order,
    read with one ``pread`` per run of nearby ones."""
    spans = [(i.start, i.end) for i in header.tensors.values() if i.end - i.start <= SCALAR_BYTES]
    if not spans:
        return b""
    runs: list[list[tuple[int, int]]] = [[spans[0]]]
    for span in spans[1:]:  # header.tensors is in offset order
        if span[0] - runs[-1][-1][1] <= GAP:
            runs[-1].append(span)
        else:
            runs.append([span])
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for run in runs:
            base = run[0][0]
            block = os.pread(fd, run[-1][1] - base, header.data_start + base)
            out += [block[s - base : e - base] for s, e in run]
    finally:
        os.close(fd)
    return b"".join(out)


def layout_key(header: Header, path: Path) -> bytes | None:
    """The digest of everything the readers read from ``header``'s file (see the module doc);
    None when the file must not be served from the cache."""
    metadata: Mapping[str, str] = header.metadata
    if EMBED_FLAG in metadata.values():
        return None
    infos = header.tensors.values()
    inputs = (
        list(header.tensors),
        [i.dtype for i in infos],
        [i.shape for i in infos],
        scalar_bytes(header, path),
        [metadata.get(k) for k in READER_METADATA_KEYS],
    )
    return hashlib.blake2b(marshal.dumps(inputs), digest_size=32).digest()


class LayoutCache:
    """Layout facts by :func:`layout_key`, least recently used dropped first; counts hits."""

    def __init__(self, maxsize: int = MAX_LAYOUTS) -> None:
        self.maxsize = maxsize
        self.facts: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: bytes) -> dict[str, Any] | None:
        """A copy of the facts cached for ``key`` (the row owns its maps), or None."""
        with self.lock:
            facts = self.facts.get(key)
            if facts is None:
                self.misses += 1
                return None
            self.facts.move_to_end(key)
            self.hits += 1
        return {k: v.copy() if isinstance(v, dict | list) else v for k, v in facts.items()}

    def put(self, key: bytes, facts: dict[str, Any]) -> None:
        with self.lock:
            self.facts[key] = {k: v.copy() if isinstance(v, dict | list) else v for k, v in facts.items()}
            while len(self.facts) > self.maxsize:
                self.facts.popitem(last=False)

    def clear(self) -> None:
        """Forget every layout and the counts."""
        with self.lock:
            self.facts.clear()
            self.hits = self.misses = 0


CACHE = LayoutCache()  # per process: worker processes each fill their own
