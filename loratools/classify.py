"""Is a path a checkpoint or a LoRA? Told from headers (key names), never from the file name."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .families.detect import DIFFUSERS_PREFIXES, SINGLE_PREFIXES
from .formats.lookalike import check_not_lfs_pointer
from .io.checkpoint import is_diffusers_folder
from .io.files import regular_file
from .io.headers import header_of
from .io.source import Source, open_source


def classify(path: str | Path | Source) -> str:
    """``"checkpoint"`` or ``"lora"`` (``path`` may be an ``hf://`` reference, or an opened
    :class:`~loratools.io.source.Source`, whose unpickled object is then kept for the reader)."""
    source = open_source(path)
    path = source.path
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "adapter_config.json").exists() or any(
            (p / "adapter_config.json").exists() for p in path.iterdir() if p.is_dir()
        ):
            return "lora"
        if is_diffusers_folder(path):
            return "checkpoint"
        raise InputError(f"{path}: folder holds neither a diffusers model nor a peft adapter")
    check_not_lfs_pointer(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        keys = list(header_of(path).tensors)
        lora_markers = sum(map(_lora_marked, keys))
        # a key named like a LoRA factor is no checkpoint key even under a checkpoint's root: BFL-named
        # LoRAs (BFL's control LoRAs, ai-toolkit without a prefix) start with "double_blocks." too
        checkpoint_keys = sum(k.startswith(SINGLE_PREFIXES) and not _lora_marked(k) for k in keys)
        return "checkpoint" if checkpoint_keys > lora_markers else "lora"
    # pickles: a checkpoint is a dict with model keys; everything else is treated as a LoRA
    obj = source.unpickled()[0]
    if isinstance(obj, dict) and any(
        isinstance(k, str) and k.startswith(SINGLE_PREFIXES + DIFFUSERS_PREFIXES) for k in obj
    ):
        return "checkpoint"
    return "lora"


def _is_safetensors(path: Path) -> bool:
    regular_file(path)  # a FIFO or device would block or stream forever in open()/read()
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _lora_marked(key: str) -> bool:
    return "lora" in key or "hada_" in key or "lokr_" in key or ":" in key or key.endswith(".alpha")


def has_lora_keys(path: str | Path) -> bool:
    """Whether a local safetensors file holds tensors named like LoRA factors (header only).

    ``classify`` calls everything that is not a checkpoint a LoRA; this tells a real LoRA from a
    file that is neither (so "did you swap the arguments?" is only said of a real one). Pickles
    are not opened here: their reader names what they hold.
    """
    path = Path(path)
    if not path.is_file() or not (path.suffix == ".safetensors" or _is_safetensors(path)):
        return False
    return any(map(_lora_marked, header_of(path).tensors))
