"""``loratools convert``: LoRAs between dialects, checkpoints between layouts."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from ..classify import classify
from ..errors import InputError
from ..io.checkpoint import open_checkpoint
from ..io.source import open_source
from ..ops.checkpoint import convert_checkpoint
from .batch import batchable
from .dryrun import destination, dry_run_option, json_fields, print_dry_run, say_written
from .errors import user_errors
from .options import dtype_option, family_option, overwrite_option, threads_option, tokenizers_from_option
from .progress import byte_progress
from .render import human_bytes, print_json
from .render_accounting import render_accounting

LORA_TARGETS = ("kohya", "diffusers", "peft", "cloneofsimo", "comfyui")
CHECKPOINT_TARGETS = ("single", "diffusers")


@batchable("convert")
@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option(
    "--to",
    "target",
    type=click.Choice(sorted(set(LORA_TARGETS + CHECKPOINT_TARGETS))),
    default=None,
    help="LoRA: kohya | diffusers | peft | cloneofsimo | comfyui (FLUX.1).  Checkpoint: single | diffusers (folder). "
    "Default: kohya for LoRAs, the same layout for checkpoints.",
)
@dtype_option
@family_option
@tokenizers_from_option
@threads_option
@click.option(
    "--bake", is_flag=True, help="LoRA: fold each module's alpha/rank scale into its up factor (alpha = rank)."
)
@click.option(
    "--to-lora",
    is_flag=True,
    help="LoRA: re-factorize LoHa/LoKr/Tucker/full modules into plain LoRA by SVD (needs --rank or --error, "
    "not both). Ranks chosen per module from each spectrum (--sv-fro, --sv-ratio): `loratools resize`.",
)
@click.option(
    "--rank", type=click.IntRange(min=1), default=None, help="With --to-lora: keep this many singular values."
)
@click.option(
    "--error",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="With --to-lora: keep the fewest singular values with relative Frobenius error ≤ E.",
)
@click.option(
    "--max-rank",
    type=click.IntRange(min=1),
    default=None,
    help="With --to-lora: never more than this rank per module (default 64 with --error; none with --rank).",
)
@click.option(
    "--for",
    "for_target",
    default=None,
    help="LoRA: write the file TARGET (comfyui, a1111, forge, diffusers, invokeai, kohya) loads completely "
    "at the file's own strength (see loratools check).",
)
@overwrite_option
@dry_run_option
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert(
    source: str,
    output: str,
    target: str | None,
    dtype: str | None,
    family: str | None,
    tokenizers_from: str | None,
    bake: bool,
    to_lora: bool,
    rank: int | None,
    error: float | None,
    max_rank: int | None,
    for_target: str | None,
    overwrite: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Convert a LoRA between formats, or a checkpoint between layouts.

    \b
    LoRAs: any readable dialect (kohya/LyCORIS, diffusers/peft old and new, cloneofsimo) in;
    kohya, diffusers, peft (adapter folder) or cloneofsimo (safeloras) out. Conversions are
    exact (factors bit for bit, alpha carried in metadata where the format has no alpha tensor);
    what a format cannot hold exactly is refused with the way out: --bake, or --to-lora with
    --rank/--error (an SVD computed in factor space, no dense matrices for LoHa/LoKr).

    \b
    Checkpoints: single file (LDM/SGM) ↔ diffusers folder, streamed tensor by tensor.

    \b
    Examples:
      loratools convert my_lora.safetensors my_lora_diffusers.safetensors --to diffusers
      loratools convert lokr.safetensors lora.safetensors --to kohya --to-lora --error 0.05
      loratools convert sd15.safetensors sd15-diffusers --to diffusers --tokenizers-from ./sd15-hub
    """
    console = Console(stderr=as_json)
    with user_errors():
        opened = open_source(source)  # classified and (a pickle) unpickled once, for every step below
        kind = classify(opened)
        if tokenizers_from is not None and kind == "lora":
            raise InputError("--tokenizers-from applies to checkpoints written as diffusers folders, not LoRAs")
        if for_target is not None:  # loratools/check/fix.py decides the dialect; --to would contradict it
            from .check_cmd import convert_for_target, render_for_target

            with destination(output, dry_run, inputs=[source], overwrite=overwrite) as dest:
                fixed = convert_for_target(source, output, for_target, target, family, dtype, to_lora, rank, error,
                                           overwrite)  # fmt: skip
            render_for_target(fixed, dest, as_json)
            print_dry_run(console, dest)
            return
        if kind == "lora":
            from ..ops.convert import convert_lora  # torch is imported only where tensors are touched

            if target in (None, "single"):
                if target == "single":
                    raise InputError(
                        f"{source} is a LoRA; --to single is for checkpoints (use kohya, diffusers, peft or cloneofsimo)"
                    )
                target = "kohya"
            with destination(output, dry_run, inputs=[source], overwrite=overwrite) as dest:
                report = convert_lora(
                    opened,
                    dest.path,
                    target,
                    family=family,
                    dtype=dtype,
                    bake_scale=bake,
                    to_lora=to_lora,
                    rank=rank,
                    error=error,
                    max_rank=max_rank,
                    overwrite=overwrite,
                    notify=console.print if to_lora and not as_json else None,
                )
            if as_json:
                print_json(Console(), {**report.__dict__, "output": output, **json_fields(dest)})
                return
            how = (
                "exact"
                if report.exact
                else (
                    f"{report.baked} baked, {report.refactorized} re-factorized (max error {report.max_relative_error:.2e})"
                )
            )
            console.print(
                f"{say_written(console, dest)}: {report.modules} modules, {report.source_format} → "
                f"{report.output_format} ({report.family}), {how}"
            )
            told = {w for w in report.warnings if "× the input" in w} if to_lora else set()  # said before writing
            for warning in [w for w in report.warnings if w not in told][:10]:
                console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
            print_dry_run(console, dest)
            return
        if target not in (None, *CHECKPOINT_TARGETS):
            raise InputError(f"{source} is a checkpoint; --to {target} is for LoRAs (use single or diffusers)")
        if bake or to_lora or rank or error or max_rank:
            raise InputError("--bake/--to-lora/--rank/--error/--max-rank apply to LoRAs, not checkpoints")
        with open_checkpoint(opened) as ckpt:
            total = ckpt.nbytes
        with (
            destination(output, dry_run, inputs=[source], overwrite=overwrite) as dest,
            byte_progress(console, "converting", enabled=not as_json, total=total) as advance,
        ):
            ck = convert_checkpoint(
                opened,
                dest.path,
                layout=target,
                dtype=dtype,
                family=family,
                overwrite=overwrite,
                progress=advance,
                tokenizers_from=tokenizers_from,
            )
        if as_json:
            print_json(Console(), {**ck.__dict__, "output": output, **json_fields(dest)})
            return
        console.print(
            f"{say_written(console, dest)}: {ck.tensors_written} tensors, {human_bytes(ck.bytes_written)} "
            f"({ck.raw_copied} copied as raw bytes), {ck.source_layout} → {ck.output_layout}"
        )
        render_accounting(console, ck)
        print_dry_run(console, dest)
