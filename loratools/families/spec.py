"""The numbers that define an architecture, and the one record every key map is made of.

A family (SD1, SD2, SDXL, FLUX.1) is a :class:`FamilySpec`: its denoiser (a U-Net's block
channels, layers per block and transformer depth per level, or a DiT's block counts and widths),
its text encoders and its VAE. The rule modules (:mod:`.unet`, :mod:`.flux`, :mod:`.text`,
:mod:`.t5`, :mod:`.vae`) turn a spec into :class:`Weight` records — one per canonical tensor, with its shape and its name in
each checkpoint layout. Nothing downstream ever types a key name by hand.

Canonical names are ``<component>.<diffusers key>`` with components ``unet`` (or ``transformer``
for a DiT), ``te1``, ``te2`` and ``vae``: ``unet.down_blocks.0.attentions.0.proj_in.weight``,
``te1.text_model.encoder.layers.3.self_attn.q_proj.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Canonical component → diffusers pipeline subfolder.
DIFFUSERS_FOLDERS = {
    "unet": "unet",
    "transformer": "transformer",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
    "vae": "vae",
}
# Canonical text component → the diffusers subfolder of its tokenizer (not weights: never made, only copied).
TOKENIZER_FOLDERS = {"te1": "tokenizer", "te2": "tokenizer_2"}
DENOISERS = ("unet", "transformer")  # the component a LoRA's "unet" strength and block weights address
# The order components are listed in (tables, trees): the denoiser first, then text, VAE, the rest.
COMPONENT_ORDER = ("unet", "transformer", "te1", "te2", "vae", "scheduler", "ema", "other")
COMPONENT_TITLES = {
    "unet": "U-Net",
    "transformer": "transformer",
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
    ``single_rows`` = (start, stop): the same for parts of unequal size (FLUX.1 ``linear1`` holds
    q, k, v and the MLP input). ``single_swapped``: the single file stores the two halves of the
    rows in the other order (FLUX.1 ``final_layer.adaLN_modulation.1`` is shift, scale where
    diffusers' ``norm_out.linear`` is scale, shift).
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
    single_rows: tuple[int, int] | None = None
    single_swapped: bool = False
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

    def single_slice(self, fused_rows: int) -> tuple[int, int] | None:
        """The rows ``[start, stop)`` of the single-file tensor this weight is (None: all of it)."""
        if self.single_rows is not None:
            return self.single_rows
        if self.single_part is not None:
            index, count = self.single_part
            n = fused_rows // count
            return index * n, (index + 1) * n
        return None

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
    shift_factor: float | None = None
    quant_convs: bool = True  # FLUX.1's autoencoder has no quant_conv / post_quant_conv
    single_prefix: str = "first_stage_model."


@dataclass(frozen=True)
class T5Spec:
    """A T5 v1.1 encoder (HF ``T5EncoderModel`` names, the same in the diffusers folder and single files)."""

    component: str  # "te2" for FLUX.1
    single_prefix: str  # "text_encoders.t5xxl.transformer." inside a ComfyUI checkpoint
    d_model: int = 4096
    d_ff: int = 10240
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    vocab: int = 32128
    buckets: int = 32
    tied_embedding: bool = False  # encoder.embed_tokens.weight stored beside shared.weight (t5xxl_fp16)


@dataclass(frozen=True)
class FluxSpec:
    """A FLUX.1 transformer: double-stream (MMDiT) blocks, then single-stream blocks."""

    double_blocks: int = 19
    single_blocks: int = 38
    heads: int = 24
    head_dim: int = 128
    mlp_ratio: int = 4
    in_channels: int = 64  # packed 2×2 latent patches of 16 channels (Fill 384, Depth 128)
    context_dim: int = 4096  # T5 width
    vec_dim: int = 768  # pooled CLIP-L width
    time_dim: int = 256  # sinusoidal timestep embedding width
    guidance_embed: bool = True  # [dev] has guidance_in; [schnell] has not
    single_prefix: str = "model.diffusion_model."

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * self.mlp_ratio

    @property
    def variant(self) -> str:
        """``dev`` (guidance-distilled: has guidance_in) or ``schnell`` (timestep-distilled: has not)."""
        return "dev" if self.guidance_embed else "schnell"


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler a family's pipeline folder gets: class, ``scheduler_config.json`` fields,
    and the prediction type it is for (``epsilon``, ``v_prediction``, ``flow``)."""

    class_name: str
    prediction: str
    fields: tuple[tuple[str, object], ...]  # in the order the hub file lists them
    source: str  # where the values come from (owner/repo:path)
    variant: str = ""  # "": any checkpoint of the family; else the FluxSpec.variant it is for


@dataclass(frozen=True)
class FamilySpec:
    """A model family: its denoiser (U-Net or DiT), text encoders and VAE, and its single-file layout."""

    name: str  # "sd1", "sd2", "sdxl", "flux1"
    title: str
    single_layout: str  # "ldm", "sgm" or "bfl"
    unet: UNetSpec | None
    texts: tuple[TextSpec, ...]
    vae: VaeSpec = field(default_factory=VaeSpec)
    transformer: FluxSpec | None = None
    t5: T5Spec | None = None
    single_extras: tuple[tuple[str, tuple[int, ...], str | None], ...] = ()  # buffers without a canonical home
    bare_components: bool = False  # standalone component files without the all-in-one prefix exist
    metadata_versions: tuple[str, ...] = ()  # kohya ss_base_model_version values naming this family
    image_size: int = 512  # native resolution: diffusers' sample sizes (U-Net = image / 8, VAE = image)
    # The first is what a folder made from a single file gets when the weights cannot tell the
    # prediction type (diffusers' own single-file default); others, where metadata names theirs.
    schedulers: tuple[SchedulerSpec, ...] = ()

    @property
    def denoiser(self) -> str:
        """The canonical component of the denoiser: ``unet`` or ``transformer``."""
        return "unet" if self.unet is not None else "transformer"

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(t.component for t in self.texts) + ((self.t5.component,) if self.t5 is not None else ())

    def denoiser_facts(self) -> dict[str, object]:
        """The denoiser's defining numbers, for reports (U-Net channels, or DiT blocks and widths)."""
        if self.unet is not None:
            u = self.unet
            return {
                "unet_model_channels": u.model_channels,
                "unet_channel_mult": list(u.channel_mult),
                "unet_in_channels": u.in_channels,
                "cross_attention_dim": u.context_dim,
            }
        f = self.transformer
        assert f is not None
        return {
            "transformer_double_blocks": f.double_blocks,
            "transformer_single_blocks": f.single_blocks,
            "transformer_hidden": f.hidden,
            "transformer_heads": f.heads,
            "transformer_in_channels": f.in_channels,
            "guidance_embed": f.guidance_embed,
            "cross_attention_dim": f.context_dim,
        }

    def scaled(self, **changes: object) -> FamilySpec:
        """A copy with some numbers changed (tiny fixtures keep every count, shrink widths)."""
        return replace(self, **changes)  # type: ignore[arg-type]
