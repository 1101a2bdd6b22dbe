"""Full-size synthetic kohya (sd-scripts ``networks.lora``) LoRAs, derived from the family key maps.

Module list (docs/FORMATS.md §1.2): every Linear / 1×1 conv child of a U-Net Transformer2DModel
(``proj_in``, ``proj_out``; per transformer block ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``) and per text-encoder layer ``self_attn``
``q_proj``/``k_proj``/``v_proj``/``out_proj`` and ``mlp.fc1``/``mlp.fc2``. Nothing is typed by hand:
names and shapes come from :func:`loratools.families.keymap`.

Names: SD1/SD2 U-Net modules use the diffusers module path, SDXL U-Net modules the SGM path (what
sd-scripts trains on); text encoders use HF CLIP paths under ``lora_te`` (one encoder) or
``lora_te1``/``lora_te2``. Each module gets ``lora_down.weight`` (r, in[,1,1]), ``lora_up.weight``
(out, r[,1,1]) and a 0-dim ``alpha`` in the file dtype. The file is streamed tensor by tensor.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.families import FAMILIES, keymap
from loratools.families.spec import FamilySpec, Weight
from loratools.io.safetensors import StreamingWriter, TensorInfo, dtype_name

SINGLE_UNET_PREFIX = "model.diffusion_model."

# Module paths (relative to the U-Net / text encoder) that kohya's default LoRA targets.
_UNET_TARGET = re.compile(
    r"\.attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
_TE_TARGET = re.compile(
    r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$"
)

# ss_base_model_version values sd-scripts writes (docs/FORMATS.md §1.4).
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class LoraModule:
    """One targeted base-model module: its kohya name and base weight shape."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    component: str  # unet / te1 / te2
    shape: tuple[int, ...]  # base weight shape: (out, in) or (out, in, 1, 1)

    def tensors(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Key → shape of this module's three LoRA tensors."""
        out, fan_in, *kernel = self.shape
        return {
            f"{self.name}.alpha": (),
            f"{self.name}.lora_down.weight": (rank, fan_in, *kernel),
            f"{self.name}.lora_up.weight": (out, rank, *[1] * len(kernel)),
        }


def _unet_path(spec: FamilySpec, w: Weight) -> str:
    """The U-Net module path kohya names: diffusers for SD1/SD2, SGM for SDXL."""
    if spec.single_layout == "sgm":
        assert w.single is not None and w.single.startswith(SINGLE_UNET_PREFIX), w
        return w.single[len(SINGLE_UNET_PREFIX) :].rsplit(".", 1)[0]
    return w.module.split(".", 1)[1]


def kohya_modules(spec: FamilySpec) -> list[LoraModule]:
    """Every module a default kohya LoRA trains for this family, U-Net first then text encoders."""
    km = keymap(spec)
    te_prefix = {t.component: ("lora_te" if len(spec.texts) == 1 else f"lora_{t.component}") for t in spec.texts}
    # The HF encoder kohya trains has diffusers_layers layers (SD2 drops OpenCLIP's last block, §5.2).
    te_layers = {t.component: t.diffusers_layers for t in spec.texts}
    modules: list[LoraModule] = []
    for w in km.weights:
        if not w.canonical.endswith(".weight"):
            continue
        component, path = w.module.split(".", 1)
        if component == "unet" and _UNET_TARGET.search(path):
            name = "lora_unet_" + _unet_path(spec, w).replace(".", "_")
        elif component in te_prefix and (match := _TE_TARGET.match(path)) and int(match[1]) < te_layers[component]:
            name = f"{te_prefix[component]}_{path.replace('.', '_')}"
        else:
            continue
        if len(w.shape) == 4 and w.shape[2:] != (1, 1):
            raise AssertionError(f"{w.canonical}: kohya's default targets are Linear or 1x1 conv, got {w.shape}")
        modules.append(LoraModule(name, component, w.shape))
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise AssertionError(f"{spec.name}: duplicate kohya module names")
    return modules


def lora_plan(modules: list[LoraModule], rank: int, dtype: torch.dtype) -> dict[str, TensorInfo]:
    """Key → dtype/shape for the whole file, keys sorted as safetensors' own writer sorts them."""
    plan: dict[str, TensorInfo] = {}
    for m in modules:
        for key, shape in m.tensors(rank).items():
            plan[key] = TensorInfo(dtype_name(dtype), shape)
    return dict(sorted(plan.items()))


def _value(key: str, shape: tuple[int, ...], rank: int, alpha: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    if key.endswith(".alpha"):
        return torch.tensor(alpha, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    # kaiming-ish down, small up: the delta stays small like a trained LoRA's.
    std = 1.0 / shape[1] ** 0.5 if ".lora_down." in key else 0.01
    return (values * std).to(dtype)


def write_kohya_lora(
    family: str | FamilySpec,
    path: str | Path,
    *,
    rank: int,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a full-size synthetic kohya LoRA for ``family`` (``"sd1"``, ``"sd2"``, ``"sdxl"``).

    ``alpha`` defaults to ``rank / 2`` (scale 0.5) so a consumer that ignores alpha is caught.
    """
    spec = FAMILIES[family] if isinstance(family, str) else family
    alpha = rank / 2 if alpha is None else alpha
    modules = kohya_modules(spec)
    plan = lora_plan(modules, rank, dtype)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": _BASE_VERSION[spec.name],
        "ss_v2": str(spec.name == "sd2"),
        "loratools_synthetic": "bench/synth_lora.py",
    }
    path = Path(path)
    with StreamingWriter(path, plan, metadata, overwrite=overwrite) as writer:
        for key, info in plan.items():
            writer.write(key, _value(key, info.shape, rank, alpha, dtype, seed))
    return path


def module_counts(family: str) -> dict[str, int]:
    """Targeted modules per component (SD1: unet 192, te1 72; SDXL: unet 722, te1 72, te2 192)."""
    counts: dict[str, int] = {}
    for m in kohya_modules(FAMILIES[family]):
        counts[m.component] = counts.get(m.component, 0) + 1
    return counts
