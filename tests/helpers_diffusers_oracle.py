"""diffusers (with peft and transformers) as an oracle: the tiny pipelines, loading, fusing and
reading back what landed; shared by tests/test_diffusers_lora_oracle.py and
tests/test_check_diffusers_oracle.py. Import it only after ``pytest.importorskip("diffusers")``."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import REAL_LORAS
from peft.tuners.lora import LoraLayer
from safetensors import torch as safetensors_torch

from loratools.families.spec import DIFFUSERS_FOLDERS
from loratools.formats.names import name_tables
from loratools.synthetic import TINY

RTOL, ATOL = 1e-5, 1e-6
UNIFORM_ALPHA = 2.0
RANK = 4
CATUNDCHAT = REAL_LORAS / "catundchat_sd15" / "pytorch_lora_weights"
# What a load must never report: peft/diffusers/transformers messages about keys that did not land.
KEY_PROBLEM = re.compile(
    r"unexpected|missing|did not match|not correctly renamed|No LoRA keys|not found|LOAD REPORT", re.IGNORECASE
)


# -- the tiny diffusers models --------------------------------------------------------------------
def components(family: str) -> list[str]:
    """The LoRA-carrying components of a family: ``unet``, ``te1`` (and ``te2``)."""
    return ["unet", *(text.component for text in TINY[family].texts)]


def build_pipeline(folder: Path, family: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A pipeline around the tiny folder's U-Net and text encoders (no tokenizer, scheduler or VAE)."""
    index = json.loads((folder / "model_index.json").read_text())

    def text_encoder(name: str) -> torch.nn.Module:
        library, cls = index[name]
        assert library == "transformers"
        return getattr(transformers, cls).from_pretrained(folder / name)

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_encoder("text_encoder"),
            text_encoder_2=text_encoder("text_encoder_2"),
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=None,
        )
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder("text_encoder"),
        tokenizer=None,
        unet=unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _component_model(pipe: object, component: str) -> torch.nn.Module:
    return getattr(pipe, DIFFUSERS_FOLDERS[component])


def module_of(pipe: object, canonical: str) -> torch.nn.Module:
    """The diffusers/transformers module of a canonical name (``unet.<path>``, ``te1.<path>``…).

    transformers 5 builds ``CLIPTextModel`` without the ``text_model`` wrapper (the checkpoint's
    ``text_model.`` prefix is mapped on load); ``CLIPTextModelWithProjection`` still has it.
    """
    component, path = canonical.split(".", 1)
    model = _component_model(pipe, component)
    if component != "unet" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)


def patched_modules(pipe: object, family: str, adapter: str) -> set[str]:
    """Canonical names of the modules carrying ``adapter``."""
    out = set()
    for component in components(family):
        model = _component_model(pipe, component)
        flat = component != "unet" and not hasattr(model, "text_model")
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                out.add(f"{component}.{'text_model.' if flat else ''}{name}")
    return out


def base_weights(folder: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """The un-patched weights, read from the checkpoint files (not from the loaded models)."""
    files = {}
    out = {}
    for canonical in modules:
        component, path = canonical.split(".", 1)
        sub = DIFFUSERS_FOLDERS[component]
        if sub not in files:
            (weights,) = (folder / sub).glob("*.safetensors")
            files[sub] = safetensors_torch.load_file(str(weights))
        out[canonical] = files[sub][f"{path}.weight"]
    return out


def fused_deltas(pipe: object, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for canonical, weight in base.items():
        module = module_of(pipe, canonical)
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        out[canonical] = layer.weight.detach().float() - weight.float()
    return out


@torch.no_grad()
def outputs(pipe: object, family: str) -> dict[str, torch.Tensor]:
    """U-Net and text-encoder outputs on fixed random inputs."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 1000, (2, 7), generator=g)
    out = {}
    te1 = pipe.text_encoder(ids)
    out["te1"] = te1.last_hidden_state
    out["te1.pooled"] = te1[1]
    added = None
    if family == "sdxl":
        te2 = pipe.text_encoder_2(ids)
        out["te2"] = te2.last_hidden_state
        out["te2.text_embeds"] = te2.text_embeds
        pooled = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe.unet.config.projection_class_embeddings_input_dim - pooled
        assert time_ids == 6 * pipe.unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    config = pipe.unet.config
    latents = torch.randn(2, config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([999, 17])
    out["unet"] = pipe.unet(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def load_problems() -> Iterator[list[str]]:
    """Warnings (logging or ``warnings``) from diffusers/transformers/peft that mention keys."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    problems: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield problems
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    messages = handler.messages + [str(w.message) for w in caught]
    problems.extend(m[:2000] for m in messages if KEY_PROBLEM.search(m))


def _about_this_load(message: str, others: tuple[str, ...]) -> bool:
    """False for a transformers LOAD REPORT whose every row is an *earlier* adapter's key: loading a
    second adapter into a text encoder lists the first one's weights as MISSING."""
    if "LOAD REPORT" not in message or not others:
        return True
    rows = [line for line in message.splitlines() if re.search(r"\|\s*\S*(MISSING|UNEXPECTED|MISMATCH)", line)]
    return not rows or any(not any(f".{other}." in row for other in others) for row in rows)


def load_with_diffusers(
    pipe: object, family: str, path: Path, adapter: str, modules: set[str], others: tuple[str, ...] = ()
) -> list[str]:
    """``pipe.load_lora_weights`` (diffusers' own kohya / peft detection and conversion); returns
    what diffusers, peft and transformers reported about keys. ``modules``: the canonical modules the
    file holds (components without any may say "No LoRA keys associated"); ``others``: adapters
    already loaded."""
    with load_problems() as problems:
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    touched = {m.split(".", 1)[0] for m in modules}
    silent = tuple(
        f"No LoRA keys associated to {type(_component_model(pipe, c)).__name__} found"
        for c in components(family)
        if c not in touched
    )
    return [p for p in problems if _about_this_load(p, others) and not p.startswith(silent)]


def fuse(pipe: object, family: str, adapter: str) -> None:
    pipe.fuse_lora(components=[DIFFUSERS_FOLDERS[c] for c in components(family)], adapter_names=[adapter])


def direct_deltas(path: Path, family: str) -> dict[str, tuple[float, torch.Tensor]]:
    """canonical → (alpha, alpha/r · up @ down), computed here from a kohya file's raw tensors."""
    raw = safetensors_torch.load_file(str(path))
    kohya_names = name_tables(TINY[family]).kohya
    out = {}
    for name in sorted({k.split(".", 1)[0] for k in raw}):
        down = raw[f"{name}.lora_down.weight"].float()
        up = raw[f"{name}.lora_up.weight"].float()
        alpha = float(raw[f"{name}.alpha"])
        rank = down.shape[0]
        delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])
        out[kohya_names[name]] = (alpha, delta * (alpha / rank))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} ≠ {tuple(expected.shape)}"
    if torch.equal(actual, expected) or torch.allclose(actual, expected, rtol=RTOL, atol=ATOL):
        return
    err = (actual - expected).abs().max().item()
    raise AssertionError(f"{what}: max |Δ| {err:.3g} (|expected| max {expected.abs().max().item():.3g})")
