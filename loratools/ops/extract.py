"""Extract a LoRA from a fine-tuned checkpoint: ``ΔW = W_tuned − W_base``, truncated per module.

Both checkpoints are streamed tensor by tensor through the family key maps, so their layouts may
differ (single file vs diffusers folder; fused OpenCLIP ``in_proj`` split into q/k/v on the way).
For every module a kohya LoRA can patch — the U-Net's Transformer2DModel Linear/1×1 modules, its
ResnetBlock2D/Downsample/Upsample children (3×3 convs become LoCon: ``down (k, in, 3, 3)``,
``up (out, k, 1, 1)``) and the text encoders' attention and MLP (docs/FORMATS.md §1.2), and for
FLUX.1 every Linear of the double- and single-stream blocks, CLIP's and T5's (fused BFL
``qkv``/``linear1`` are read by their row slices, so each canonical module is its own target) — the
difference is formed in float32 and its top-k singular triplets are computed:

- by a randomized SVD (Halko, Martinsson & Tropp 2011: Gaussian sketch of width k + oversample,
  ``power_iterations`` rounds of re-orthonormalised power iteration, exact SVD of the small
  projection) for a fixed rank, or a dynamic rule bounded by ``max_rank``;
- by an exact SVD when the matrix is small (sketch width ≥ half its smaller side), for
  ``sv_cumulative`` (its Σσ needs every singular value), and for dynamic rules without
  ``max_rank``.

sv_fro and error rules compare with the exact ``‖ΔW‖_F²`` even when only a sketch is computed.
A module whose largest absolute difference is ≤ ``min_diff`` is skipped and listed (kohya's
``--min_diff`` uses the same measure, but only to decide whether a whole text encoder changed);
text encoders are extracted module by module wherever they differ. kohya clamps ``U·S`` and ``Vᵀ``
to their 0.99 quantile; loratools does not (it moves the result away from the optimal truncation).
SD2's last OpenCLIP block is not extracted: it is unused at inference (penultimate-layer
conditioning) and kohya's text encoder has no such layer. Output: ``alpha = k`` (scale 1),
singular values in ``up``, as sd-scripts writes extracted LoRAs.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..families.detect import detect
from ..families.spec import FamilySpec
from ..formats.adapters import Adapter, LoraFile, LowRank
from ..formats.names import name_tables
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.source import open_source
from .checkpoint import CanonicalSource, parse_dtype
from .lowrank import F64, Factored, RankRule, kept_fraction, lowrank_from, randomized_svd
from .parallel import map_ordered
from .progress import announce_total
from .provenance import PendingRecord
from .rank_common import check_output, output_format, rank_rule, write_lora
from .resize import is_conv_kxk

SCHEMA = "loratools.extract/1"

# Module paths kohya's LoRA/LoCon targets (kohya-ss/sd-scripts networks/lora.py: Transformer2DModel
# children, ResnetBlock2D/Downsample2D/Upsample2D children with conv_dim, CLIPAttention/CLIPMLP).
_UNET_TRANSFORMER = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# FLUX.1 (kohya-ss/sd-scripts networks/lora_flux.py (LoRANetwork)): every Linear of the double- and
# single-stream blocks, CLIP's attention and MLP, and T5's (T5Attention, T5DenseGatedActDense).
_FLUX_BLOCKS = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")
_T5 = (".SelfAttention.q", ".SelfAttention.k", ".SelfAttention.v", ".SelfAttention.o",
       ".DenseReluDense.wi_0", ".DenseReluDense.wi_1", ".DenseReluDense.wo")  # fmt: skip


def extract_targets(spec: FamilySpec) -> list[str]:
    """Canonical modules an extracted LoRA covers: kohya's LoCon targets for U-Net and text
    encoders, and for FLUX.1 its block Linears, CLIP and T5 (what kohya's Flux LoRA trains)."""
    out = []
    t5 = spec.t5.component if spec.t5 is not None else None
    for module in name_tables(spec).modules.values():
        if module.component == "transformer":
            if module.name.startswith(_FLUX_BLOCKS):
                out.append(module.name)
        elif module.component == t5:
            if module.path.endswith(_T5):
                out.append(module.name)
        elif module.component == "unet":
            transformer = ".attentions." in module.name and module.name.endswith(_UNET_TRANSFORMER)
            if transformer or ".resnets." in module.name or "samplers." in module.name:
                out.append(module.name)
        elif module.path.endswith(_TEXT):
            text = next(t for t in spec.texts if t.component == module.component)
            layer = int(module.path.split(".")[3])
            if layer < text.diffusers_layers:  # SD2's 24th OpenCLIP block is unused at inference
                out.append(module.name)
    return out


@dataclass
class ExtractedModule:
    """One module of the extracted LoRA."""

    module: str
    shape: list[int]
    rank: int
    fro_kept: float  # ‖ΔW_k‖_F / ‖ΔW‖_F, from the singular values computed
    max_diff: float  # largest |W_tuned − W_base|
    method: str  # "randomized" or "exact"
    limited_by: str | None = None


@dataclass
class ExtractReport:
    """What an extraction did (``to_dict()`` is the ``--json`` output)."""

    base: str
    tuned: str
    output: str | None
    output_format: str | None
    family: str
    base_layout: str
    tuned_layout: str
    rule: str
    min_diff: float
    modules: list[ExtractedModule] = field(default_factory=list)
    skipped: dict[str, float] = field(default_factory=dict)  # module → max |diff| (≤ min_diff)
    missing: list[str] = field(default_factory=list)  # target modules absent from either checkpoint
    warnings: list[str] = field(default_factory=list)

    def components(self) -> dict[str, dict[str, int]]:
        """Per component: modules extracted and skipped."""
        out: dict[str, dict[str, int]] = {}
        for m in self.modules:
            out.setdefault(m.module.split(".", 1)[0], {"extracted": 0, "skipped": 0})["extracted"] += 1
        for name in self.skipped:
            out.setdefault(name.split(".", 1)[0], {"extracted": 0, "skipped": 0})["skipped"] += 1
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "base": self.base,
            "tuned": self.tuned,
            "output": self.output,
            "output_format": self.output_format,
            "family": self.family,
            "base_layout": self.base_layout,
            "tuned_layout": self.tuned_layout,
            "rule": self.rule,
            "min_diff": self.min_diff,
            "components": self.components(),
            "module_count": len(self.modules),
            "ranks": dict(Counter(str(m.rank) for m in self.modules)),
            "methods": dict(Counter(m.method for m in self.modules)),
            "fro_kept_min": min((m.fro_kept for m in self.modules), default=1.0),
            "modules": [asdict(m) for m in self.modules],
            "skipped": self.skipped,
            "missing": self.missing,
            "warnings": self.warnings,
        }


