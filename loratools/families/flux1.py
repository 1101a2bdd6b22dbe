"""FLUX.1 [dev] and [schnell]: the numbers, nothing else.

Checked against black-forest-labs/flux src/flux/util.py (configs "flux-dev" / "flux-schnell":
FluxParams depth 19, depth_single_blocks 38, hidden 3072, 24 heads, mlp_ratio 4, guidance_embed)
and the hub config.json files (tests/data/keysets/flux1-*-diffusers.json ``configs``). [schnell]
is the same family without ``guidance_in``; detection names the variant (docs/FLUX.md §1).
"""

from __future__ import annotations

from .spec import FamilySpec, FluxSpec, SchedulerSpec, T5Spec, TextSpec, VaeSpec

# The resolution-dependent shift BFL's sampler uses (black-forest-labs/flux src/flux/sampling.py
# (get_schedule: mu on the line (256, 0.5)–(4096, 1.15))); cli.py applies it for every model but
# flux-schnell, which samples the unshifted schedule. docs/FORMATS.md §5.6.
_SHIFT_LINE = (("base_image_seq_len", 256), ("base_shift", 0.5), ("max_image_seq_len", 4096), ("max_shift", 1.15))
FLOW_DEV = SchedulerSpec(
    "FlowMatchEulerDiscreteScheduler",
    "flow",
    (*_SHIFT_LINE, ("num_train_timesteps", 1000), ("shift", 3.0), ("use_dynamic_shifting", True)),
    "black-forest-labs/FLUX.1-dev scheduler_config.json values as pypi-data/pypi-mirror-328:taproot-0.3.8 "
    "src/taproot/tasks/generation/image/flux/pretrained/scheduler.py (get_default_config) lists them; "
    "the shift rule: black-forest-labs/flux:src/flux/sampling.py (get_schedule)",
    variant="dev",
)
FLOW_SCHNELL = SchedulerSpec(
    "FlowMatchEulerDiscreteScheduler",
    "flow",
    (*_SHIFT_LINE, ("num_train_timesteps", 1000), ("shift", 1.0), ("use_dynamic_shifting", False)),
    "edkamesh/FluX-optimized:scheduler/scheduler_config.json (copy of black-forest-labs/FLUX.1-schnell); "
    "no shift: black-forest-labs/flux:src/flux/cli.py (main: shift=(name != 'flux-schnell'))",
    variant="schnell",
)

FLUX1 = FamilySpec(
    name="flux1",
    title="FLUX.1",
    single_layout="bfl",
    unet=None,
    transformer=FluxSpec(),
    texts=(
        TextSpec(
            component="te1",
            single_prefix="text_encoders.clip_l.transformer.",
            openclip=False,
            hidden=768,
            intermediate=3072,
            layers=12,
            diffusers_layers=12,
            single_position_ids=False,
        ),
    ),
    t5=T5Spec(component="te2", single_prefix="text_encoders.t5xxl.transformer."),
    vae=VaeSpec(
        latent_channels=16, quant_convs=False, single_prefix="vae.", scaling_factor=0.3611, shift_factor=0.1159
    ),
    image_size=1024,
    bare_components=True,
    metadata_versions=("flux1",),
    schedulers=(FLOW_DEV, FLOW_SCHNELL),
)
