"""Files that look like LoRAs but are not: one line that says what they hold and what to do.

A Git LFS pointer saved under the weights' name, a full checkpoint or a VAE given where a LoRA is
expected, a LoRA given where a checkpoint is expected. Textual-inversion embeddings (every common
layout) are not refused here: :func:`.keys.is_embedding_key` names them and inspect shows them.
Torch-free: the verdicts come from the first bytes and the key names (docs/FAMILY.md §look-alikes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError

# git-lfs spec v1 (git-lfs/git-lfs: docs/spec.md): "version https://git-lfs.github.com/spec/v1",
# "oid sha256:<hex>", "size <bytes>", each on its own line, the whole pointer under 1024 bytes
LFS_VERSION = b"version https://git-lfs.github.com/spec/"
_LFS_SIZE = re.compile(rb"^size (\d+)$", re.M)

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model.")
# a bare VAE (LDM/SGM single file: encoder.down.0…, decoder.up.0…, quant_conv; diffusers
# AutoencoderKL: encoder.down_blocks.0…, decoder.up_blocks.0…, quant_conv)
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def lfs_pointer_message(path: str | os.PathLike[str]) -> str | None:
    """The verdict for a Git LFS pointer file (None if ``path`` is not one)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > 1024:
            return None
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return None
    if not head.startswith(LFS_VERSION):
        return None
    size = _LFS_SIZE.search(head)
    what = f"a {int(size.group(1)):,}-byte file" if size else "a file"
    return f"{path.name}: a Git LFS pointer to {what}, not the weights: fetch it with `git lfs pull`"


def check_not_lfs_pointer(path: str | os.PathLike[str]) -> None:
    """Raise the one-line verdict if ``path`` is a Git LFS pointer."""
    message = lfs_pointer_message(path)
    if message is not None:
        raise InputError(message, hint="the repository was cloned without git-lfs, or the file was never pulled")


def not_a_lora(name: str, keys: Iterable[str]) -> InputError | None:
    """A full checkpoint or a bare VAE where a LoRA is expected: the verdict (None otherwise)."""
    keys = list(keys)
    if not keys:
        return None
    checkpoint = sum(k.startswith(CHECKPOINT_PREFIXES) for k in keys)
    if checkpoint * 2 > len(keys):
        return InputError(
            f"{name}: a full Stable Diffusion checkpoint ({checkpoint} model weights such as {keys[0]}), not a LoRA",
            hint="did you swap the arguments? LoRA commands take the LoRA; merge takes the checkpoint first",
        )
    if all(k.startswith(VAE_ROOTS) for k in keys) and any(k.startswith("decoder.") for k in keys):
        return InputError(
            f"{name}: a VAE only ({len(keys)} encoder/decoder weights), not a LoRA",
            hint="load it as the pipeline's VAE; loratools works on LoRAs and full checkpoints",
        )
    return None


def flatten_embedding(obj: object) -> object:
    """An A1111 textual-inversion pickle (``{"string_to_param": {"*": tensor}, "name": …}``) as
    flat ``string_to_param.*`` tensors; anything else unchanged (AUTOMATIC1111
    modules/textual_inversion/textual_inversion.py (create_embedding_from_data))."""
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        return {f"string_to_param.{k}": v for k, v in obj["string_to_param"].items()}
    return obj


def lora_not_checkpoint(name: str) -> InputError:
    """A LoRA given where a checkpoint is expected."""
    return InputError(
        f"{name}: this is a LoRA, not a checkpoint; did you swap the arguments?",
        hint="merge takes the checkpoint first, then the LoRAs",
    )
