"""Family and layout of a checkpoint, told from key names and tensor shapes alone.

Evidence, each part voting for a set of families (docs/FORMATS.md §5.4):
- single file: ``conditioner.embedders.1.model.`` (OpenCLIP-bigG) ⇒ SDXL, ``cond_stage_model.model.``
  (OpenCLIP-H) ⇒ SD2, ``cond_stage_model.transformer.`` (CLIP-L) ⇒ SD1; U-Net ``label_emb`` ⇒ SDXL,
  ``proj_in`` as a 1×1 conv ⇒ SD1, as a Linear ⇒ SD2 or SDXL;
- diffusers folder: ``text_encoder_2`` or ``add_embedding`` ⇒ SDXL, a 23-layer text encoder ⇒ SD2,
  a 12-layer one ⇒ SD1 or SDXL, and the same ``proj_in`` rule.
- FLUX.1: BFL ``double_blocks.N.img_attn.qkv`` (bare, ``model.diffusion_model.``-prefixed or in a
  ComfyUI all-in-one file) or diffusers ``transformer.single_transformer_blocks`` ⇒ FLUX.1, [dev]
  when ``guidance_in`` / ``guidance_embedder`` is present, else [schnell]; SD3 (``joint_blocks``,
  ``pos_embed`` without single blocks) and FLUX.2 (shared ``double_stream_modulation``) are named and
  refused (docs/FLUX.md §1).
Widths (channels, context and text widths, in-channels) are then read off the shapes, the family's
rules are re-run at those widths and every shape is compared — so a tiny test model and a full-size
one are recognised the same way, and an inpainting U-Net (9 input channels) is named as such.
What weights cannot tell (epsilon vs v-prediction) is reported as unknown unless metadata or a
marker tensor says it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import UnknownModelError
from . import FAMILIES, keymap
from .keymap import KeyMap
from .spec import FamilySpec, Weight

# Bare BFL transformer names (flux1-dev.safetensors) and the ComfyUI all-in-one text-encoder prefix.
FLUX_SINGLE_PREFIXES = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "text_encoders.")
SINGLE_PREFIXES = (
    "model.diffusion_model.",
    "cond_stage_model.",
    "conditioner.",
    "first_stage_model.",
    *FLUX_SINGLE_PREFIXES,
)
DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "vae.")
IN_CHANNEL_VARIANTS = {4: "base", 9: "inpainting", 8: "instruct-pix2pix"}
FLUX_IN_CHANNEL_VARIANTS = {64: "", 384: " Fill", 128: " Depth"}  # diffusers infer_diffusers_model_type


@dataclass(repr=False)
class Detection:
    """What a checkpoint is, and how well its tensors fit that answer."""

    family: FamilySpec  # with widths read from the file
    layout: str  # "diffusers", "ldm" or "sgm"
    component_counts: dict[str, int]
    missing: list[str] = field(default_factory=list)  # expected keys not present
    unknown: list[str] = field(default_factory=list)  # keys with no known home
    shape_mismatches: list[str] = field(default_factory=list)
    variant: str = "base"
    prediction: str = "unknown"
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Detection({self.family.name}, {self.layout}, {self.variant}, missing={len(self.missing)}, "
            f"unknown={len(self.unknown)}, mismatches={len(self.shape_mismatches)})"
        )

    @property
    def keymap(self) -> KeyMap:
        return keymap(self.family)

    @property
    def is_complete(self) -> bool:
        return not self.missing and not self.shape_mismatches


def layout_of(keys: list[str]) -> str:
    """``single`` or ``diffusers`` from key prefixes."""
    single = sum(k.startswith(SINGLE_PREFIXES) for k in keys)
    folder = sum(k.startswith(DIFFUSERS_PREFIXES) for k in keys)
    if not single and not folder:
        sample = ", ".join(keys[:3])
        raise UnknownModelError(
            f"not a Stable Diffusion checkpoint: no U-Net, text-encoder or VAE keys (first keys: {sample})"
        )
    return "single" if single >= folder else "diffusers"


def _layer_count(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _proj_in_ndim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(("model.diffusion_model.", "unet.")) and key.endswith(".proj_in.weight"):
            return len(shape)
    return None


def _candidates(layout: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, set[str]]:
    """Per part of the model, the families it is consistent with."""
    keys = list(shapes)
    votes: dict[str, set[str]] = {}
    ndim = _proj_in_ndim(shapes)
    _refuse_other_dits(keys)
    if any(".img_attn.qkv." in k or k.startswith("transformer.single_transformer_blocks.") for k in keys):
        votes["transformer (FLUX.1 double/single blocks)"] = {"flux1"}
    if layout == "single":
        if any(k.startswith("text_encoders.t5xxl.") for k in keys):
            votes["text encoders (CLIP-L + T5-XXL)"] = {"flux1"}
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
            k.startswith("conditioner.embedders.1.") for k in keys
        ):
            raise UnknownModelError("SDXL refiner checkpoints are not supported (only SDXL base)")
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            votes["text encoders (OpenCLIP-bigG)"] = {"sdxl"}
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            votes["text encoder (OpenCLIP-H)"] = {"sd2"}
        elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
            votes["text encoder (CLIP-L)"] = {"sd1"}
        if "model.diffusion_model.label_emb.0.0.weight" in shapes:
            votes["U-Net (label_emb)"] = {"sdxl"}
    else:
        if any(k.startswith("text_encoder_2.encoder.block.") for k in keys):
            votes["text_encoder_2 (T5)"] = {"flux1"}
        elif any(k.startswith("text_encoder_2.") for k in keys):
            votes["text_encoder_2"] = {"sdxl"}
        layers = _layer_count(keys, "text_encoder.text_model.encoder.layers.") or _layer_count(
            keys, "text_encoder.encoder.layers."
        )
        if layers == 23:
            votes["text encoder (23 layers)"] = {"sd2"}
        elif layers == 12:
            votes["text encoder (12 layers)"] = {"sd1", "sdxl", "flux1"}
        if "unet.add_embedding.linear_1.weight" in shapes:
            votes["U-Net (add_embedding)"] = {"sdxl"}
    if ndim == 4:
        votes["U-Net (1×1 conv proj_in)"] = {"sd1"}
    elif ndim == 2:
        votes["U-Net (linear proj_in)"] = {"sd2", "sdxl"} - ({"sdxl"} if _lacks_sdxl_unet(layout, shapes) else set())
    return votes


def _refuse_other_dits(keys: list[str]) -> None:
    """SD3 and FLUX.2 transformers are named, and refused: their rules are not written yet."""
    if any(".joint_blocks." in f".{k}" for k in keys) or (
        any(k.startswith("transformer.transformer_blocks.") and ".attn.add_q_proj." in k for k in keys)
        and any(k.startswith("transformer.pos_embed.") for k in keys)
    ):
        raise UnknownModelError("a Stable Diffusion 3 (MMDiT) checkpoint: SD3 is not supported yet")
    if any("double_stream_modulation" in k or "single_stream_modulation" in k for k in keys):
        raise UnknownModelError("a FLUX.2 checkpoint: FLUX.2 is not supported yet (only FLUX.1)")


def _lacks_sdxl_unet(layout: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    unet_keys = [k for k in shapes if k.startswith("model.diffusion_model." if layout == "single" else "unet.")]
    marker = (
        "model.diffusion_model.label_emb.0.0.weight" if layout == "single" else "unet.add_embedding.linear_1.weight"
    )
    return bool(unet_keys) and marker not in shapes


def _canonical_shape(w: Weight, layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "diffusers":
        return shape
    if w.single_rows is not None:
        shape = (w.single_rows[1] - w.single_rows[0], *shape[1:])
    elif w.single_part is not None:
        shape = (shape[0] // w.single_part[1], *shape[1:])
    if w.single_transposed:
        shape = tuple(reversed(shape))
    return shape[: len(w.shape)]


def infer_widths(spec: FamilySpec, layout: str, shapes: Mapping[str, tuple[int, ...]]) -> FamilySpec:
    """The family spec with channel widths, context and text widths read from the file's shapes."""
    km = keymap(spec)

    def shape(canonical: str) -> tuple[int, ...] | None:
        w = km.by_canonical.get(canonical)
        if w is None:
            return None
        for key in km.spellings(layout, canonical):
            if key in shapes:
                return _canonical_shape(w, layout, shapes[key])
        return None

    unet = spec.unet
    conv_in = shape("unet.conv_in.weight") if unet is not None else None
    if unet is not None and conv_in:
        mc = conv_in[0]
        mult = []
        for level in range(len(unet.channel_mult)):
            s = shape(f"unet.down_blocks.{level}.resnets.0.conv1.weight")
            mult.append(s[0] // mc if s else unet.channel_mult[level])
        out = shape("unet.conv_out.weight")
        context = next(
            (s[1] for w in km.weights if w.canonical.endswith("attn2.to_k.weight") and (s := shape(w.canonical))),
            unet.context_dim,
        )
        adm = shape("unet.add_embedding.linear_1.weight")
        unet = replace(
            unet,
            model_channels=mc,
            channel_mult=tuple(mult),
            in_channels=conv_in[1],
            out_channels=out[0] if out else unet.out_channels,
            context_dim=context,
            adm_in_channels=adm[1] if adm else unet.adm_in_channels,
        )
    texts = []
    for text in spec.texts:
        c = text.component
        token = shape(f"{c}.text_model.embeddings.token_embedding.weight")
        if token:
            pos = shape(f"{c}.text_model.embeddings.position_embedding.weight")
            fc1 = shape(f"{c}.text_model.encoder.layers.0.mlp.fc1.weight")
            proj = shape(f"{c}.text_projection.weight") if text.projection is not None else None
            text = replace(
                text,
                vocab=token[0],
                hidden=token[1],
                positions=pos[0] if pos else text.positions,
                intermediate=fc1[0] if fc1 else text.intermediate,
                projection=proj[0] if proj else text.projection,
            )
        texts.append(text)
    vae = spec.vae
    if shape("vae.encoder.conv_in.weight"):
        channels = []
        for i in range(len(vae.channels)):
            s = shape(f"vae.encoder.down_blocks.{i}.resnets.0.conv1.weight")
            channels.append(s[0] if s else vae.channels[i])
        latent = shape("vae.post_quant_conv.weight") or shape("vae.decoder.conv_in.weight")
        latent_channels = (latent[0] if vae.quant_convs else latent[1]) if latent else vae.latent_channels
        vae = replace(vae, channels=tuple(channels), latent_channels=latent_channels)
    flux = spec.transformer
    if flux is not None and (x_in := shape("transformer.x_embedder.weight")):
        qn = shape("transformer.transformer_blocks.0.attn.norm_q.weight") or shape(
            "transformer.single_transformer_blocks.0.attn.norm_q.weight"
        )
        head_dim = qn[0] if qn else flux.head_dim
        mlp = shape("transformer.transformer_blocks.0.ff.net.0.proj.weight")
        ctx = shape("transformer.context_embedder.weight")
        vec = shape("transformer.time_text_embed.text_embedder.linear_1.weight")
        t_in = shape("transformer.time_text_embed.timestep_embedder.linear_1.weight")
        double = "transformer_blocks." if layout == "diffusers" else "double_blocks."
        single = "single_transformer_blocks." if layout == "diffusers" else "single_blocks."
        flux = replace(
            flux,
            heads=x_in[0] // head_dim,
            head_dim=head_dim,
            mlp_ratio=mlp[0] // x_in[0] if mlp else flux.mlp_ratio,
            in_channels=x_in[1],
            context_dim=ctx[1] if ctx else flux.context_dim,
            vec_dim=vec[1] if vec else flux.vec_dim,
            time_dim=t_in[1] if t_in else flux.time_dim,
            guidance_embed=shape("transformer.time_text_embed.guidance_embedder.linear_1.weight") is not None,
            double_blocks=_block_count(shapes, double) or flux.double_blocks,
            single_blocks=_block_count(shapes, single) or flux.single_blocks,
        )
    t5 = spec.t5
    if t5 is not None and (shared := shape(f"{t5.component}.shared.weight")):
        wi = shape(f"{t5.component}.encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
        q = shape(f"{t5.component}.encoder.block.0.layer.0.SelfAttention.q.weight")
        bias = shape(f"{t5.component}.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        heads = bias[1] if bias else t5.heads
        t5 = replace(
            t5,
            vocab=shared[0],
            d_model=shared[1],
            d_ff=wi[0] if wi else t5.d_ff,
            heads=heads,
            d_kv=q[0] // heads if q else t5.d_kv,
            buckets=bias[0] if bias else t5.buckets,
            layers=_block_count(shapes, "encoder.block.") or t5.layers,
            tied_embedding=any(k.endswith("encoder.embed_tokens.weight") for k in shapes),
        )
    return _fit_unreadable(replace(spec, unet=unet, texts=tuple(texts), vae=vae, transformer=flux, t5=t5))


def _largest_divisor(preferred: int, widths: Sequence[int]) -> int:
    """``preferred`` if it divides every width, else the largest number below it that does."""
    common = math.gcd(*widths)
    return next(d for d in range(min(preferred, common), 0, -1) if common % d == 0)


def _fit_unreadable(spec: FamilySpec) -> FamilySpec:
    """GroupNorm group counts and attention head counts leave no trace in weight shapes: keep
    the family's numbers where they divide the widths read (every full-size file), else the
    largest that do, so a config written for a tiny or distilled model builds (a GroupNorm of
    8 channels cannot have 32 groups). :func:`unreadable_changes` reports what was chosen."""
    unet = spec.unet
    if unet is not None:
        widths = [unet.channels(i) for i in range(len(unet.channel_mult))]
        heads = tuple(_largest_divisor(h, [unet.channels(i)]) for i, h in enumerate(unet.attention_heads))
        unet = replace(unet, norm_groups=_largest_divisor(unet.norm_groups, widths), attention_heads=heads)
    texts = tuple(replace(t, heads=_largest_divisor(t.heads, [t.hidden])) for t in spec.texts)
    vae = replace(spec.vae, norm_groups=_largest_divisor(spec.vae.norm_groups, spec.vae.channels))
    return replace(spec, unet=unet, texts=texts, vae=vae)


def unreadable_changes(spec: FamilySpec) -> list[str]:
    """The numbers weights cannot show that :func:`infer_widths` had to change from the family's
    own (group and head counts that do not divide the widths read), in words; empty at full size."""
    base = FAMILIES[spec.name]
    changes = []
    if spec.unet is not None and base.unet is not None:
        if spec.unet.norm_groups != base.unet.norm_groups:
            changes.append(f"U-Net GroupNorm groups {spec.unet.norm_groups} (not {base.unet.norm_groups})")
        if spec.unet.attention_heads != base.unet.attention_heads:
            changes.append(f"U-Net attention heads {list(spec.unet.attention_heads)}")
    for text, full in zip(spec.texts, base.texts, strict=False):
        if text.heads != full.heads:
            changes.append(f"{text.component} attention heads {text.heads} (not {full.heads})")
    if spec.vae.norm_groups != base.vae.norm_groups:
        changes.append(f"VAE GroupNorm groups {spec.vae.norm_groups} (not {base.vae.norm_groups})")
    return changes


def _block_count(shapes: Mapping[str, tuple[int, ...]], marker: str) -> int:
    """How many numbered blocks follow ``marker`` anywhere in a key (whatever prefix precedes it)."""
    pattern = re.compile(r"(?:^|\.)" + re.escape(marker) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.search(k))}
    return max(found) + 1 if found else 0


def component_of_key(km: KeyMap, layout: str, key: str) -> str:
    """unet / te1 / te2 / vae / scheduler / ema / other."""
    weights = km.lookup(layout, key)
    if weights:
        return weights[0].component
    if key.startswith("model_ema."):
        return "ema"
    if key in km.extras:
        return "scheduler"
    return "other"


def _prediction(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str, str | None]:
    declared = metadata.get("modelspec.prediction_type")
    if declared:
        return declared, "modelspec.prediction_type"
    if metadata.get("modelspec.architecture", "").endswith("768-v"):
        return "v", "modelspec.architecture"
    if "edm_vpred.sigma_max" in shapes:
        return "v (EDM)", "marker tensor edm_vpred.*"
    if "v_pred" in shapes:
        return "v", "marker tensor v_pred"
    return "unknown", None


def flux_variant(spec: FamilySpec) -> str:
    """``dev`` / ``schnell`` (guidance embedding or not), plus Fill / Depth from the input width."""
    flux = spec.transformer
    if flux is None:
        return "base"
    return flux.variant + FLUX_IN_CHANNEL_VARIANTS.get(flux.in_channels, f" ({flux.in_channels} input channels)")


def detect(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    *,
    family: str | None = None,
) -> Detection:
    """Detect family and layout of a checkpoint from its key → shape table."""
    metadata = metadata or {}
    keys = list(shapes)
    layout_kind = layout_of(keys)
    votes = _candidates(layout_kind, shapes)
    if family is not None:
        chosen = FAMILIES[family]
    else:
        if not votes:
            raise UnknownModelError("cannot tell the model family: no U-Net attention or text-encoder keys found")
        possible = set(FAMILIES)
        for part_votes in votes.values():
            possible &= part_votes
        if not possible:
            described = "; ".join(f"{part} says {'/'.join(sorted(v))}" for part, v in votes.items())
            raise UnknownModelError(f"mixed model families in one checkpoint: {described}")
        if len(possible) > 1:
            raise UnknownModelError(
                f"cannot tell {' from '.join(sorted(possible))} from these keys alone", hint="pass --family"
            )
        chosen = FAMILIES[possible.pop()]
    layout = chosen.single_layout if layout_kind == "single" else "diffusers"
    spec = infer_widths(chosen, layout, shapes)
    km = keymap(spec)

    counts: Counter[str] = Counter()
    unknown: list[str] = []
    mismatches: list[str] = []
    seen: set[str] = set()
    for key, shape in shapes.items():
        component = component_of_key(km, layout, key)
        counts[component] += 1
        weights = km.lookup(layout, key)
        if weights:
            seen.add(weights[0].layout_name(layout) or key)
            expected = weights[0].layout_shape(layout)
            if tuple(shape) != tuple(expected):
                mismatches.append(f"{key}: {list(shape)}, expected {list(expected)}")
        elif component == "other":
            unknown.append(key)
    present_components = {c for c in counts if c in ("unet", "transformer", "te1", "te2", "vae")}
    missing = [
        w.layout_name(layout) or ""
        for w in km.weights
        if w.layout_name(layout) is not None
        and w.layout_name(layout) not in seen
        and not w.optional
        and w.component in present_components
    ]
    missing = list(dict.fromkeys(missing))

    if spec.unet is not None:
        variant = IN_CHANNEL_VARIANTS.get(spec.unet.in_channels, f"{spec.unet.in_channels} input channels")
    else:
        variant = flux_variant(spec) if spec.transformer is not None else "base"
    prediction, source = _prediction(shapes, metadata)
    notes = []
    if spec.transformer is not None:
        prediction = "flow matching"
        notes.append("FLUX.1 is a rectified-flow model (no epsilon/v prediction)")
    elif prediction == "unknown":
        notes.append("prediction type (epsilon or v) cannot be told from weights")
    else:
        notes.append(f"prediction type {prediction} (from {source})")
    absent = [c for c in (spec.denoiser, *spec.text_components, "vae") if c not in present_components]
    if absent:
        notes.append("partial checkpoint: no " + ", ".join(absent))
    return Detection(spec, layout, dict(counts), missing, unknown, mismatches, variant, prediction, notes)
