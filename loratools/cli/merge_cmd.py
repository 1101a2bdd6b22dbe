"""``loratools merge`` and ``loratools unmerge``: bake LoRAs into a checkpoint, or take them out."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..classify import classify, has_lora_keys
from ..families import FAMILIES
from ..formats.lookalike import lora_not_checkpoint
from ..io.checkpoint import open_checkpoint
from ..io.hub import is_hub
from ..io.safetensors import FLOAT_DTYPES, ITEMSIZE
from ..io.source import Source, open_source
from .dryrun import Destination, print_dry_run
from .errors import user_errors
from .options import (
    blocks_from_option,
    dtype_option,
    family_option,
    overwrite_option,
    threads_option,
    tokenizers_from_option,
)
from .progress import byte_progress
from .render import human_bytes, print_json
from .render_accounting import render_accounting

LORA_SYNTAX = """\b
LORA arguments (any format loratools reads; repeat for several):
  lora.safetensors              weight 1
  lora.safetensors:0.7          weight 0.7 (negative subtracts)
  lora.safetensors:unet=1,te=0.5          U-Net and text-encoder weights
  lora.safetensors:te1=1,te2=0            SDXL / FLUX.1: each text encoder on its own
  lora.safetensors:w=0.8,lbw=OUTALL       block weights: a preset (SD 1.x/2.x and SDXL)
  lora.safetensors:lbw=1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
                                block weights: 17/26 values (SD 1.x/2.x), 12/20 (SDXL), 61
                                (FLUX.1) in lora-block-weight's numbering
  lora.safetensors:lbw=1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0@inspire
                                a vector in another tool's numbering: @lbw, @inspire
                                (Inspire-Pack: SDXL 12/21, FLUX.1 58), @lycoris (weight helper);
                                --blocks-from TOOL sets the default. Tables: docs/FORMATS.md §13"""


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("-o", "--output", type=click.Path(path_type=str), default=None, help="Where to write the result."),
        click.option(
            "--to",
            "layout",
            type=click.Choice(["single", "diffusers"]),
            default=None,
            help="Output layout: single file (LDM/SGM) or diffusers folder (default: the input's).",
        ),
        dtype_option,
        family_option,
        tokenizers_from_option,
        threads_option,
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="Where ΔW is computed (auto: CUDA when present).",
        ),
        click.option(
            "--batch-mb",
            type=click.IntRange(min=16),
            default=128,
            show_default=True,
            help="Float32 work per batch in MiB; peak memory is about two batches.",
        ),
        click.option("--strict", is_flag=True, help="Fail if any LoRA module patches nothing."),
        click.option("--dry-run", is_flag=True, help="Print the plan (what is patched, dtypes, size); write nothing."),
        click.option(
            "--verify",
            type=click.IntRange(min=1),
            is_flag=False,
            flag_value=16,
            default=None,
            help="Recompute N patched tensors (default 16) from the written file before it is put in place.",
        ),
        click.option(
            "--skip-nonfinite", is_flag=True, help="Leave out LoRA modules with NaN/inf factors (default: refuse)."
        ),
        blocks_from_option,
        overwrite_option,
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema loratools.merge/1)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _output_total(base: Source, dtype: str | None) -> int:
    """Bytes the output will hold (for the progress bar), from the base's header."""
    from ..ops.checkpoint import parse_dtype_name

    target = parse_dtype_name(dtype)
    with open_checkpoint(base) as ckpt:
        if target is None:
            return ckpt.nbytes
        size = ITEMSIZE[target]
        return sum(i.numel * size if i.dtype in FLOAT_DTYPES else i.nbytes for i in map(ckpt.info, ckpt))


def _import_engine() -> None:
    """Imports the merge engine (and with it torch); a failure is left for the main thread to raise."""
    with contextlib.suppress(Exception):  # the main thread's own import reports it
        importlib.import_module("..ops.merge", __package__)


def _run(operation: str, base: str, loras: tuple[str, ...], options: dict[str, Any], original: str | None) -> None:
    as_json = options.pop("as_json")
    console = Console(stderr=as_json)
    with user_errors():
        # torch's import (1–3 s) runs in a thread while the base's header is read and classified
        # and the whole merge is planned from headers (ops/merge_plan.py, issue 18 item 5); the
        # main thread imports nothing of the engine until the plan stands and it joins the thread.
        engine = None
        if not options["dry_run"]:
            engine = threading.Thread(target=_import_engine, name="loratools-import", daemon=True)
            engine.start()
        opened = open_source(base)  # classified and (a pickle) unpickled once, for every step below
        if not is_hub(base) and classify(opened) == "lora" and has_lora_keys(base):  # arguments swapped: say so
            raise lora_not_checkpoint(Path(base).name)
        from ..ops.merge_plan import Executor, parse_lora_arg, run  # torch-free

        blocks_from = options.pop("blocks_from")
        inputs = [parse_lora_arg(text, blocks_from) for text in loras]
        budget = options.pop("batch_mb") * 2**20
        verify = options.pop("verify") or 0
        output = options.pop("output")
        total = 0 if options["dry_run"] else _output_total(opened, options["dtype"])
        label = "merging" if operation == "merge" else "unmerging"
        with byte_progress(console, label, enabled=not as_json and not options["dry_run"], total=total) as advance:

            def executor() -> Executor:
                if engine is not None:
                    engine.join()
                from ..ops.merge import executor  # torch is imported only where tensors are touched

                return executor(
                    options["device"],
                    budget,
                    family=options["family"],
                    verify=verify,
                    overwrite=options["overwrite"],
                    progress=advance,
                )

            report = run(operation, opened, inputs, output, original=original, executor=executor, **options)
        if as_json:
            print_json(Console(), report.to_dict())
            return
        render_merge(console, report)


