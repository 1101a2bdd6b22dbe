"""FLUX.1 test helpers: tiny fixtures in every layout, and the real key sets as flat tables."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import load_keyset

from loratools.synthetic import TINY_FLUX, write_checkpoint, write_single_file

# name → (writer keyword arguments); every real FLUX.1 checkpoint layout.
FLUX_LAYOUTS = {
    "bfl": {"components": ("transformer",), "bare": True},  # flux1-dev.safetensors
    "comfyui_prefix": {"components": ("transformer",)},  # model.diffusion_model.* only
    "comfyui_checkpoint": {},  # all-in-one: transformer, CLIP-L, T5, VAE
}


def write_flux_fixtures(root: Path, variant: str = "dev", dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Tiny FLUX.1 checkpoints (every real block count) in every layout, one seed: the same model."""
    spec = TINY_FLUX[variant]
    paths = {
        name: write_single_file(spec, root / f"{variant}-{name}.safetensors", dtype=dtype, **kwargs)  # type: ignore[arg-type]
        for name, kwargs in FLUX_LAYOUTS.items()
    }
    paths["diffusers"] = write_checkpoint(spec, root / f"{variant}-diffusers", "diffusers", dtype=dtype)
    return paths


def real_flat(name: str, *variants: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """A FLUX.1 key set with variants applied (remove, then rename, then add), as key → (shape, dtype).

    Single files: bare names; diffusers: ``<subfolder>.<key>``.
    """
    data = load_keyset(name)
    folder = data["container"] == "diffusers"
    tables = {c: {k: (tuple(s), d) for k, (s, d) in keys.items()} for c, keys in data["components"].items()}
    for v in variants:
        spec = data["variants"][v]
        for c, names in spec.get("remove", {}).items():
            for n in names:
                del tables[c][n]
        for c, renames in spec.get("rename", {}).items():
            tables[c] = {renames.get(k, k): s for k, s in tables[c].items()}
        for c, added in spec.get("add", {}).items():
            tables.setdefault(c, {}).update({k: (tuple(s), d) for k, (s, d) in added.items()})
    return {(f"{c}.{k}" if folder else k): v for c, keys in tables.items() for k, v in keys.items()}


# --- FLUX.1 LoRAs in every dialect, generated from the real module names -----------------------------


def flux_lora_dialect(spec, dialect: str, *, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """A random FLUX.1 LoRA state dict in one dialect, over the attention and MLP Linears of every block.

    Dialects: kohya, kohya-split-qkv, ai-toolkit (diffusers names, peft), ai-toolkit-bfl
    (``diffusion_model.`` + BFL names), xlabs, onetrainer, lycoris-full (``diff``/``diff_b``),
    kohya-te (CLIP-L ``lora_te1_`` + T5 ``lora_te2_``), kohya-te3 (T5 as ``lora_te3_``).
    """
    from loratools.formats.flux import flux_names

    names = flux_names(spec)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    out: dict[str, torch.Tensor] = {}
    bfl_targets = [p for p in names.bfl if p.endswith(("qkv", "proj", "linear1", "linear2", "mlp.0", "mlp.2"))]
    canonical_targets = [
        m
        for m in names.shapes
        if m.startswith("transformer.")
        and m.endswith(("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"))
    ]
    if dialect in ("kohya", "kohya-split-qkv", "ai-toolkit-bfl", "xlabs"):
        for path in bfl_targets:
            if (dialect == "xlabs" and not path.startswith("double_blocks.")) or (dialect == "xlabs" and "mlp" in path):
                continue
            out_rows, inp = names.bfl_shapes[path]
            parts = names.bfl[path]
            if dialect == "kohya-split-qkv" and len(parts) > 1:
                down = rnd(len(parts) * rank, inp)
                up = torch.zeros(out_rows, len(parts) * rank)
                for i, p in enumerate(parts):
                    ((a, b),) = p.rows
                    up[a:b, i * rank : (i + 1) * rank] = rnd(b - a, rank)
            else:
                down, up = rnd(rank, inp), rnd(out_rows, rank)
            if dialect.startswith("kohya"):
                name = "lora_unet_" + path.replace(".", "_")
                out |= {
                    f"{name}.lora_down.weight": down,
                    f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(1.0),
                }
            elif dialect == "ai-toolkit-bfl":
                out |= {f"diffusion_model.{path}.lora_A.weight": down, f"diffusion_model.{path}.lora_B.weight": up}
            else:
                block, child = ".".join(path.split(".")[:2]), ".".join(path.split(".")[2:])
                xl = {
                    "img_attn.qkv": "qkv_lora1",
                    "img_attn.proj": "proj_lora1",
                    "txt_attn.qkv": "qkv_lora2",
                    "txt_attn.proj": "proj_lora2",
                }[child]
                out |= {f"{block}.processor.{xl}.down.weight": down, f"{block}.processor.{xl}.up.weight": up}
    elif dialect in ("ai-toolkit", "onetrainer", "lycoris-full"):
        for module in canonical_targets:
            o, i = names.shapes[module]
            path = module.split(".", 1)[1]
            if dialect == "ai-toolkit":
                out |= {
                    f"transformer.{path}.lora_A.weight": rnd(rank, i),
                    f"transformer.{path}.lora_B.weight": rnd(o, rank),
                }
            elif dialect == "onetrainer":
                name = "lora_transformer_" + path.replace(".", "_")
                out |= {
                    f"{name}.lora_down.weight": rnd(rank, i),
                    f"{name}.lora_up.weight": rnd(o, rank),
                    f"{name}.alpha": torch.tensor(float(rank)),
                }
            else:
                name = "lycoris_" + path.replace(".", "_")
                out |= {f"{name}.diff": rnd(o, i), f"{name}.diff_b": rnd(o)}
    elif dialect in ("kohya-te", "kohya-te3"):
        t5 = "lora_te3" if dialect == "kohya-te3" else "lora_te2"
        for module, (o, i) in names.shapes.items():
            if module.startswith("transformer."):
                continue
            prefix = "lora_te1" if module.startswith("te1.") else t5
            name = f"{prefix}_{module.split('.', 1)[1].replace('.', '_')}"
            out |= {
                f"{name}.lora_down.weight": rnd(rank, i),
                f"{name}.lora_up.weight": rnd(o, rank),
                f"{name}.alpha": torch.tensor(1.0),
            }
    else:
        raise ValueError(dialect)
    return out


# --- raw ΔW straight from a file's tensors (an oracle independent of loratools' readers) ------------

RAW_PARAMS = {  # file parameter suffix → role, for every dialect flux_lora_dialect writes
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "down.weight": "down",
    "up.weight": "up",
    "alpha": "alpha",
    "diff_b": "bias",
    "diff": "diff",
}


def raw_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """File module stem → {down, up, alpha, diff, bias}, by the key suffixes alone."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next(s for s in RAW_PARAMS if key.endswith("." + s))
        groups.setdefault(key[: -len(suffix) - 1], {})[RAW_PARAMS[suffix]] = t
    return groups


def raw_delta(group: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one file module in float64: ``diff``, or ``alpha/r · up @ down`` (scale 1 without alpha)."""
    if "diff" in group:
        return group["diff"].double()
    down, up = group["down"].double(), group["up"].double()
    scale = float(group["alpha"]) / down.shape[0] if "alpha" in group else 1.0
    return scale * up @ down


def stem_part_rows(spec, stem: str) -> list[tuple[tuple[int, int], ...]]:  # type: ignore[no-untyped-def]
    """Row ranges of each canonical module a file module feeds: several for a fused BFL Linear.

    Row facts from the family key map (formats/flux.py flux_names), not from any reader.
    """
    from loratools.formats.flux import flux_names

    names = flux_names(spec)
    path = stem.removeprefix("diffusion_model.")
    if path.startswith("lora_unet_"):
        path = names.bfl_underscore.get(path.removeprefix("lora_unet_"), path)
    if ".processor." in path:
        block, xl = path.split(".processor.")
        child = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj"}
        child |= {"qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"}
        path = f"{block}.{child[xl]}"
    if path in names.bfl:
        return [p.rows for p in names.bfl[path]]
    return [((0, -1),)]  # a canonical module: all its rows


def take_rows(t: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Rows of a ΔW (``(0, -1)``: all of them), concatenated."""
    return torch.cat([t if b == -1 else t[a:b] for a, b in rows], dim=0)


def flux_lycoris_fused(spec, kind: str, *, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """kohya/LyCORIS-named LoHa (``hada_*``) or LoKr (``lokr_w1`` + ``lokr_w2_a/b``) modules on every
    fused BFL Linear (double-block qkv, single-block linear1); LoKr's ``w2`` has half a head width of rows."""
    from loratools.formats.flux import flux_names

    names = flux_names(spec)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    out: dict[str, torch.Tensor] = {}
    for path, parts in names.bfl.items():
        if len(parts) < 2:
            continue
        rows, cols = names.bfl_shapes[path]
        name = "lora_unet_" + path.replace(".", "_")
        if kind == "loha":
            group = {"hada_w1_a": rnd(rows, rank), "hada_w1_b": rnd(rank, cols)}
            group |= {"hada_w2_a": rnd(rows, rank), "hada_w2_b": rnd(rank, cols)}
        else:
            b = min(p.rows[0][1] - p.rows[0][0] for p in parts) // 2
            group = {"lokr_w1": rnd(rows // b, 2), "lokr_w2_a": rnd(b, rank), "lokr_w2_b": rnd(rank, cols // 2)}
        out |= {f"{name}.{k}": v for k, v in group.items()} | {f"{name}.alpha": torch.tensor(1.0)}
    return out


def raw_lycoris_delta(group: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of a LoHa / LoKr file module in float64: a Hadamard or Kronecker product of its raw factors."""
    g = {k: v.double() for k, v in group.items()}
    if "hada_w1_a" in g:
        r = g["hada_w1_b"].shape[0]
        return (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"]) * float(g["alpha"]) / r
    r = g["lokr_w2_b"].shape[0]
    return torch.kron(g["lokr_w1"], g["lokr_w2_a"] @ g["lokr_w2_b"]) * float(g["alpha"]) / r


def flux_lora_comfyui_native(spec, *, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """ComfyUI's own save-node spelling: ``diffusion_model.<BFL path>.lora_down/lora_up/alpha``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in flux_lora_dialect(spec, "ai-toolkit-bfl", rank=rank, seed=seed).items():
        stem, side = key.rsplit(".lora_", 1)
        out[f"{stem}.{'lora_down' if side.startswith('A') else 'lora_up'}.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(rank))
    return out


def _stem_path(names, stem: str) -> str:  # type: ignore[no-untyped-def]
    """A file module stem's BFL path (fused Linears) or canonical module name, by name facts."""
    path = stem.removeprefix("diffusion_model.")
    if path.startswith("lora_unet_") and path.removeprefix("lora_unet_") in names.bfl_underscore:
        return names.bfl_underscore[path.removeprefix("lora_unet_")]
    if ".processor." in path:
        block, xl = path.split(".processor.")
        child = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj"}
        child |= {"qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"}
        return f"{block}.{child[xl]}"
    if path in names.bfl:
        return path
    for prefix in ("lora_transformer_", "lycoris_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_unet_"):
        if path.startswith(prefix):
            return names.underscore[path.removeprefix(prefix)]
    folder, rest = path.split(".", 1)
    return {"transformer": "transformer", "text_encoder": "te1", "text_encoder_2": "te2"}[folder] + "." + rest


def raw_canonical_deltas(  # type: ignore[no-untyped-def]
    spec, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ΔW, Δbias) per canonical FLUX.1 module in float64, from a file's raw tensors alone.

    Fused BFL modules are cut into their parts by the key map's row facts (flux_names); a peft
    file without alpha keys takes its scale from diffusers' flat ``lora_adapter_metadata``
    (``<folder>.alpha_pattern`` by exact module path, else ``<folder>.lora_alpha``; ÷ rank).
    """
    import json

    from loratools.formats.flux import flux_names

    names = flux_names(spec)
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for stem, group in raw_groups(tensors).items():
        delta = raw_delta(group)
        if "alpha" not in group and "diff" not in group and config:
            folder, path = stem.split(".", 1)
            assert not config.get(f"{folder}.use_rslora")
            alpha = config.get(f"{folder}.alpha_pattern", {}).get(path, config[f"{folder}.lora_alpha"])
            delta = delta * float(alpha) / group["down"].shape[0]
        where = _stem_path(names, stem)
        parts = [(p.module, p.rows) for p in names.bfl[where]] if where in names.bfl else [(where, ((0, -1),))]
        for module, rows in parts:
            assert module not in weights, module
            weights[module] = take_rows(delta, rows)
            if "bias" in group:
                biases[module] = take_rows(group["bias"].double(), rows)
    return weights, biases
