"""The numbers that define an architecture, and the one record every key map is made of.

A family (SD1, SD2, SDXL) is a :class:`FamilySpec`: block channels, layers per block, transformer
depth per level, text-encoder sizes. The rule modules (:mod:`.unet`, :mod:`.text`, :mod:`.vae`)
turn a spec into :class:`Weight` records — one per canonical tensor, with its shape and its name in
each checkpoint layout. Nothing downstream ever types a key name by hand.

Canonical names are ``<component>.<diffusers key>`` with components ``unet``, ``te1``, ``te2`` and
``vae``: ``unet.down_blocks.0.attentions.0.proj_in.weight``,
``te1.text_model.encoder.layers.3.self_attn.q_proj.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Canonical component → diffusers pipeline subfolder.
DIFFUSERS_FOLDERS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2", "vae": "vae"}
COMPONENT_TITLES = {
    "unet": "U-Net",
    "te1": "text encoder",
    "te2": "text encoder 2",
    "vae": "VAE",
    "other": "other",
}


@dataclass(frozen=True)
class Weight:
    """One canonical tensor and where it lives in the diffusers and single-file layouts.

    ``single_part`` = (index, count): the tensor is rows ``[index·n, (index+1)·n)`` of a fused
    single-file tensor split into ``count`` equal parts along dim 0 (OpenCLIP ``in_proj``).
    ``single_shape``: the single-file shape when it differs (fused tensors, VAE 1×1 convs that
    diffusers stores as Linear). ``single_transposed``: the single file stores the transpose
    (OpenCLIP ``text_projection``). ``None`` for a layout name means the layout lacks the tensor.
    """

    canonical: str
    shape: tuple[int, ...]
    diffusers: str | None
    single: str | None
    dtype: str | None = None  # None: the checkpoint's float dtype; else a fixed safetensors dtype
    single_part: tuple[int, int] | None = None
    single_shape: tuple[int, ...] | None = None
    single_transposed: bool = False
    optional: bool = False  # buffers real files sometimes omit (position_ids)

    @property
    def component(self) -> str:
        return self.canonical.split(".", 1)[0]

    @property
    def module(self) -> str:
        """Canonical module name: the weight's name without its parameter suffix."""
        return self.canonical.rsplit(".", 1)[0]

    def layout_name(self, layout: str) -> str | None:
        return self.diffusers if layout == "diffusers" else self.single

    def layout_shape(self, layout: str) -> tuple[int, ...]:
        if layout != "diffusers" and self.single_shape is not None:
            return self.single_shape
        if layout != "diffusers" and self.single_transposed:
            return tuple(reversed(self.shape))
        return self.shape


@dataclass(frozen=True)
class UNetSpec:
    """A Stable Diffusion U-Net (diffusers UNet2DConditionModel / LDM UNetModel)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    transformer_depth: tuple[int, ...]  # per level; 0 where the level has no attention
    mid_transformer_depth: int
    context_dim: int
    linear_projection: bool  # proj_in/proj_out Linear (SD2, SDXL) or 1×1 Conv (SD1)
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    adm_in_channels: int | None = None  # SDXL's label_emb / add_embedding input width
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level (diffusers' attention_head_dim)
    norm_groups: int = 32
    upcast_attention: bool = False

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]


@dataclass(frozen=True)
class TextSpec:
    """A CLIP text encoder, in HF names (diffusers) and HF or OpenCLIP names (single file)."""

    component: str  # "te1" or "te2"
    single_prefix: str  # e.g. "cond_stage_model.transformer." or "conditioner.embedders.1.model."
    openclip: bool  # single file uses OpenCLIP names with fused in_proj
    hidden: int
    intermediate: int
    layers: int  # layers in the single file
    diffusers_layers: int  # SD2's HF encoder drops the last OpenCLIP block (penultimate conditioning)
    vocab: int = 49408
    positions: int = 77
    projection: int | None = None  # text_projection output width, where the model has one
    diffusers_projection: bool = False
    diffusers_position_ids: bool = False
    single_position_ids: bool = True
    heads: int = 12
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class VaeSpec:
    """The KL autoencoder shared by SD1, SD2 and SDXL."""

    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    image_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class FamilySpec:
    """A model family: its U-Net, text encoders and VAE, and what its single file is called."""

    name: str  # "sd1", "sd2", "sdxl"
    title: str
    single_layout: str  # "ldm" or "sgm"
    unet: UNetSpec
    texts: tuple[TextSpec, ...]
    vae: VaeSpec = field(default_factory=VaeSpec)
    single_extras: tuple[tuple[str, tuple[int, ...], str | None], ...] = ()  # buffers without a canonical home
    metadata_versions: tuple[str, ...] = ()  # kohya ss_base_model_version values naming this family
    image_size: int = 512  # native resolution: diffusers' sample sizes (U-Net = image / 8, VAE = image)

    def scaled(self, **changes: object) -> FamilySpec:
        """A copy with some numbers changed (tiny fixtures keep every count, shrink widths)."""
        return replace(self, **changes)  # type: ignore[arg-type]
