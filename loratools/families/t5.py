"""Every T5 v1.1 encoder weight (HF ``T5EncoderModel`` names, canonical and single-file alike).

Rules: huggingface/transformers models/t5/modeling_t5.py (T5Block: layer.0 = T5LayerSelfAttention,
layer.1 = T5LayerFF with the gated ``DenseReluDense.wi_0``/``wi_1``/``wo`` of v1.1; only block 0 has
``relative_attention_bias``; no biases, RMS layer norms). Checked against the real key sets
tests/data/keysets/flux1-t5xxl-fp16.json and flux1-dev-diffusers.json ``text_encoder_2`` (docs/FLUX.md §1).
"""

from __future__ import annotations

from .spec import DIFFUSERS_FOLDERS, T5Spec, Weight


def t5_weights(spec: T5Spec) -> list[Weight]:
    """All weights of a T5 encoder, in HF module order."""
    comp, folder, pre = spec.component, DIFFUSERS_FOLDERS[spec.component], spec.single_prefix
    d, inner = spec.d_model, spec.heads * spec.d_kv
    out: list[Weight] = []

    def add(name: str, shape: tuple[int, ...], *, in_diffusers: bool = True) -> None:
        out.append(Weight(f"{comp}.{name}", shape, f"{folder}.{name}" if in_diffusers else None, pre + name))

    add("shared.weight", (spec.vocab, d))
    if spec.tied_embedding:
        # t5xxl_fp16.safetensors stores the tied token table twice; save_pretrained drops the copy.
        out.append(
            Weight(f"{comp}.encoder.embed_tokens.weight", (spec.vocab, d), None, pre + "encoder.embed_tokens.weight")
        )
    for n in range(spec.layers):
        b = f"encoder.block.{n}.layer"
        for proj in ("q", "k", "v"):
            add(f"{b}.0.SelfAttention.{proj}.weight", (inner, d))
        add(f"{b}.0.SelfAttention.o.weight", (d, inner))
        if n == 0:
            add(f"{b}.0.SelfAttention.relative_attention_bias.weight", (spec.buckets, spec.heads))
        add(f"{b}.0.layer_norm.weight", (d,))
        add(f"{b}.1.DenseReluDense.wi_0.weight", (spec.d_ff, d))
        add(f"{b}.1.DenseReluDense.wi_1.weight", (spec.d_ff, d))
        add(f"{b}.1.DenseReluDense.wo.weight", (d, spec.d_ff))
        add(f"{b}.1.layer_norm.weight", (d,))
    add("encoder.final_layer_norm.weight", (d,))
    return out
