"""SD 1.x (1.4, 1.5 and their fine-tunes): the numbers, nothing else.

Checked against the v1-inference.yaml LDM config and runwayml/stable-diffusion-v1-5's unet and
text_encoder config.json (shared/keysets/sd15-*.json reproduces both real key sets).
"""

from __future__ import annotations

from .spec import FamilySpec, SchedulerSpec, TextSpec, UNetSpec

# LatentDiffusion's DDPM schedule buffers and EMA bookkeeping that LDM single files carry
# (ldm/models/diffusion/ddpm.py register_schedule; LitEma).
LDM_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
LDM_EXTRAS: tuple[tuple[str, tuple[int, ...], str | None], ...] = (
    *((name, (1000,), None) for name in LDM_SCHEDULE_BUFFERS),
    ("model_ema.decay", (), None),
    ("model_ema.num_updates", (), "I32"),
)

# The LDM training schedule (v1-inference.yaml linear_start/linear_end, 1000 steps) as diffusers
# schedulers spell it; SD 1.x, SD 2.x and SDXL share it.
LDM_SCHEDULE: tuple[tuple[str, object], ...] = (
    ("beta_end", 0.012),
    ("beta_schedule", "scaled_linear"),
    ("beta_start", 0.00085),
    ("clip_sample", False),
    ("num_train_timesteps", 1000),
)
# stable-diffusion-v1-5's scheduler/scheduler_config.json (what diffusers' from_single_file loads
# for a v1 checkpoint), docs/FORMATS.md §5.6; the hub file omits prediction_type (PNDM's default).
PNDM_EPSILON = SchedulerSpec(
    "PNDMScheduler",
    "epsilon",
    (
        *LDM_SCHEDULE,
        ("prediction_type", "epsilon"),
        ("set_alpha_to_one", False),
        ("skip_prk_steps", True),
        ("steps_offset", 1),
        ("trained_betas", None),
    ),
    "wswplay/stable-diffusion-v1-5:scheduler/scheduler_config.json (copy of runwayml/stable-diffusion-v1-5)",
)

SD1_UNET = UNetSpec(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    attention_levels=(True, True, True, False),
    transformer_depth=(1, 1, 1, 0),
    mid_transformer_depth=1,
    context_dim=768,
    linear_projection=False,
)

SD1 = FamilySpec(
    name="sd1",
    title="SD 1.x",
    single_layout="ldm",
    unet=SD1_UNET,
    texts=(
        TextSpec(
            component="te1",
            single_prefix="cond_stage_model.transformer.",
            openclip=False,
            hidden=768,
            intermediate=3072,
            layers=12,
            diffusers_layers=12,
        ),
    ),
    single_extras=LDM_EXTRAS,
    metadata_versions=("sd_v1", "sd_v1_v"),
    schedulers=(PNDM_EPSILON,),
)