def truncate_difference(
    diff: torch.Tensor,
    rule: RankRule,
    *,
    conv: bool = False,
    oversample: int = 16,
    power_iterations: int = 2,
    seed: int = 0,
) -> tuple[Factored, int, float, str, str | None]:
    """Top singular triplets of one dense difference ``(out, in·kh·kw)`` and the rank ``rule`` keeps.

    Returns ``(svd, k, fro_kept, method, limited_by)``.
    """
    # ‖ΔW‖_F² from float32 row norms summed in float64: exact to ~1e-10, without a float64 copy
    total = float(torch.linalg.vector_norm(diff, dim=1).to(F64).square().sum())
    m, n = diff.shape
    width = rule.sketch_rank(conv)
    sketch = width is not None and not rule.needs_full_spectrum and 2 * min(width + oversample, m, n) < min(m, n)
    if sketch:
        svd = randomized_svd(diff, width, oversample=oversample, power_iterations=power_iterations, seed=seed)  # type: ignore[arg-type]
        method, energy = "randomized", total
    else:  # small, or a rule that needs every singular value
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        svd, method, energy = Factored(u.to(F64) * s.to(F64), vh.to(F64), s.to(F64)), "exact", None
    choice = rule.choose(svd.singular_values, conv=conv, total_energy=energy)
    return svd, choice.rank, kept_fraction(svd.singular_values, choice.rank, total), method, choice.limited_by


@dataclass
class _Outcome:
    """What one module's extraction gave: an adapter and its report row, or a skip."""

    module: str
    adapter: LowRank | None = None
    row: ExtractedModule | None = None
    skipped: float | None = None  # largest |diff| of a module at or below min_diff


def _extract_one(
    module: str,
    a: torch.Tensor,
    b: torch.Tensor,
    rule: RankRule,
    weight_shape: tuple[int, ...],
    dtype: torch.dtype | None,
    min_diff: float,
    oversample: int,
    power_iterations: int,
) -> _Outcome:
    """One module: the difference, its max, the skip test, the truncation."""
    if a.shape != b.shape:
        raise InputError(f"{module}: base {tuple(a.shape)} and tuned {tuple(b.shape)} differ in shape")
    out_dtype = dtype or (b.dtype if b.is_floating_point() else torch.float32)
    # one float32 copy of tuned, base subtracted in place (the tensors read stay untouched)
    diff = b.reshape(b.shape[0], -1).to(torch.float32, copy=True)
    diff.sub_(a.reshape(a.shape[0], -1))
    low, high = torch.aminmax(diff)
    largest = max(-float(low), float(high))
    if not math.isfinite(largest):
        raise InputError(f"{module}: the difference holds NaN or inf")
    if largest <= min_diff:
        return _Outcome(module, skipped=largest)
    shape = tuple(weight_shape)
    svd, k, kept, method, limited = truncate_difference(
        diff, rule, conv=is_conv_kxk(shape), oversample=oversample, power_iterations=power_iterations
    )
    del diff
    adapter = lowrank_from(svd, k, shape, dtype=out_dtype)
    return _Outcome(module, adapter, ExtractedModule(module, list(shape), k, kept, largest, method, limited))


def _open(path: str | os.PathLike[str], family: str | None) -> tuple[Checkpoint, CanonicalSource, str, FamilySpec]:
    ckpt = open_checkpoint(path)
    try:
        found = detect(ckpt.shapes(), ckpt.metadata, family=family)
    except Exception:
        ckpt.close()
        raise
    return ckpt, CanonicalSource(ckpt, found.keymap, found.layout), found.layout, found.family


