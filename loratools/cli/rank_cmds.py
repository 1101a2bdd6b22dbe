"""``loratools rescale | resize | blend | extract``: rank surgery on LoRAs, in factor space."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import click
from rich.console import Console

from .batch import batchable
from .dryrun import destination, dry_run_option, json_fields, print_dry_run, say_written
from .errors import user_errors
from .options import blocks_from_option, dtype_option, family_option, overwrite_option, threads_option
from .progress import module_progress
from .render import print_json
from .table import ModuleTable, print_table

FORMAT_CHOICES = ("kohya", "diffusers", "peft", "cloneofsimo")

RULES_HELP = """\b
Rank rules (give one):
  --rank N            keep N singular values (--conv-rank M for 3×3 conv modules)
  --sv-ratio R        keep σᵢ with σ₀/σᵢ < R                       (kohya sv_ratio)
  --sv-fro F          fewest values with ‖ΔW_k‖_F ≥ F·‖ΔW‖_F        (kohya sv_fro)
  --sv-cumulative C   fewest values with Σ_{i<k} σᵢ ≥ C·Σσ          (kohya sv_cumulative)
  dynamic rules can be bounded with --min-rank/--max-rank"""


def rank_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--rank/--conv-rank and kohya's dynamic rules with --min-rank/--max-rank."""
    options = [
        click.option("--rank", type=int, default=None, help="Keep this many singular values per module."),
        click.option("--conv-rank", type=int, default=None, help="With --rank: the rank of 3×3 conv (LoCon) modules."),
        click.option("--sv-ratio", type=float, default=None, help="Keep σᵢ > σ₀/R (R ≥ 1)."),
        click.option(
            "--sv-fro", type=float, default=None, help="Keep the fewest σ with Frobenius share ≥ F (0 < F ≤ 1)."
        ),
        click.option(
            "--sv-cumulative", type=float, default=None, help="Keep the fewest σ with Σσ share ≥ C (0 < C ≤ 1)."
        ),
        click.option("--min-rank", type=int, default=None, help="Lower bound for a dynamic rule."),
        click.option("--max-rank", type=int, default=None, help="Upper bound for a dynamic rule."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-o, --to, --dtype, --family, --overwrite, --json."""
    options = [
        click.option("-o", "--output", type=click.Path(path_type=str), required=True, help="Where to write the LoRA."),
        click.option(
            "--to",
            type=click.Choice(FORMAT_CHOICES),
            default=None,
            help="Output dialect (default: the input's; kohya for dialects loratools only reads).",
        ),
        dtype_option,
        family_option,
        threads_option,
        overwrite_option,
        dry_run_option,
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _rules(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("rank", "conv_rank", "sv_ratio", "sv_fro", "sv_cumulative", "min_rank", "max_rank")
    return {n: kwargs.pop(n) for n in names}


def _warnings(console: Console, warnings: Sequence[str]) -> None:
    for warning in warnings[:10]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if len(warnings) > 10:
        console.print(f"[yellow]warning:[/yellow] … and {len(warnings) - 10} more (see --json)")


def _limit_note(limited_by: str | None, unchanged: bool = False) -> str:
    notes = {
        "available": "fewer σ than asked",
        "max-rank": "capped by --max-rank",
        "min-rank": "raised to --min-rank",
        "zero": "ΔW is zero",
    }
    text = notes.get(limited_by or "", "")
    return "unchanged" + (f", {text}" if text else "") if unchanged else text


@batchable("rescale")
@click.command()
@click.argument("lora", type=click.Path(path_type=str))
@click.option("--by", "by", type=float, required=True, help="Strength S: ΔW becomes S·ΔW (negative subtracts).")
@output_options
def rescale(lora: str, by: float, output: str, to: str | None, dtype: str | None, family: str | None,
            overwrite: bool, dry_run: bool, as_json: bool) -> None:  # fmt: skip
    """Change a LoRA's strength: ΔW' = S·ΔW for every module, exactly.

    \b
    |S| goes into each module's alpha and the sign of a negative S flips the up factor, so the
    factors are kept bit for bit and no square root of a signed number is ever taken. Modules
    without an alpha (full diffs, LoKr with two full halves) carry S in their first factor.
    kohya files store alpha in the factors' dtype: in fp16/bf16 files the new alpha is rounded
    once (reported as alpha rounding; --dtype fp32 avoids it).

    \b
    Example:
      loratools rescale style.safetensors --by 0.6 -o style-0.6.safetensors
      loratools rescale style.safetensors --by -1 -o anti-style.safetensors
    """
    console = Console(stderr=as_json)
    with user_errors():
        from ..ops.rescale import rescale as run

        with destination(output, dry_run, inputs=[lora], overwrite=overwrite) as dest:
            report = run(lora, dest.path, by, to=to, dtype=dtype, family=family, overwrite=overwrite)
        if as_json:
            print_json(Console(), {**report.to_dict(), **json_fields(dest)})
            return
        how = ", ".join(f"{n} via {k}" for k, n in report.representation.items())
        console.print(
            f"{say_written(console, dest)}: {report.modules} modules at strength {by:g} ({report.source_format} → "
            f"{report.output_format}); carried by {how}"
        )
        if report.alpha_rounding:
            console.print(
                f"[dim]alpha stored in the factors' dtype: rounding ≤ {report.alpha_rounding:.1e} relative[/dim]"
            )
        _warnings(console, report.warnings)
        print_dry_run(console, dest)


def render_retention(console: Console, rows: Sequence[Any]) -> None:
    """The per-module table: module, kind, rank before → after, Frobenius kept, note."""
    table = ModuleTable()
    table.add_column("module", fold=True)
    table.add_column("kind")
    table.add_column("rank", "right")
    table.add_column("‖ΔW‖_F kept", "right")
    table.add_column("note")
    for row in rows:
        old = "—" if row.old_rank is None else str(row.old_rank)
        new = "—" if row.new_rank is None else str(row.new_rank)  # a full diff, kept
        table.add_row(row.module, row.kind, f"{old} → {new}", f"{row.fro_kept:.2%}",
                      _limit_note(row.limited_by, row.unchanged))  # fmt: skip
    print_table(console, table)


@batchable("resize")
@click.command(epilog=RULES_HELP)
@click.argument("lora", type=click.Path(path_type=str))
@rank_options
@output_options
@click.option("--quiet", "-q", is_flag=True, help="Summary only, no per-module table.")
def resize(lora: str, output: str, to: str | None, dtype: str | None, family: str | None, overwrite: bool,
           dry_run: bool, as_json: bool, quiet: bool, **kwargs: Any) -> None:  # fmt: skip
    """Change a LoRA's rank: the optimal truncation of every module's ΔW.

    \b
    Computed in factor space (Gram/Cholesky of up and downᵀ, eigen-decomposition of the r×r core):
    exactly the truncated SVD of the dense ΔW, at O((out+in)·r²) per module and never an out×in
    matrix. LoHa/LoKr/Tucker modules come out as plain LoRA; full diffs (LyCORIS diff/diff_b) are
    kept as they are, with a warning: they have no rank to cut. A plain module keeps its scale
    (alpha = alpha/r · k, singular values in up, as kohya's resize_lora.py writes it); a module
    whose chosen rank equals its rank is kept bit for bit. Prints ranks and the share of ‖ΔW‖_F
    kept per module. --dry-run still computes every truncation (a dynamic rule's ranks are the
    output's shapes) but writes nothing, not even a temporary file.

    \b
    Examples:
      loratools resize big.safetensors --rank 32 -o small.safetensors
      loratools resize big.safetensors --sv-fro 0.9 --max-rank 64 -o dyn.safetensors
    """
    console = Console(stderr=as_json)
    with user_errors():
        from ..ops.resize import resize as run

        with (
            destination(output, dry_run, inputs=[lora], overwrite=overwrite) as dest,
            module_progress("resizing", enabled=not as_json) as advance,
        ):
            report = run(lora, dest.path, **_rules(kwargs), to=to, dtype=dtype, family=family, overwrite=overwrite,
                         progress=advance)  # fmt: skip
        if as_json:
            print_json(Console(), {**report.to_dict(), **json_fields(dest)})
            return
        if not quiet:
            render_retention(console, report.modules)
        changed = sum(not m.unchanged for m in report.modules)
        console.print(
            f"{say_written(console, dest)}: {len(report.modules)} modules ({changed} resized) by {report.rule}, "
            f"{report.parameters_before:,} → {report.parameters_after:,} parameters; ‖ΔW‖_F kept: "
            f"mean {report.mean_fro_kept:.2%}, min {report.min_fro_kept:.2%}"
        )
        _warnings(console, report.warnings)
        print_dry_run(console, dest)


@batchable("blend")
@click.command(epilog=RULES_HELP)
@click.argument("loras", nargs=-1, required=True, type=str)
@click.option(
    "--mode",
    type=click.Choice(["concat", "svd"]),
    default="concat",
    show_default=True,
    help="concat: exact, ranks add. svd: optimal truncation of Σ wᵢ·ΔWᵢ (needs a rank rule).",
)
@rank_options
@click.option(
    "--metadata",
    "metadata_policy",
    type=click.Choice(["keep-first", "merge", "fresh"]),
    default="keep-first",
    show_default=True,
    help="Metadata of the result: the first input's, all inputs' (first wins), or none. merged_from is always written.",
)
@blocks_from_option
@output_options
@click.option("--quiet", "-q", is_flag=True, help="Summary only, no per-module table.")
def blend(loras: tuple[str, ...], mode: str, metadata_policy: str, output: str, to: str | None, dtype: str | None,
          family: str | None, overwrite: bool, dry_run: bool, as_json: bool, quiet: bool, blocks_from: str,
          **kwargs: Any) -> None:  # fmt: skip
    """Combine LoRAs into one: ΔW = Σ wᵢ·ΔWᵢ for every module.

    \b
    LORAS are PATH or PATH:WEIGHT (weight 1 by default; negative subtracts), or merge's
    PATH:w=…,unet=…,te=…,te1=…,te2=…,lbw=…[@TOOL] (folded into each module). Ranks, alphas and
    kinds may differ. concat stacks the factors (alpha = Σ ranks; each part's scale split as
    sign·√|c| on up and √|c| on down) — exact. svd truncates the stacked factors in factor space to
    the optimal rank-k approximation of the sum. A module with a full-diff part (LyCORIS diff/diff_b)
    is summed exactly as a full diff in both modes, diff_b with the same weights.

    \b
    Examples:
      loratools blend a.safetensors:0.7 b.safetensors:0.3 -o ab.safetensors
      loratools blend a.safetensors b.safetensors:-0.5 --mode svd --rank 64 -o ab64.safetensors
    """
    console = Console(stderr=as_json)
    with user_errors():
        from ..ops.blend import blend as run

        rules = _rules(kwargs)
        sources = [spec.rsplit(":", 1)[0] if ":" in spec else spec for spec in loras]
        with (
            destination(output, dry_run, inputs=sources, overwrite=overwrite) as dest,
            module_progress("blending", enabled=not as_json) as advance,
        ):
            report = run(list(loras), dest.path, mode=mode, **rules, metadata=metadata_policy, to=to, dtype=dtype,
                         family=family, overwrite=overwrite, progress=advance, blocks_from=blocks_from)  # fmt: skip
        if as_json:
            print_json(Console(), {**report.to_dict(), **json_fields(dest)})
            return
        if not quiet and mode == "svd":
            table = ModuleTable()
            for column, justify in (("module", "left"), ("ranks in", "right"), ("rank", "right"),
                                    ("‖ΔW‖_F kept", "right"), ("note", "left")):  # fmt: skip
                table.add_column(column, justify, fold=True)  # type: ignore[arg-type]
            for m in report.modules:
                rank = "full" if m.new_rank is None else str(m.new_rank)
                table.add_row(m.module, "+".join(map(str, m.ranks_in)), rank, f"{m.fro_kept:.2%}",
                              _limit_note(m.limited_by))  # fmt: skip
            print_table(console, table)
        inputs = ", ".join(f"{i['source']}×{i['weight']:g}" for i in report.inputs)
        ranks_after = cast("dict[str, int]", report.to_dict()["ranks_after"])
        ranks = ", ".join(f"{r}×{n}" for r, n in ranks_after.items())  # ascending, full last
        console.print(
            f"{say_written(console, dest)}: {len(report.modules)} modules ({mode}; ranks {ranks}) from {inputs}"
        )
        _warnings(console, report.warnings)
        print_dry_run(console, dest)


@click.command(epilog=RULES_HELP)
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@rank_options
@click.option(
    "--min-diff",
    type=float,
    default=0.0,
    show_default=True,
    help="Skip (and list) modules whose largest |tuned − base| is at most this.",
)
@click.option("--oversample", type=click.IntRange(min=0), default=16, show_default=True,
              help="Randomized SVD: extra sketch columns.")  # fmt: skip
@click.option("--power-iterations", type=click.IntRange(min=0), default=2, show_default=True,
              help="Randomized SVD: power iterations.")  # fmt: skip
@output_options
@click.option("--quiet", "-q", is_flag=True, help="Summary only, no per-module table.")
def extract(base: str, tuned: str, min_diff: float, oversample: int, power_iterations: int, output: str,
            to: str | None, dtype: str | None, family: str | None, overwrite: bool, dry_run: bool, as_json: bool,
            quiet: bool, **kwargs: Any) -> None:  # fmt: skip
    """Extract a LoRA from a fine-tuned checkpoint: TUNED − BASE, truncated per module.

    \b
    Both checkpoints are streamed tensor by tensor (single files or diffusers folders, layouts may
    differ). Covers kohya's LoCon targets: U-Net attention/feed-forward/proj, resnet and sampler
    convs (3×3 as LoCon) and text-encoder attention/MLP wherever they differ. Randomized SVD
    (oversampling, power iterations) for large matrices, exact SVD for small ones and for
    --sv-cumulative or a dynamic rule without --max-rank. alpha = rank (scale 1). --dry-run
    computes the SVDs (which modules differ and their ranks decide the output) but writes nothing.

    \b
    Examples:
      loratools extract sd15.safetensors tuned.safetensors --rank 64 -o tuned-r64.safetensors
      loratools extract sd15.safetensors tuned-diffusers --sv-fro 0.9 --max-rank 128 -o dyn.safetensors
    """
    console = Console(stderr=as_json)
    with user_errors():
        from ..ops.extract import extract as run

        rules = _rules(kwargs)
        with (
            destination(output, dry_run, inputs=[base, tuned], overwrite=overwrite) as dest,
            module_progress("extracting", enabled=not as_json) as advance,
        ):
            report = run(base, tuned, dest.path, **rules, min_diff=min_diff, oversample=oversample,
                         power_iterations=power_iterations, to=to or "kohya", dtype=dtype, family=family,
                         overwrite=overwrite, progress=advance)  # fmt: skip
        if as_json:
            print_json(Console(), {**report.to_dict(), **json_fields(dest)})
            return
        if not quiet:
            table = ModuleTable()
            for column, justify in (("module", "left"), ("rank", "right"), ("‖ΔW‖_F kept", "right"),
                                    ("max |diff|", "right"), ("svd", "left"), ("note", "left")):  # fmt: skip
                table.add_column(column, justify, fold=True)  # type: ignore[arg-type]
            for m in report.modules:
                table.add_row(m.module, str(m.rank), f"{m.fro_kept:.2%}", f"{m.max_diff:.2e}", m.method,
                              _limit_note(m.limited_by))  # fmt: skip
            print_table(console, table)
        parts = ", ".join(
            f"{c}: {v['extracted']} extracted, {v['skipped']} skipped" for c, v in report.components().items()
        )
        console.print(f"{say_written(console, dest)}: {len(report.modules)} modules by {report.rule} ({parts})")
        if report.skipped:
            names = list(report.skipped)
            console.print(
                f"[dim]skipped (max |diff| ≤ {report.min_diff:g}): {', '.join(names[:6])}"
                f"{' …' if len(names) > 6 else ''}[/dim]"
            )
        _warnings(console, report.warnings)
        print_dry_run(console, dest)


def demo_resize(workdir: Path, console: Console) -> Any:
    """The demo's resize step: a sample SD1.5 LoCon (rank 8) resized to rank 4 and by sv-fro 0.9.

    Writes ``sample-lora-r8.safetensors``, ``…-r4.safetensors`` and ``…-fro90.safetensors`` into
    ``workdir``, prints the retention summary, and checks every module against a dense SVD
    truncation computed here independently; returns the rank-4 :class:`ResizeReport`. Raises
    ``click.ClickException`` if a module disagrees.
    """
    import torch

    from ..formats.io import load_lora, save_lora
    from ..ops.resize import resize as run
    from ..synthetic import TINY, make_lora

    spec = TINY["sd1"]
    source = save_lora(
        make_lora(spec, rank=8, conv=True, alphas="varied"), workdir / "sample-lora-r8.safetensors", "kohya",
        overwrite=True,
    )  # fmt: skip
    fixed = run(source, workdir / "sample-lora-r4.safetensors", rank=4, family=spec, overwrite=True)
    unet = [m for m in fixed.modules if m.module.startswith("unet.")]
    sample = [m for m in unet if m.kind == "lora"][:3] + [m for m in unet if m.kind == "locon"][:3]
    render_retention(console, sample)
    console.print(
        f"[dim]… and {len(fixed.modules) - len(sample)} more modules (loratools resize prints them all)[/dim]\n"
        f"rank 8 → 4: {len(fixed.modules)} modules, {fixed.parameters_before:,} → {fixed.parameters_after:,} "
        f"parameters, ‖ΔW‖_F kept: mean {fixed.mean_fro_kept:.1%}, min {fixed.min_fro_kept:.1%}"
    )
    dynamic = run(source, workdir / "sample-lora-fro90.safetensors", sv_fro=0.9, family=spec, overwrite=True)
    ranks_after = cast("dict[str, int]", dynamic.to_dict()["ranks_after"])
    ranks = ", ".join(f"rank {r}×{n}" for r, n in ranks_after.items())
    console.print(f"sv-fro 0.9: every module keeps ≥ 90% of ‖ΔW‖_F with the fewest ranks ({ranks})")
    before, after = load_lora(source, spec), load_lora(workdir / "sample-lora-r4.safetensors", spec)
    worst = 0.0
    for module, adapter in before.adapters.items():
        delta = adapter.delta().double().reshape(adapter.delta().shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = after.adapters[module].rank
        dense = (u[:, :k] * s[:k]) @ vh[:k]
        got = after.adapters[module].delta().double().reshape(dense.shape)
        worst = max(worst, float(torch.linalg.vector_norm(got - dense) / torch.linalg.vector_norm(dense)))
    ok = worst < 1e-5
    verdict = "[green]equal[/green]" if ok else "[red]DIFFERENT[/red]"
    console.print(f"factor-space resize vs dense SVD truncation of every ΔW: {verdict} (max relative diff {worst:.1e})")
    if not ok:
        raise click.ClickException("resize disagrees with the dense SVD truncation")
    return fixed
