"""Every VAE weight: diffusers AutoencoderKL names ↔ LDM ``first_stage_model.`` names.

The VAE is never patched by a LoRA; it is mapped so that a whole checkpoint can move between the
single-file and diffusers layouts and so that every tensor of a checkpoint has a known home.
Rules: huggingface/diffusers:src/diffusers/loaders/single_file_utils.py (convert_ldm_vae_checkpoint);
the LDM mid-block attention uses 1×1 convs where diffusers uses Linear layers.
"""

from __future__ import annotations

from .spec import VaeSpec, Weight

SINGLE_PREFIX = "first_stage_model."
# Names diffusers used before 0.14 for the mid-block attention (still found in 2022-era folders).
LEGACY_ATTENTION_NAMES = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn",
    "group_norm": "group_norm",
}


class _VaeEmitter:
    def __init__(self, single_prefix: str = SINGLE_PREFIX) -> None:
        self.weights: list[Weight] = []
        self.prefix = single_prefix

    def layer(self, d: str, s: str, shape: tuple[int, ...], single_shape: tuple[int, ...] | None = None) -> None:
        self.weights.append(
            Weight(f"vae.{d}.weight", shape, f"vae.{d}.weight", f"{self.prefix}{s}.weight", single_shape=single_shape)
        )
        self.weights.append(Weight(f"vae.{d}.bias", shape[:1], f"vae.{d}.bias", f"{self.prefix}{s}.bias"))

    def resnet(self, d: str, s: str, cin: int, cout: int) -> None:
        self.layer(f"{d}.norm1", f"{s}.norm1", (cin,))
        self.layer(f"{d}.conv1", f"{s}.conv1", (cout, cin, 3, 3))
        self.layer(f"{d}.norm2", f"{s}.norm2", (cout,))
        self.layer(f"{d}.conv2", f"{s}.conv2", (cout, cout, 3, 3))
        if cin != cout:
            self.layer(f"{d}.conv_shortcut", f"{s}.nin_shortcut", (cout, cin, 1, 1))

    def mid(self, d: str, s: str, c: int) -> None:
        self.resnet(f"{d}.mid_block.resnets.0", f"{s}.mid.block_1", c, c)
        self.layer(f"{d}.mid_block.attentions.0.group_norm", f"{s}.mid.attn_1.norm", (c,))
        for dname, sname in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            self.layer(
                f"{d}.mid_block.attentions.0.{dname}", f"{s}.mid.attn_1.{sname}", (c, c), single_shape=(c, c, 1, 1)
            )
        self.resnet(f"{d}.mid_block.resnets.1", f"{s}.mid.block_2", c, c)


def vae_weights(spec: VaeSpec) -> list[Weight]:
    """All VAE weights of a spec, in diffusers module order."""
    e = _VaeEmitter(spec.single_prefix)
    chans, levels, z = spec.channels, len(spec.channels), spec.latent_channels

    e.layer("encoder.conv_in", "encoder.conv_in", (chans[0], spec.image_channels, 3, 3))
    ch = chans[0]
    for i, cout in enumerate(chans):
        for j in range(spec.layers_per_block):
            e.resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", ch, cout)
            ch = cout
        if i < levels - 1:
            e.layer(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", (ch, ch, 3, 3))
    e.mid("encoder", "encoder", ch)
    e.layer("encoder.conv_norm_out", "encoder.norm_out", (ch,))
    e.layer("encoder.conv_out", "encoder.conv_out", (2 * z, ch, 3, 3))

    if spec.quant_convs:
        e.layer("quant_conv", "quant_conv", (2 * z, 2 * z, 1, 1))
        e.layer("post_quant_conv", "post_quant_conv", (z, z, 1, 1))

    ch = chans[-1]
    e.layer("decoder.conv_in", "decoder.conv_in", (ch, z, 3, 3))
    e.mid("decoder", "decoder", ch)
    for i in range(levels):
        ldm_level = levels - 1 - i  # LDM numbers decoder levels from the output end
        cout = chans[ldm_level]
        for j in range(spec.layers_per_block + 1):
            e.resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}", ch, cout)
            ch = cout
        if i < levels - 1:
            e.layer(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv", (ch, ch, 3, 3))
    e.layer("decoder.conv_norm_out", "decoder.norm_out", (ch,))
    e.layer("decoder.conv_out", "decoder.conv_out", (spec.image_channels, ch, 3, 3))
    return e.weights


def legacy_diffusers_name(name: str) -> str | None:
    """The pre-0.14 diffusers spelling of a VAE mid-block attention tensor, if it has one."""
    marker = ".mid_block.attentions.0."
    if not name.startswith("vae.") or marker not in name:
        return None
    head, tail = name.split(marker)
    child, param = tail.rsplit(".", 1)
    legacy = LEGACY_ATTENTION_NAMES.get(child)
    return None if legacy is None or legacy == child else f"{head}{marker}{legacy}.{param}"
