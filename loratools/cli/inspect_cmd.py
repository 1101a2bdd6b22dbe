"""``loratools inspect``: one screen per file, or one line per file of a folder; ``--json`` for scripts."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..classify import classify
from ..errors import InputError, LoratoolsError
from ..io.checkpoint import is_diffusers_folder
from ..io.hub import is_hub
from ..io.source import Source, open_source
from ..io.suffixes import WEIGHT_FILE_SUFFIXES
from ..ops.progress import Progress
from ..report import LoraReport, inspect_checkpoint, inspect_lora
from .batch import batchable
from .errors import user_errors
from .options import family_option, threads_option
from .progress import phase_progress
from .render import render_checkpoint
from .render_inspect import echo_json

WEIGHT_SUFFIXES = (*WEIGHT_FILE_SUFFIXES, ".pti")  # .pti: pivotal-tuning embeddings
# peft adapter subfolders that together are one LoRA (what diffusers and loratools write)
COMPONENT_FOLDERS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def inspect_one(
    path: str | Source,
    *,
    family: str | None,
    norms: bool,
    hashes: bool,
    keys: bool,
    progress: Progress | None = None,
) -> Any:  # CheckpointReport | LoraReport
    """The report of one file or model folder (``path`` may be ``hf://…``; the report keeps it).

    The input is opened once here and that :class:`Source` is what the classifier and the
    report read (a pickle is unpickled once); ``progress`` goes to the report's hashes/norms.
    """
    source = open_source(path)
    if classify(source) == "lora":
        report: Any = inspect_lora(source, family=family, norms=norms, hashes=hashes, keys=keys, progress=progress)
    else:
        report = inspect_checkpoint(source, family=family, hashes=hashes, keys=keys, progress=progress)
    if isinstance(path, str) and is_hub(path):
        report.path = path
    return report


@contextmanager
def collector_paused(active: bool) -> Iterator[None]:
    """The cyclic garbage collector off (and what exists so far frozen) while ``active``.

    Headers make tens of thousands of small dicts, tuples and dataclasses, all alive until the
    report is printed and none in a reference cycle: the collector's passes over them, and over
    every module imported before, were ~15 ms CPU of a header-only inspect of an SDXL LoRA (issue
    18 item 4). Frozen objects stay out of later collections too, the one at exit included.
    ``--norms`` (tensors) keeps the collector running.
    """
    if not active or not gc.isenabled():
        yield
        return
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def is_model_folder(path: Path) -> bool:
    """A diffusers checkpoint or a peft adapter folder is inspected as one model, not file by file.

    A folder counts as one adapter when it holds ``adapter_config.json`` itself, or when its only
    contents are component adapters (``unet/``, ``text_encoder/``…: one LoRA split by component).
    A plain folder that merely holds an adapter folder beside other files is listed entry by entry.
    """
    if is_diffusers_folder(path) or (path / "adapter_config.json").exists():
        return True
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    adapters = [p for p in entries if p.is_dir() and (p / "adapter_config.json").exists()]
    return bool(adapters) and all(p in adapters and p.name in COMPONENT_FOLDERS for p in entries)


def folder_entries(folder: Path) -> list[Path]:
    """Everything a plain folder holds (hidden entries aside), sorted by name: weight files and
    model folders are inspected, anything else gets a row saying why it is not."""
    return [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]


def skip_reason(entry: Path) -> str | None:
    """Why a folder entry is listed but not inspected (None: it is inspected)."""
    if entry.is_file():
        return None if entry.suffix.lower() in WEIGHT_SUFFIXES else "not a weights file"
    if entry.is_dir() and not is_model_folder(entry):
        return "a folder holding no model or adapter of its own (inspect it by name)"
    return None


def inspect_folder(
    folder: Path, console: Console, *, jobs: int, as_json: bool, **options: Any
) -> tuple[list[Any], list[tuple[Path, LoratoolsError]]]:
    """Every entry of ``folder``, in parallel threads (header reads release the GIL), with a bar."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    entries = folder_entries(folder)
    if not entries:
        raise InputError(
            f"{folder}: folder holds neither a diffusers model nor a peft adapter, "
            "nor any .safetensors/.ckpt/.pt/.bin file to inspect"
        )
    results: dict[Path, Any] = {}
    errors: list[tuple[Path, LoratoolsError]] = []
    skipped = {e: reason for e in entries if (reason := skip_reason(e)) is not None}
    entries = [e for e in entries if e not in skipped]
    stderr = Console(stderr=True)
    columns = (TextColumn("inspecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress,
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
    ):
        task = progress.add_task("inspecting", total=len(entries))

        def run(entry: Path) -> None:
            try:
                results[entry] = inspect_one(open_source(entry), **options)
            except LoratoolsError as exc:
                errors.append((entry, exc))
            finally:
                progress.advance(task)

        list(pool.map(run, entries))
    rows = [results[e] for e in entries if e in results]
    rows += [Skipped(str(e), reason) for e, reason in skipped.items()]
    return rows, sorted(errors, key=lambda e: str(e[0]))


class Skipped:
    """A folder entry listed without a report (not a weights file, a plain subfolder)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


@batchable("inspect")
@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@family_option
@threads_option
@click.option("--norms", is_flag=True, help="Also compute ‖ΔW‖_F per module and block (factor space; reads tensors).")
@click.option("--hashes", is_flag=True, help="Also hash the files: AutoV2/sha256, legacy, addnet; check stored sshs_*.")
@click.option("--keys", "show_keys", is_flag=True, help="List every stored key with its shape and dtype.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the facts as JSON (schemas loratools.inspect.lora/1, loratools.inspect.checkpoint/1).",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 64),
    default=min(8, os.cpu_count() or 1),
    show_default=True,
    help="Files inspected at once when PATH is a folder of files.",
)
def inspect_command(
    paths: tuple[str, ...], family: str | None, norms: bool, hashes: bool, show_keys: bool, as_json: bool, jobs: int
) -> None:
    """Show what is inside a checkpoint or a LoRA: family (from shapes, and what metadata claims),
    format/layout, module tree with kind/rank/alpha, dtypes, embeddings, metadata.

    PATHS are single files (.safetensors, or .ckpt/.pt/.bin read weights-only), diffusers
    folders, peft adapter folders, hf://owner/repo/path[@revision] references, or a plain folder:
    then every file in it is inspected in parallel and summarized in one line. Checkpoints and
    kohya/LyCORIS or diffusers .safetensors LoRAs are described from their headers alone (other
    LoRA dialects need their tensors); --norms and --hashes read the tensor bytes.

    \b
    Examples:
      loratools inspect my_lora.safetensors
      loratools inspect my_lora.safetensors --norms --hashes
      loratools inspect ./loras/                      # one line per file
      loratools inspect hf://owner/repo/lora.safetensors --json
    """
    console = Console()
    options: dict[str, Any] = {"family": family, "norms": norms, "hashes": hashes, "keys": show_keys}
    with collector_paused(not norms), user_errors():
        reports: list[Any] = []
        failures: list[tuple[Path, LoratoolsError]] = []
        folder_mode = False
        for p in paths:
            source = open_source(p)  # opened once: the folder test and the report read this one
            local = source.path
            if local.is_dir() and not is_model_folder(local):
                folder_mode = True
                found, errors = inspect_folder(local, console, jobs=jobs, as_json=as_json, **options)
                failures += errors
                if not as_json:  # one row per entry, in name order: reports, errors, skipped
                    rows: list[tuple[str, Any]] = [(Path(r.path).name, r) for r in found]
                    rows += [(entry.name, exc) for entry, exc in errors]
                    for _, row in sorted(rows, key=lambda r: r[0]):
                        if isinstance(row, Skipped):
                            console.print(f"[dim]{Path(row.path).name}  skipped: {row.reason}[/dim]", highlight=False)
                        elif isinstance(row, LoratoolsError):
                            name = next(e.name for e, x in errors if x is row)
                            console.print(f"[red]{name}[/red]: error: {row.one_line()}", highlight=False)
                        else:
                            _summary(console, row)
                reports += [r for r in found if not isinstance(r, Skipped)]
            else:
                # --norms/--hashes read every tensor byte: one bar, restarted by each step's total
                with phase_progress("inspecting", enabled=not as_json and (norms or hashes)) as meter:
                    report = inspect_one(source, **options, progress=meter)
                if is_hub(p):
                    report.path = p
                reports.append(report)
        if as_json:
            echo_json(
                reports[0].to_dict() if len(reports) == 1 and not folder_mode else [r.to_dict() for r in reports],
            )
        elif not folder_mode:
            _render_all(console, reports, norms=norms, keys=show_keys)
        if failures:
            worst = max(exc.exit_code for _, exc in failures)
            raise SystemExit(worst)


def _summary(console: Console, report: Any) -> None:
    from .render_inspect import summary_line

    name = Path(report.path).name if not is_hub(report.path) else report.path
    console.print(f"[bold]{name}[/bold]  {summary_line(report)}", highlight=False)


def _render_all(console: Console, reports: list[Any], *, norms: bool, keys: bool) -> None:
    from .render_inspect import checkpoint_tree, render_hashes, render_keys, render_lora_report

    for i, report in enumerate(reports):
        if i:
            console.print()
        if isinstance(report, LoraReport):
            render_lora_report(console, report, norms=norms, keys=keys)
        else:
            render_checkpoint(console, report)
            console.print(checkpoint_tree(report.tree))
            if report.hashes:
                render_hashes(console, report.hashes)
            if keys and report.keys is not None:
                render_keys(console, report.keys)
