"""LoRA metadata through every writer: what is carried, what is rewritten to describe the file.

One rule for every dialect: a source's metadata is carried whole, except the keys that describe
the *source dialect's* structure (its writer rebuilds them from the tensors): diffusers/peft
``lora_adapter_metadata`` and their ``format: pt``, cloneofsimo's component target lists and
``N:rank`` entries. Then the kohya network keys (``ss_network_module``/``dim``/``alpha``/``args``)
are set to what the written adapters are, and ``sshs_*`` hashes are recomputed for the tensors as
written, the way sd-scripts does on save (kohya-ss/sd-scripts: library/train_util.py
``precalculate_safetensors_hashes``; networks/resize_lora.py sets ``Dynamic`` for dynamic ranks).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..io.safetensors import TensorInfo, dtype_name, tensor_bytes
from .adapters import LoraFile, low_rank
from .keys import EMBED_FLAG, PEFT_METADATA_KEY

if TYPE_CHECKING:
    import torch

STRUCTURE_KEYS = {
    "diffusers": {PEFT_METADATA_KEY},
    "peft": {PEFT_METADATA_KEY},
    "cloneofsimo": {"unet", "text_encoder", "text_encoder_2"},
}
LEGACY_OFFSET = 0x100000  # ops/hashes.py: the 64 KiB window at 1 MiB (A1111 / kohya legacy hash)
LEGACY_LENGTH = 0x10000


def carried_metadata(lora: LoraFile) -> dict[str, str]:
    """The source's metadata minus the keys its own dialect's structure made."""
    drop = STRUCTURE_KEYS.get(lora.source_format, set())
    out = {}
    for key, value in lora.metadata.items():
        if key in drop or value == EMBED_FLAG:
            continue
        if key == "format" and value == "pt" and lora.source_format in ("diffusers", "peft"):
            continue  # diffusers' writer puts it there; every writer that wants it adds it again
        out[key] = value
    return out


def _fmt(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(float(value))


def describe_network(meta: dict[str, str], lora: LoraFile) -> dict[str, str]:
    """Set the kohya network keys in ``meta`` to what ``lora`` holds (module, dim, alpha, args)."""
    plain = lora.only_plain_lora()
    low = [a for a in lora.adapters.values() if low_rank(a)]
    linear = [a for a in low if a.down.dim() == 2]
    conv = [a for a in low if a.form == "locon"]  # a kernel other than 1×1: kohya's conv_dim
    ranks = Counter(a.rank for a in (linear or low))
    alphas = Counter(a.alpha for a in (linear or low))
    if ranks:
        meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        meta["ss_network_alpha"] = _fmt(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    if plain:
        was_lycoris = meta.get("ss_network_module", "networks.lora") != "networks.lora"
        meta["ss_network_module"] = "networks.lora"
        args: dict[str, str] = {}
        try:
            old = json.loads(meta.get("ss_network_args", "{}"))
        except ValueError:
            old = {}
        if isinstance(old, dict) and not was_lycoris:
            args = {k: str(v) for k, v in old.items() if k not in ("conv_dim", "conv_alpha", "conv_rank", "algo")}
        if conv:
            conv_ranks = Counter(a.rank for a in conv)
            conv_alphas = Counter(a.alpha for a in conv)
            args["conv_dim"] = str(next(iter(conv_ranks))) if len(conv_ranks) == 1 else "Dynamic"
            args["conv_alpha"] = _fmt(next(iter(conv_alphas))) if len(conv_alphas) == 1 else "Dynamic"
        if args:
            meta["ss_network_args"] = json.dumps(args)
        else:
            meta.pop("ss_network_args", None)
    else:
        meta["ss_network_module"] = "lycoris.kohya"
        kinds = {k.removesuffix("+dora") for k in lora.kinds}
        algo = {"lora": "locon", "loha": "loha", "lokr": "lokr", "full": "full", "dora": "locon"}
        algos = sorted({algo.get(k, k) for k in kinds} - {"locon"}) or ["locon"]
        try:
            args = json.loads(meta.get("ss_network_args", "{}"))
        except ValueError:
            args = {}
        args = args if isinstance(args, dict) else {}
        args["algo"] = algos[0] if len(algos) == 1 else ",".join(algos)
        meta["ss_network_args"] = json.dumps(args)
    return meta


def with_hashes(meta: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Recompute ``sshs_model_hash`` / ``sshs_legacy_hash`` for ``tensors`` written in this order,
    when the file carries kohya training metadata (sd-scripts writes them on every save)."""
    infos = {name: TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
    return with_byte_hashes(meta, infos, (tensor_bytes(t.contiguous()) for t in tensors.values()))


def with_byte_hashes(
    meta: dict[str, str], infos: Mapping[str, TensorInfo], chunks: Iterable[bytes | memoryview]
) -> dict[str, str]:
    """The rule of :func:`with_hashes` over raw bytes (``chunks``: each tensor's data, in the order
    of ``infos``; the numpy path writes bytes): ``sshs_model_hash`` is the SHA-256 of the data
    section, ``sshs_legacy_hash`` that of the 64 KiB window at 1 MiB of a file holding only the
    ``ss_`` metadata, as sd-scripts computes them."""
    if not any(k.startswith(("ss_", "sshs_")) for k in meta):
        return meta
    table: dict[str, object] = {}
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    if ss:
        table["__metadata__"] = ss
    offset = 0
    for name, info in infos.items():
        table[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    length = len(json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    start = LEGACY_OFFSET - 8 - (length + (-(8 + length) % 8))  # the window inside the data section
    data = hashlib.sha256()
    window = bytearray()
    position = 0
    for raw in chunks:
        data.update(raw)
        lo, hi = max(start, position), min(start + LEGACY_LENGTH, position + len(raw))
        if start >= 0 and hi > lo:
            window += bytes(raw[lo - position : hi - position])
        position += len(raw)
    meta["sshs_model_hash"] = data.hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(bytes(window)).hexdigest()[:8]
    return meta