def extract_lora(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    rule: RankRule,
    *,
    min_diff: float = 0.0,
    oversample: int = 16,
    power_iterations: int = 2,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[LoraFile, ExtractReport]:
    """A LoRA approximating ``tuned − base`` module by module (see the module docstring).

    ``dtype``: the factors' dtype (default: the tuned checkpoint's float dtype).
    ``progress(1)`` is called as each module is decomposed; its total (the target modules both
    checkpoints hold) is announced first (:func:`loratools.ops.progress.announce_total`).
    """
    if not (min_diff >= 0 and math.isfinite(min_diff)):
        raise InputError(f"--min-diff must be ≥ 0, got {min_diff}")
    if oversample < 0 or power_iterations < 0:
        raise InputError("oversampling and power iterations must be ≥ 0")
    base_ckpt, base_src, base_layout, spec = _open(base, family)
    try:
        tuned_ckpt, tuned_src, tuned_layout, tuned_spec = _open(tuned, family)
    except Exception:
        base_ckpt.close()
        raise
    with base_ckpt, tuned_ckpt:
        if tuned_spec.name != spec.name:
            raise InputError(f"{Path(base).name} is {spec.title} but {Path(tuned).name} is {tuned_spec.title}")
        report = ExtractReport(
            str(base), str(tuned), None, None, spec.name, base_layout, tuned_layout, rule.describe(), min_diff
        )
        adapters: dict[str, Adapter] = {}
        modules = name_tables(spec).modules
        present = []
        for module in extract_targets(spec):
            weight = f"{module}.weight"
            if weight in base_src.home and weight in tuned_src.home:
                present.append(module)
            else:
                report.missing.append(module)

        def pairs() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
            for module in present:
                weight = f"{module}.weight"
                a, b = base_src.canonical(weight), tuned_src.canonical(weight)
                yield module, a, b

        def work(item: tuple[str, torch.Tensor, torch.Tensor]) -> _Outcome:
            module, a, b = item
            return _extract_one(module, a, b, rule, modules[module].shape, dtype, min_diff, oversample,
                                power_iterations)  # fmt: skip

        # Modules are decomposed on every core, one thread each (loratools/threads.py): a
        # randomized SVD of one module is mostly small GEMMs and QRs whose OpenMP teams collapse
        # when another process holds a core, and one thread per module makes the bits independent
        # of the core count. The next modules are read (pread, no Python work) while these are
        # decomposed; at most workers + 1 pairs are in memory.
        announce_total(progress, len(present))
        for outcome in map_ordered(work, pairs()):
            if progress:
                progress(1)
            if outcome.adapter is not None and outcome.row is not None:
                adapters[outcome.module] = outcome.adapter
                report.modules.append(outcome.row)
            elif outcome.skipped is not None:
                report.skipped[outcome.module] = outcome.skipped
    if report.missing:
        report.warnings.append(
            f"{len(report.missing)} target modules are missing from a checkpoint (e.g. {report.missing[0]})"
        )
    if not adapters:
        raise InputError(
            f"{Path(tuned).name} does not differ from {Path(base).name} by more than {min_diff:g} in any LoRA-able module"
        )
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_training_comment": f"extracted by loratools ({rule.describe()}) from {Path(base).name} → {Path(tuned).name}",
    }
    return LoraFile(adapters, spec, "extracted", metadata), report


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    rule: RankRule | None = None,
    min_diff: float = 0.0,
    oversample: int = 16,
    power_iterations: int = 2,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExtractReport:
    """Extract a LoRA from ``tuned − base`` and write it to ``output`` (kohya by default).

    Rank: ``rank`` (``conv_rank`` for 3×3 convs) or a dynamic rule (``sv_ratio``, ``sv_fro``,
    ``sv_cumulative``) bounded by ``min_rank``/``max_rank``; see :func:`extract_lora`.
    """
    chosen = rank_rule(
        rank=rank,
        conv_rank=conv_rank,
        sv_ratio=sv_ratio,
        sv_fro=sv_fro,
        sv_cumulative=sv_cumulative,
        min_rank=min_rank,
        max_rank=max_rank,
        rule=rule,
    )
    check_output(output, base, tuned)
    fmt = output_format(to, None)
    torch_dtype = parse_dtype(dtype)
    opened = open_source(base), open_source(tuned)
    options = {"rule": chosen.describe(), "min_diff": min_diff or None}
    made_from = PendingRecord("extract", [("base", opened[0].path), ("tuned", opened[1].path)], options)
    lora, report = extract_lora(
        base,
        tuned,
        chosen,
        min_diff=min_diff,
        oversample=oversample,
        power_iterations=power_iterations,
        dtype=torch_dtype,
        family=family,
        progress=progress,
    )
    report.output, report.output_format = str(output), fmt
    report.warnings += write_lora(lora, output, fmt, overwrite=overwrite, provenance=made_from)
    return report
