"""SD 2.x (2.0, 2.1, 512-base and 768-v): the numbers, nothing else.

Checked against v2-inference(-v).yaml and stabilityai/stable-diffusion-2-1's config.json files.
The single file holds all 24 OpenCLIP-H blocks; diffusers' CLIPTextModel keeps 23 (SD2 conditions
on the penultimate block) — kohya-ss/sd-scripts:library/model_util.py (convert_ldm_clip_checkpoint_v2).
"""

from __future__ import annotations

from dataclasses import replace

from .sd1 import LDM_EXTRAS, LDM_SCHEDULE, PNDM_EPSILON, SD1_UNET
from .spec import FamilySpec, SchedulerSpec, TextSpec

# stabilityai/stable-diffusion-2-1 (768-v)'s scheduler/scheduler_config.json: what diffusers'
# from_single_file loads for any SD2 checkpoint, since weights cannot tell 768-v from 512-base
# (docs/FORMATS.md §5.6). 2-1-base (epsilon) ships the SD 1.x PNDM file.
DDIM_V = SchedulerSpec(
    "DDIMScheduler",
    "v_prediction",
    (
        *LDM_SCHEDULE,
        ("prediction_type", "v_prediction"),
        ("set_alpha_to_one", False),
        ("skip_prk_steps", True),
        ("steps_offset", 1),
        ("trained_betas", None),
    ),
    "Vikas-2025/Hugging_face_sta_dif_2.1:scheduler/scheduler_config.json (copy of stabilityai/stable-diffusion-2-1)",
)
PNDM_BASE = SchedulerSpec(
    PNDM_EPSILON.class_name,
    PNDM_EPSILON.prediction,
    PNDM_EPSILON.fields,
    "jack-op11/stable-diffusion-2-1-base:scheduler/scheduler_config.json (copy of stabilityai/stable-diffusion-2-1-base)",
)

SD2 = FamilySpec(
    name="sd2",
    title="SD 2.x",
    single_layout="ldm",
    # The SD1 U-Net with a 1024-wide context, Linear proj_in/proj_out and 64-wide heads.
    unet=replace(
        SD1_UNET,
        context_dim=1024,
        linear_projection=True,
        attention_heads=(5, 10, 20, 20),
        upcast_attention=True,
    ),
    texts=(
        TextSpec(
            component="te1",
            single_prefix="cond_stage_model.model.",
            openclip=True,
            hidden=1024,
            intermediate=4096,
            layers=24,
            diffusers_layers=23,
            projection=1024,
            diffusers_projection=False,
            diffusers_position_ids=True,
            single_position_ids=False,
            heads=16,
            hidden_act="gelu",
        ),
    ),
    single_extras=LDM_EXTRAS,
    image_size=768,  # 2.1 768-v; 2.x-base is 512, which weights cannot tell
    metadata_versions=("sd_v2", "sd_v2_v"),
    schedulers=(DDIM_V, PNDM_BASE),
)