def render_merge(console: Console, report: Any) -> None:
    """The match report, the write summary, verification and residuals."""
    verb = {"merge": "merged", "unmerge": "unmerged"}[report.operation]
    if report.dry_run:
        verb = f"plan ({report.operation}, nothing written)"
    target = Path(report.output).name if report.output else "—"
    family = FAMILIES[report.family].title
    console.print(
        f"[bold]{verb}[/bold]: {Path(report.base).name} → {target}  ({family}, {report.layout} → {report.output_layout}, "
        f"ΔW on {report.device})"
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("LoRA", "format", "weights", "patched", "unmatched"):
        table.add_column(column)
    for m in report.loras:
        weights = f"{m.weight:g}" if m.unet == m.text == m.weight else f"unet {m.unet:g}, te {m.text:g}"
        for key in ("te1", "te2"):
            if getattr(m, key, None) is not None:
                weights += f", {key} {getattr(m, key):g}"
        if m.blocks:
            weights += f", blocks {m.blocks}"
        patched = ", ".join(f"{c} {n}" for c, n in sorted(m.patched.items())) or "nothing"
        if m.zero_weight:
            patched += f" ({m.zero_weight} at weight 0)"
        table.add_row(Path(m.path).name, m.format, weights, patched, str(len(m.unmatched)))
    console.print(table)
    shown = 0
    for m in report.loras:
        for module, reason in m.unmatched.items():
            if shown == 8:
                console.print(f"  [dim]… {report.unmatched - shown} more (--json lists them all)[/dim]")
                break
            console.print(f"  [yellow]unmatched[/yellow] {Path(m.path).name}: {module} — {reason}")
            shown += 1
    for m in report.loras:
        extra = [item for item in m.not_applied if item["item"] not in m.unmatched]
        for item in extra:
            console.print(f"  [yellow]not applied[/yellow] {Path(m.path).name}: {item['item']} — {item['reason']}")
    patched = ", ".join(f"{c} {n}" for c, n in sorted(report.patched.items()))
    dtypes = ", ".join(f"{k} ×{n}" for k, n in sorted(report.dtype_plan.items()))
    console.print(
        f"tensors: {sum(report.dtype_plan.values())} ({dtypes}), patched: {patched}; "
        f"output {human_bytes(report.output_bytes)}"
    )
    if not report.dry_run:
        console.print(f"{report.raw_copied} untouched tensors copied as raw bytes; {report.seconds:.2f} s")
    if report.verified:
        worst = max(v["max_abs_error"] for v in report.verified)
        console.print(f"[green]verified[/green] {len(report.verified)} tensors against W + ΔW (max error {worst:.3g})")
    for component, stats in sorted(report.residual.items()):
        console.print(
            f"residual vs base, {component}: max |Δ| {stats['max_abs']:.3g}, relative {stats['relative']:.3g}"
        )
    render_accounting(console, report)
    for warning in report.warnings[:10]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if report.dry_run:  # the exact size, in the words every other writer's dry run uses
        print_dry_run(
            console, Destination(report.output or "the output", report.output or "", True, report.output_bytes)
        )


@click.command(epilog=LORA_SYNTAX)
@click.argument("base", type=click.Path(path_type=str))
@click.argument("loras", nargs=-1, required=True)
@_common
def merge(base: str, loras: tuple[str, ...], **options: Any) -> None:
    """Bake one or more LoRAs into a checkpoint (single file or diffusers folder).

    Streamed from disk to disk: untouched tensors are copied as raw bytes, patched ones get
    W + Σ weight·ΔW computed in float32 (batched by shape, on the GPU when there is one) and
    rounded once to their own dtype (or --dtype). Memory stays at a couple of batches whatever
    the checkpoint's size. The output appears only when complete.

    \b
    Examples:
      loratools merge sd15.safetensors style.safetensors:0.8 -o sd15-style.safetensors
      loratools merge sdxl.safetensors a.safetensors b.safetensors:-0.5 -o out.safetensors --verify
      loratools merge ./sd15-diffusers detail.safetensors:lbw=OUTALL -o merged --dry-run
    """
    _run("merge", base, loras, options, None)


@click.command(epilog=LORA_SYNTAX)
@click.argument("merged", type=click.Path(path_type=str))
@click.argument("loras", nargs=-1, required=True)
@click.option(
    "--base",
    "original",
    type=click.Path(path_type=str),
    default=None,
    help="The original checkpoint: report how far the result is from it (max abs, relative).",
)
@_common
def unmerge(merged: str, loras: tuple[str, ...], original: str | None, **options: Any) -> None:
    """Take LoRAs back out of a merged checkpoint: W = W' − Σ weight·ΔW, in float32.

    Give the LoRAs with the weights they were merged at. The result equals the original up to
    the rounding of the merged file; --base ORIGINAL measures exactly how close it is.

    \b
    Example:
      loratools unmerge merged.safetensors style.safetensors:0.8 -o restored.safetensors --base sd15.safetensors
    """
    _run("unmerge", merged, loras, options, original)
