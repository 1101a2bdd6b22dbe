"""Every U-Net weight, derived from a :class:`UNetSpec`, with its diffusers and LDM/SGM names.

Rules checked against kohya-ss/sd-scripts:library/model_util.py (convert_unet_state_dict_to_sd),
library/sdxl_model_util.py (make_unet_conversion_map) and diffusers'
UNet2DConditionModel.__init__ (channel bookkeeping of the skip connections); see docs/FORMATS.md §5.1.
"""

from __future__ import annotations

from .spec import UNetSpec, Weight

SINGLE_PREFIX = "model.diffusion_model."

# ResnetBlock2D child (diffusers) → LDM ResBlock child.
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


class _Emitter:
    """Collects Weight records for a pair of (diffusers, single-file) module prefixes."""

    def __init__(self) -> None:
        self.weights: list[Weight] = []

    def param(self, dname: str, sname: str, shape: tuple[int, ...]) -> None:
        self.weights.append(Weight(f"unet.{dname}", shape, f"unet.{dname}", SINGLE_PREFIX + sname))

    def layer(self, dname: str, sname: str, weight_shape: tuple[int, ...], bias: bool = True) -> None:
        self.param(f"{dname}.weight", f"{sname}.weight", weight_shape)
        if bias:
            self.param(f"{dname}.bias", f"{sname}.bias", weight_shape[:1])

    def norm(self, dname: str, sname: str, channels: int) -> None:
        self.layer(dname, sname, (channels,))

    def resnet(self, d: str, s: str, cin: int, cout: int, temb: int) -> None:
        n = _RESNET_NAMES
        self.norm(f"{d}.norm1", f"{s}.{n['norm1']}", cin)
        self.layer(f"{d}.conv1", f"{s}.{n['conv1']}", (cout, cin, 3, 3))
        self.layer(f"{d}.time_emb_proj", f"{s}.{n['time_emb_proj']}", (cout, temb))
        self.norm(f"{d}.norm2", f"{s}.{n['norm2']}", cout)
        self.layer(f"{d}.conv2", f"{s}.{n['conv2']}", (cout, cout, 3, 3))
        if cin != cout:
            self.layer(f"{d}.conv_shortcut", f"{s}.{n['conv_shortcut']}", (cout, cin, 1, 1))

    def transformer(self, d: str, s: str, c: int, depth: int, context: int, linear: bool) -> None:
        """Transformer2DModel / SpatialTransformer: identical child names on both sides."""
        proj = (c, c) if linear else (c, c, 1, 1)

        def same(name: str, shape: tuple[int, ...], bias: bool = True) -> None:
            self.layer(f"{d}.{name}", f"{s}.{name}", shape, bias)

        same("norm", (c,))
        same("proj_in", proj)
        for k in range(depth):
            b = f"transformer_blocks.{k}"
            for attn, kv_in in (("attn1", c), ("attn2", context)):
                same(f"{b}.{attn}.to_q", (c, c), bias=False)
                same(f"{b}.{attn}.to_k", (c, kv_in), bias=False)
                same(f"{b}.{attn}.to_v", (c, kv_in), bias=False)
                same(f"{b}.{attn}.to_out.0", (c, c))
            for i in (1, 2, 3):
                same(f"{b}.norm{i}", (c,))
            same(f"{b}.ff.net.0.proj", (8 * c, c))  # GEGLU: two 4c halves
            same(f"{b}.ff.net.2", (c, 4 * c))
        same("proj_out", proj)


def unet_weights(spec: UNetSpec) -> list[Weight]:
    """All U-Net weights of a spec, in diffusers module order."""
    e = _Emitter()
    temb = spec.time_embed_dim
    c0 = spec.model_channels
    levels = len(spec.channel_mult)
    per_level = spec.layers_per_block + 1  # LDM input/output blocks per level

    e.layer("conv_in", "input_blocks.0.0", (c0, spec.in_channels, 3, 3))
    e.layer("time_embedding.linear_1", "time_embed.0", (temb, c0))
    e.layer("time_embedding.linear_2", "time_embed.2", (temb, temb))
    if spec.adm_in_channels is not None:
        e.layer("add_embedding.linear_1", "label_emb.0.0", (temb, spec.adm_in_channels))
        e.layer("add_embedding.linear_2", "label_emb.0.2", (temb, temb))

    skip_channels = [c0]  # what each LDM input block hands to its output block
    ch = c0
    for level in range(levels):
        cout = spec.channels(level)
        for j in range(spec.layers_per_block):
            block = 1 + level * per_level + j
            e.resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", ch, cout, temb)
            ch = cout
            if spec.attention_levels[level]:
                e.transformer(
                    f"down_blocks.{level}.attentions.{j}",
                    f"input_blocks.{block}.1",
                    ch,
                    spec.transformer_depth[level],
                    spec.context_dim,
                    spec.linear_projection,
                )
            skip_channels.append(ch)
        if level < levels - 1:
            e.layer(
                f"down_blocks.{level}.downsamplers.0.conv",
                f"input_blocks.{(level + 1) * per_level}.0.op",
                (ch, ch, 3, 3),
            )
            skip_channels.append(ch)

    e.resnet("mid_block.resnets.0", "middle_block.0", ch, ch, temb)
    e.transformer(
        "mid_block.attentions.0",
        "middle_block.1",
        ch,
        spec.mid_transformer_depth,
        spec.context_dim,
        spec.linear_projection,
    )
    e.resnet("mid_block.resnets.1", "middle_block.2", ch, ch, temb)

    for i in range(levels):
        level = levels - 1 - i
        cout = spec.channels(level)
        attends = spec.attention_levels[level]
        for j in range(per_level):
            block = i * per_level + j
            e.resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", ch + skip_channels.pop(), cout, temb)
            ch = cout
            if attends:
                e.transformer(
                    f"up_blocks.{i}.attentions.{j}",
                    f"output_blocks.{block}.1",
                    ch,
                    spec.transformer_depth[level],
                    spec.context_dim,
                    spec.linear_projection,
                )
        if i < levels - 1:
            slot = 2 if attends else 1
            e.layer(
                f"up_blocks.{i}.upsamplers.0.conv",
                f"output_blocks.{i * per_level + per_level - 1}.{slot}.conv",
                (ch, ch, 3, 3),
            )

    e.norm("conv_norm_out", "out.0", c0)
    e.layer("conv_out", "out.2", (spec.out_channels, c0, 3, 3))
    return e.weights
