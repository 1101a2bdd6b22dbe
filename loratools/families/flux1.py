"""FLUX.1 [dev] and [schnell]: the numbers, nothing else.

Checked against black-forest-labs/flux src/flux/util.py (configs "flux-dev" / "flux-schnell":
FluxParams depth 19, depth_single_blocks 38, hidden 3072, 24 heads, mlp_ratio 4, guidance_embed)
and the hub config.json files (tests/data/keysets/flux1-*-diffusers.json ``configs``). [schnell]
is the same family without ``guidance_in``; detection names the variant (docs/FLUX.md §1).
"""

from __future__ import annotations

from .spec import FamilySpec, FluxSpec, T5Spec, TextSpec, VaeSpec

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
)
