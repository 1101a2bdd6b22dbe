"""Every FLUX.1 transformer weight, derived from a :class:`FluxSpec`: diffusers ↔ BFL names.

diffusers' ``FluxTransformer2DModel`` (canonical) splits what BFL's ``Flux`` module fuses:
- ``double_blocks.N.img_attn.qkv`` = rows of ``transformer_blocks.N.attn.to_q | to_k | to_v``,
  ``txt_attn.qkv`` = ``add_q_proj | add_k_proj | add_v_proj`` (weight and bias);
- ``single_blocks.N.linear1`` = ``single_transformer_blocks.N.attn.to_q | to_k | to_v | proj_mlp``
  (3 × hidden + mlp_hidden rows), ``linear2`` = ``proj_out`` (hidden + mlp_hidden columns);
- ``final_layer.adaLN_modulation.1`` = ``norm_out.linear`` with the shift/scale halves swapped.
Rules: huggingface/diffusers src/diffusers/loaders/single_file_utils.py
(convert_flux_transformer_checkpoint_to_diffusers, swap_scale_shift); black-forest-labs/flux
src/flux/model.py and modules/layers.py. Checked name for name and shape for shape against the real
key sets (tests/data/keysets/flux1-*.json) and against diffusers' converter (docs/FLUX.md §1).
"""

from __future__ import annotations

from .spec import FluxSpec, Weight


class _Emitter:
    def __init__(self, prefix: str) -> None:
        self.weights: list[Weight] = []
        self.prefix = prefix

    def param(self, d: str, s: str, shape: tuple[int, ...], **extra: object) -> None:
        self.weights.append(Weight(f"transformer.{d}", shape, f"transformer.{d}", self.prefix + s, **extra))  # type: ignore[arg-type]

    def linear(self, d: str, s: str, out: int, inp: int, **extra: object) -> None:
        self.param(f"{d}.weight", f"{s}.weight", (out, inp), **extra)
        self.param(f"{d}.bias", f"{s}.bias", (out,), **extra)

    def fused(self, s: str, parts: list[tuple[str, int]], inp: int) -> None:
        """Linears whose weights and biases are consecutive row ranges of one BFL Linear."""
        total = sum(rows for _, rows in parts)
        start = 0
        for d, rows in parts:
            fused = {"single_rows": (start, start + rows)}
            self.param(f"{d}.weight", f"{s}.weight", (rows, inp), single_shape=(total, inp), **fused)
            self.param(f"{d}.bias", f"{s}.bias", (rows,), single_shape=(total,), **fused)
            start += rows

    def embedder(self, d: str, s: str, out: int, inp: int) -> None:
        """BFL MLPEmbedder (in_layer, SiLU, out_layer) = diffusers TimestepEmbedding (linear_1, linear_2)."""
        self.linear(f"{d}.linear_1", f"{s}.in_layer", out, inp)
        self.linear(f"{d}.linear_2", f"{s}.out_layer", out, out)

    def qk_norm(self, d: str, s: str, head_dim: int) -> None:
        """The per-head RMSNorm scales of q and k."""
        self.param(f"{d}.norm_q.weight", f"{s}.query_norm.scale", (head_dim,))
        self.param(f"{d}.norm_k.weight", f"{s}.key_norm.scale", (head_dim,))


def flux_weights(spec: FluxSpec) -> list[Weight]:
    """All transformer weights of a FLUX.1 spec, in diffusers module order."""
    e = _Emitter(spec.single_prefix)
    h, mlp, hd = spec.hidden, spec.mlp_hidden, spec.head_dim

    e.embedder("time_text_embed.timestep_embedder", "time_in", h, spec.time_dim)
    if spec.guidance_embed:
        e.embedder("time_text_embed.guidance_embedder", "guidance_in", h, spec.time_dim)
    e.embedder("time_text_embed.text_embedder", "vector_in", h, spec.vec_dim)
    e.linear("context_embedder", "txt_in", h, spec.context_dim)
    e.linear("x_embedder", "img_in", h, spec.in_channels)

    for n in range(spec.double_blocks):
        d, s = f"transformer_blocks.{n}", f"double_blocks.{n}"
        e.linear(f"{d}.norm1.linear", f"{s}.img_mod.lin", 6 * h, h)
        e.linear(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin", 6 * h, h)
        e.fused(f"{s}.img_attn.qkv", [(f"{d}.attn.to_{x}", h) for x in "qkv"], h)
        e.qk_norm(f"{d}.attn", f"{s}.img_attn.norm", hd)
        e.fused(f"{s}.txt_attn.qkv", [(f"{d}.attn.add_{x}_proj", h) for x in "qkv"], h)
        e.param(f"{d}.attn.norm_added_q.weight", f"{s}.txt_attn.norm.query_norm.scale", (hd,))
        e.param(f"{d}.attn.norm_added_k.weight", f"{s}.txt_attn.norm.key_norm.scale", (hd,))
        e.linear(f"{d}.attn.to_out.0", f"{s}.img_attn.proj", h, h)
        e.linear(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj", h, h)
        e.linear(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0", mlp, h)
        e.linear(f"{d}.ff.net.2", f"{s}.img_mlp.2", h, mlp)
        e.linear(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0", mlp, h)
        e.linear(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2", h, mlp)

    for n in range(spec.single_blocks):
        d, s = f"single_transformer_blocks.{n}", f"single_blocks.{n}"
        e.linear(f"{d}.norm.linear", f"{s}.modulation.lin", 3 * h, h)
        e.fused(f"{s}.linear1", [*((f"{d}.attn.to_{x}", h) for x in "qkv"), (f"{d}.proj_mlp", mlp)], h)
        e.qk_norm(f"{d}.attn", f"{s}.norm", hd)
        e.linear(f"{d}.proj_out", f"{s}.linear2", h, h + mlp)

    e.linear("norm_out.linear", "final_layer.adaLN_modulation.1", 2 * h, h, single_swapped=True)
    e.linear("proj_out", "final_layer.linear", spec.in_channels, h)
    return e.weights
