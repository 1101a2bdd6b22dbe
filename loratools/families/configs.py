"""diffusers / transformers config.json contents for a family spec.

What a diffusers folder needs beside its weights so that ``from_pretrained`` rebuilds the same
modules: written into folders we create from single files, and into synthetic fixtures.
Field names follow the real hub configs (shared/keysets/*-diffusers.json ``configs``).
"""

from __future__ import annotations

from .spec import DIFFUSERS_FOLDERS, FamilySpec


def diffusers_configs(spec: FamilySpec) -> dict[str, dict[str, object]]:
    """config.json contents per diffusers subfolder (and model_index.json) for a spec."""
    u = spec.unet
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
    configs: dict[str, dict[str, object]] = {"unet": unet}
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
    v = spec.vae
    configs["vae"] = {
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
    pipeline = "StableDiffusionXLPipeline" if spec.name == "sdxl" else "StableDiffusionPipeline"
    index: dict[str, object] = {"_class_name": pipeline}
    for folder in configs:
        library = "diffusers" if folder in ("unet", "vae") else "transformers"
        cls = configs[folder].get("_class_name") or configs[folder]["architectures"][0]  # type: ignore[index]
        index[folder] = [library, cls]
    configs["model_index"] = index
    return configs
