"""Every text-encoder weight: HF CLIP names (diffusers, canonical) ↔ HF or OpenCLIP single-file names.

OpenCLIP stores q, k and v fused as ``attn.in_proj_weight = cat([q, k, v], dim=0)`` (same for the
bias) and ``text_projection`` as the transpose of HF's Linear weight
(huggingface/diffusers:src/diffusers/loaders/single_file_utils.py (convert_open_clip_checkpoint);
scripts/convert_diffusers_to_original_stable_diffusion.py (code2idx q=0, k=1, v=2)). docs/FORMATS.md §5.2.
"""

from __future__ import annotations

from .spec import DIFFUSERS_FOLDERS, TextSpec, Weight

# HF CLIPEncoderLayer child → OpenCLIP ResidualAttentionBlock child (q/k/v handled as fused).
_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm2": "ln_2",
}
QKV = ("q_proj", "k_proj", "v_proj")


def text_weights(spec: TextSpec) -> list[Weight]:
    """All weights of one text encoder, in HF module order."""
    out: list[Weight] = []
    comp, pre, h = spec.component, spec.single_prefix, spec.hidden
    folder = DIFFUSERS_FOLDERS[comp]

    def add(hf: str, single: str | None, shape: tuple[int, ...], *, in_diffusers: bool = True, **extra: object) -> None:
        out.append(
            Weight(
                f"{comp}.{hf}",
                shape,
                f"{folder}.{hf}" if in_diffusers else None,
                pre + single if single is not None else None,
                **extra,  # type: ignore[arg-type]
            )
        )

    def openclip_or_hf(hf: str, openclip: str) -> str:
        return openclip if spec.openclip else hf

    emb = "text_model.embeddings"
    add(
        f"{emb}.token_embedding.weight",
        openclip_or_hf(f"{emb}.token_embedding.weight", "token_embedding.weight"),
        (spec.vocab, h),
    )
    add(
        f"{emb}.position_embedding.weight",
        openclip_or_hf(f"{emb}.position_embedding.weight", "positional_embedding"),
        (spec.positions, h),
    )
    if spec.diffusers_position_ids or (spec.single_position_ids and not spec.openclip):
        add(
            f"{emb}.position_ids",
            None if spec.openclip or not spec.single_position_ids else f"{emb}.position_ids",
            (1, spec.positions),
            in_diffusers=spec.diffusers_position_ids,
            dtype="I64",
            optional=True,
        )

    for n in range(spec.layers):
        hf = f"text_model.encoder.layers.{n}"
        in_diffusers = n < spec.diffusers_layers
        oc = f"transformer.resblocks.{n}"
        for index, proj in enumerate(QKV):
            for param, shape in (("weight", (h, h)), ("bias", (h,))):
                if spec.openclip:
                    add(
                        f"{hf}.self_attn.{proj}.{param}",
                        f"{oc}.attn.in_proj_{param}",
                        shape,
                        in_diffusers=in_diffusers,
                        single_part=(index, 3),
                        single_shape=(3 * h, *shape[1:]),
                    )
                else:
                    add(f"{hf}.self_attn.{proj}.{param}", f"{hf}.self_attn.{proj}.{param}", shape)
        for hf_child, oc_child in _LAYER_NAMES.items():
            shape = {"mlp.fc1": (spec.intermediate, h), "mlp.fc2": (h, spec.intermediate)}.get(hf_child, (h, h))
            if hf_child.startswith("layer_norm"):
                shape = (h,)
            for param in ("weight", "bias"):
                pshape = shape if param == "weight" else shape[:1]
                single = f"{oc}.{oc_child}.{param}" if spec.openclip else f"{hf}.{hf_child}.{param}"
                add(f"{hf}.{hf_child}.{param}", single, pshape, in_diffusers=in_diffusers)

    for param in ("weight", "bias"):
        add(
            f"text_model.final_layer_norm.{param}",
            openclip_or_hf(f"text_model.final_layer_norm.{param}", f"ln_final.{param}"),
            (h,),
        )
    if spec.projection is not None:
        # HF Linear(h → p) stores (p, h); OpenCLIP applies x @ P with P (h, p).
        add(
            "text_projection.weight",
            "text_projection",
            (spec.projection, h),
            in_diffusers=spec.diffusers_projection,
            single_transposed=True,
        )
    if spec.openclip:
        add("logit_scale", "logit_scale", (), in_diffusers=False)
    return out
