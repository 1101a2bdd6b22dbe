"""SDXL base 1.0: the numbers, nothing else.

Checked against sd_xl_base.yaml (SGM) and stabilityai/stable-diffusion-xl-base-1.0's config.json
files. The refiner (a different U-Net and only OpenCLIP-bigG) is not this family.
"""

from __future__ import annotations

from .sd1 import LDM_SCHEDULE
from .spec import FamilySpec, SchedulerSpec, TextSpec, UNetSpec, VaeSpec

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json; diffusers' legacy
# single-file path builds the same EulerDiscreteScheduler from SCHEDULER_DEFAULT_CONFIG
# (docs/FORMATS.md §5.6).
EULER_EPSILON = SchedulerSpec(
    "EulerDiscreteScheduler",
    "epsilon",
    (
        *LDM_SCHEDULE,
        ("interpolation_type", "linear"),
        ("prediction_type", "epsilon"),
        ("sample_max_value", 1.0),
        ("set_alpha_to_one", False),
        ("skip_prk_steps", True),
        ("steps_offset", 1),
        ("timestep_spacing", "leading"),
        ("trained_betas", None),
        ("use_karras_sigmas", False),
    ),
    "huggingface/diffusers:src/diffusers/loaders/single_file_utils.py (SCHEDULER_DEFAULT_CONFIG, _legacy_load_scheduler)",
)

SDXL = FamilySpec(
    name="sdxl",
    title="SDXL",
    single_layout="sgm",
    unet=UNetSpec(
        model_channels=320,
        channel_mult=(1, 2, 4),
        attention_levels=(False, True, True),
        transformer_depth=(0, 2, 10),
        mid_transformer_depth=10,
        context_dim=2048,  # CLIP-L 768 + OpenCLIP-bigG 1280, concatenated
        linear_projection=True,
        adm_in_channels=2816,  # pooled bigG 1280 + 6 size/crop embeddings × 256
        attention_heads=(5, 10, 20),
    ),
    texts=(
        TextSpec(
            component="te1",
            single_prefix="conditioner.embedders.0.transformer.",
            openclip=False,
            hidden=768,
            intermediate=3072,
            layers=12,
            diffusers_layers=12,
        ),
        TextSpec(
            component="te2",
            single_prefix="conditioner.embedders.1.model.",
            openclip=True,
            hidden=1280,
            intermediate=5120,
            layers=32,
            diffusers_layers=32,
            projection=1280,
            diffusers_projection=True,
            single_position_ids=False,
            heads=20,
            hidden_act="gelu",
        ),
    ),
    vae=VaeSpec(scaling_factor=0.13025),
    image_size=1024,
    metadata_versions=("sdxl_base_v1-0",),
    schedulers=(EULER_EPSILON,),
)
