"""diffusers / transformers config.json contents for a family spec.

What a diffusers folder needs beside its weights so that ``from_pretrained`` rebuilds the same
modules: written into folders we create from single files, and into synthetic fixtures.
Field names follow the real hub configs (shared/keysets/*-diffusers.json ``configs``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .spec import DIFFUSERS_FOLDERS, FamilySpec, SchedulerSpec

# Detection's prediction type (modelspec.prediction_type, marker tensors) → diffusers' spelling.
# Anything else ("unknown", "v (EDM)": a different scheduler family) gets the family's default.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def _flux_config(spec: FamilySpec) -> dict[str, object]:
    f = spec.transformer
    assert f is not None
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": f.head_dim,
        "axes_dims_rope": _rope_axes(f.head_dim),
        "guidance_embeds": f.guidance_embed,
        "in_channels": f.in_channels,
        "joint_attention_dim": f.context_dim,
        "num_attention_heads": f.heads,
        "num_layers": f.double_blocks,
        "num_single_layers": f.single_blocks,
        "out_channels": None,
        "patch_size": 1,
        "pooled_projection_dim": f.vec_dim,
    }


def _rope_axes(head_dim: int) -> list[int]:
    """FLUX.1's rotary axes (16, 56, 56) for 128-wide heads; scaled down the same way for tiny heads."""
    if head_dim == 128:
        return [16, 56, 56]
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = (head_dim - first) // 2 // 2 * 2
    return [head_dim - 2 * rest, rest, rest]


def _t5_config(spec: FamilySpec) -> dict[str, object]:
    t = spec.t5
    assert t is not None
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": t.vocab,
        "d_model": t.d_model,
        "d_kv": t.d_kv,
        "d_ff": t.d_ff,
        "num_layers": t.layers,
        "num_heads": t.heads,
        "relative_attention_num_buckets": t.buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": True,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def diffusers_configs(spec: FamilySpec) -> dict[str, dict[str, object]]:
    """config.json contents per diffusers subfolder (and model_index.json) for a spec."""
    configs: dict[str, dict[str, object]] = {}
    if spec.transformer is not None:
        configs["transformer"] = _flux_config(spec)
    if spec.unet is not None:
        configs["unet"] = _unet_config(spec)
    _text_configs(spec, configs)
    if spec.t5 is not None:
        configs[DIFFUSERS_FOLDERS[spec.t5.component]] = _t5_config(spec)
    configs["vae"] = _vae_config(spec)
    if spec.transformer is not None:
        pipeline = "FluxPipeline"
    else:
        pipeline = "StableDiffusionXLPipeline" if spec.name == "sdxl" else "StableDiffusionPipeline"
    index: dict[str, object] = {"_class_name": pipeline}
    for folder in configs:
        library = "diffusers" if folder in ("unet", "transformer", "vae") else "transformers"
        cls = configs[folder].get("_class_name") or configs[folder]["architectures"][0]  # type: ignore[index]
        index[folder] = [library, cls]
    configs["model_index"] = index
    return configs


def _unet_config(spec: FamilySpec) -> dict[str, object]:
    u = spec.unet
    assert u is not None
    attended = u.attention_levels
    unet: dict[str, object] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": spec.image_size // 8,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)],
        "block_out_channels": [u.channels(i) for i in range(len(u.channel_mult))],
        "layers_per_block": u.layers_per_block,
        "cross_attention_dim": u.context_dim,
        "attention_head_dim": list(u.attention_heads),
        "transformer_layers_per_block": [max(d, 1) for d in u.transformer_depth],
        "use_linear_projection": u.linear_projection,
        "upcast_attention": u.upcast_attention,
        "norm_num_groups": u.norm_groups,
    }
    if u.adm_in_channels is not None:
        pooled = spec.texts[-1].projection or spec.texts[-1].hidden
        unet.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(u.adm_in_channels - pooled) // 6,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    return unet


def _text_configs(spec: FamilySpec, configs: dict[str, dict[str, object]]) -> None:
    for text in spec.texts:
        eos = text.vocab - 1
        configs[DIFFUSERS_FOLDERS[text.component]] = {
            "architectures": ["CLIPTextModelWithProjection" if text.diffusers_projection else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": text.vocab,
            "hidden_size": text.hidden,
            "intermediate_size": text.intermediate,
            "projection_dim": text.projection or text.hidden,
            "num_hidden_layers": text.diffusers_layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.positions,
            "hidden_act": text.hidden_act,
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "bos_token_id": eos - 1,
            "eos_token_id": eos,
        }


def _vae_config(spec: FamilySpec) -> dict[str, object]:
    v = spec.vae
    vae: dict[str, object] = {
        "_class_name": "AutoencoderKL",
        "in_channels": v.image_channels,
        "out_channels": v.image_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(v.channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.channels),
        "block_out_channels": list(v.channels),
        "layers_per_block": v.layers_per_block,
        "latent_channels": v.latent_channels,
        "norm_num_groups": v.norm_groups,
        "scaling_factor": v.scaling_factor,
        "sample_size": spec.image_size,
    }
    if not v.quant_convs:
        vae.update(use_quant_conv=False, use_post_quant_conv=False)
    if v.shift_factor is not None:
        vae["shift_factor"] = v.shift_factor
    return vae


def scheduler_for(spec: FamilySpec, prediction: str = "unknown") -> SchedulerSpec | None:
    """The scheduler a pipeline folder of ``spec`` gets: among the family's entries for its variant
    (FLUX.1 [dev] or [schnell]), the one for the detected prediction type, else the first
    (diffusers' single-file default); None: the family has none."""
    variant = spec.transformer.variant if spec.transformer is not None else ""
    fitting = [s for s in spec.schedulers if s.variant in ("", variant)]
    wanted = PREDICTIONS.get(prediction)
    return next((s for s in fitting if s.prediction == wanted), fitting[0] if fitting else None)


def scheduler_config(spec: FamilySpec, prediction: str = "unknown") -> dict[str, object] | None:
    """``scheduler/scheduler_config.json`` contents (docs/FORMATS.md §5.6); a prediction type the
    metadata names wins over the entry's own, as diffusers' ``prediction_type`` argument does."""
    chosen = scheduler_for(spec, prediction)
    if chosen is None:
        return None
    config: dict[str, object] = {"_class_name": chosen.class_name, **dict(chosen.fields)}
    if prediction in PREDICTIONS and "prediction_type" in config:
        config["prediction_type"] = PREDICTIONS[prediction]
    return config


def pipeline_index(
    spec: FamilySpec, scheduler: Mapping[str, object] | None, tokenizers: Mapping[str, list[str]]
) -> dict[str, object]:
    """model_index.json for a folder made from a single file: the weight components, then the
    scheduler and the tokenizers it holds, in diffusers' ``[library, class]`` form."""
    index = dict(diffusers_configs(spec)["model_index"])
    if scheduler is not None:
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    index.update(tokenizers)
    return index
