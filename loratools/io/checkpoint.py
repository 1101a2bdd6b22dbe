"""A checkpoint as a lazy name → tensor view over a single file or a diffusers folder.

Names are flat strings. A single file keeps its own key names. A diffusers folder's tensors are
named ``<subfolder>.<key>`` (``unet.conv_in.weight``, ``text_encoder.text_model…``), whatever the
number of shards behind each subfolder. Nothing is read until asked for, except pickles, which
cannot be read lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InputError
from .files import inside, regular_file
from .safetensors import SafetensorsFile, TensorInfo, dtype_name
from .source import PICKLE, Source, open_source
from .suffixes import PICKLE_SUFFIXES

if TYPE_CHECKING:
    import torch

# The diffusers pipeline subfolders holding weights, in pipeline order
# (huggingface/diffusers: pipelines' model_index.json for SD1/SD2/SDXL).
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")
# Weight file names, preferred first (diffusers utils/constants.py; transformers' model.safetensors).
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class _Slot:
    """Where one tensor of the view comes from."""

    source: SafetensorsFile | dict[str, torch.Tensor]
    key: str
    info: TensorInfo


@dataclass(repr=False)
class Checkpoint:
    """A lazy, read-only view of every tensor of a checkpoint."""

    path: Path
    container: str  # "single_file" or "diffusers"
    slots: dict[str, _Slot]
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # non-tensor entries of pickles
    # per weight file, the view's names in the file's own order, and the file's own metadata: what
    # a same-layout rewrite needs to give every file back as it was (a folder's files each have theirs)
    file_keys: dict[Path, list[str]] = field(default_factory=dict)
    file_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)
    _handles: list[SafetensorsFile] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.container}, {len(self.slots)} tensors)"

    # -- views ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.slots)

    def __contains__(self, name: object) -> bool:
        return name in self.slots

    def __iter__(self) -> Iterator[str]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def info(self, name: str) -> TensorInfo:
        return self.slots[name].info

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: slot.info.shape for name, slot in self.slots.items()}

    def read(self, name: str) -> torch.Tensor:
        slot = self.slots[name]
        if isinstance(slot.source, SafetensorsFile):
            return slot.source.read(slot.key)
        return slot.source[slot.key]

    def raw(self, name: str) -> tuple[SafetensorsFile, str] | None:
        """The open safetensors file and key holding this tensor, for byte-exact copies."""
        slot = self.slots[name]
        return (slot.source, slot.key) if isinstance(slot.source, SafetensorsFile) else None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.slots:
            yield name, self.read(name)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def nbytes(self) -> int:
        return sum(slot.info.nbytes for slot in self.slots.values())

    def close(self) -> None:
        for handle in self._handles:
            handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add_safetensors(ckpt: Checkpoint, path: Path, prefix: str) -> None:
    handle = SafetensorsFile(path)
    ckpt._handles.append(handle)
    ckpt.files.append(path)
    ckpt.file_keys[path] = names = []
    ckpt.file_metadata[path] = dict(handle.metadata)
    for key, info in handle.header.tensors.items():
        name = prefix + key
        if name in ckpt.slots:
            raise CorruptFileError(f"{path.name}: tensor {key!r} also appears in another shard")
        ckpt.slots[name] = _Slot(handle, key, info)
        names.append(name)


def _add_pickle(ckpt: Checkpoint, path: Path, prefix: str, source: Source | None = None) -> None:
    # an opened Source has unpickled the file already (to classify it): its object is reused
    from .pickle import load_pickle_raw, split_tensors, unwrap_state_dict  # only when a pickle is opened

    obj, wrapper = source.unpickled() if source is not None else unwrap_state_dict(load_pickle_raw(path))
    ckpt.dropped.extend(prefix + w for w in wrapper)
    if not isinstance(obj, dict):
        raise InputError(f"{path.name}: holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors, others = split_tensors(obj, path.name)
    ckpt.files.append(path)
    ckpt.dropped.extend(prefix + o for o in others)
    ckpt.file_keys[path] = [prefix + key for key in tensors]
    ckpt.file_metadata[path] = {}
    for key, tensor in tensors.items():  # split_tensors refused dtypes safetensors cannot hold
        ckpt.slots[prefix + key] = _Slot(tensors, key, TensorInfo(dtype_name(tensor.dtype), tuple(tensor.shape)))


def _add_weight_file(ckpt: Checkpoint, path: Path, prefix: str = "") -> None:
    if path.suffix == SAFETENSORS_SUFFIX:
        _add_safetensors(ckpt, path, prefix)
    elif path.suffix in PICKLE_SUFFIXES:
        _add_pickle(ckpt, path, prefix)
    else:
        _add_sniffed(ckpt, path, prefix)


def _add_source(ckpt: Checkpoint, source: Source) -> None:
    """A single file as :func:`open_source` told its kind (a pickle's object is reused)."""
    path = source.path
    if source.kind == PICKLE and (path.suffix in PICKLE_SUFFIXES or _pickle_magic(path)):
        _add_pickle(ckpt, path, "", source)
    else:  # what no reader can take gets the safetensors reader's message, as before
        _add_weight_file(ckpt, path)


def _add_sniffed(ckpt: Checkpoint, path: Path, prefix: str) -> None:
    if _pickle_magic(path):
        _add_pickle(ckpt, path, prefix)
    else:
        _add_safetensors(ckpt, path, prefix)


def _pickle_magic(path: Path) -> bool:
    """A zip (torch's format) or a protocol-2+ pickle, by its first bytes."""
    regular_file(path)
    with open(path, "rb") as fh:
        magic = fh.read(8)
    return magic[:2] == b"PK" or magic[:1] == b"\x80"


def component_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one diffusers component subfolder, sharded or not."""
    tag = f".{variant}" if variant else ""
    for stem in WEIGHT_NAMES:
        index = folder / f"{stem}{SAFETENSORS_SUFFIX}{tag}.index.json"
        if not index.exists():
            index = folder / f"{stem}{tag}{SAFETENSORS_SUFFIX}.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError):
                raise CorruptFileError(f"{index}: not a valid shard index") from None
            paths = [folder / s for s in shards]
            for p in paths:
                if not inside(p, folder):
                    raise CorruptFileError(f"{index}: shard {p.name!r} lies outside its folder")
                if not p.exists():
                    raise InputError(f"{index}: shard {p.name} is missing")
            return paths
        for suffix in (SAFETENSORS_SUFFIX, ".bin"):
            single = folder / f"{stem}{tag}{suffix}"
            if single.exists():
                return [single]
    return []


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").exists() or any(component_files(path / c) for c in DIFFUSERS_COMPONENTS)
    )


def open_checkpoint(path: str | os.PathLike[str] | Source, *, variant: str | None = None) -> Checkpoint:
    """Open a single-file checkpoint (.safetensors or a weights-only pickle) or a diffusers folder.

    ``path`` may be an ``hf://owner/repo/path[@revision]`` reference (see :mod:`loratools.io.hub`),
    or a :class:`~loratools.io.source.Source` already opened (a pickle is then not unpickled again).
    """
    source = open_source(path)
    path = source.path
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        ckpt = Checkpoint(path, "diffusers", {})
        for component in DIFFUSERS_COMPONENTS:
            for file in component_files(path / component, variant):
                _add_weight_file(ckpt, file, f"{component}.")
        if not ckpt.slots:
            raise InputError(
                f"{path}: folder holds no diffusers weights (expected unet/, text_encoder/ … with"
                " diffusion_pytorch_model.safetensors or model.safetensors)"
            )
        return ckpt
    ckpt = Checkpoint(path, "single_file", {})
    _add_source(ckpt, source)
    if ckpt._handles:
        ckpt.metadata = dict(ckpt._handles[0].metadata)
    if not ckpt.slots:
        raise InputError(f"{path.name}: holds no tensors")
    return ckpt
