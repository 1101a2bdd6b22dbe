"""Batch plumbing for the CLI: any file-in/file-out command over many files, folders and globs.

``@batchable("resize")`` above a command's ``@click.command`` makes its input argument take many
values and adds ``-r``, ``-j``, ``--name``, ``--engine``, ``--address``. With one input file and an
output that is not a folder the command runs exactly as before; with several inputs, a folder, a
glob, ``-r``, an output folder (existing or ending in ``/``) or ``--engine ray`` it hands over to
:mod:`loratools.batch` (one task per file, a summary table, ``--json`` a list, exit
:data:`~loratools.batch.EXIT_SOME_FAILED` when some file failed). ``loratools batch COMMAND`` is
the same command always in batch mode. The command's own options reach the per-file work
unchanged (:mod:`loratools.batch.work` maps them to the API call).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..errors import InputError
from .errors import user_errors

# options of the single-file commands that are the batch's own business, not the per-file work's
_NOT_WORK_OPTIONS = ("output", "overwrite", "as_json", "quiet", "dry_run", "threads", "jobs", "show_schema")
BATCH_COMMANDS: dict[str, click.Command] = {}  # name → the command forced into batch mode


class _NameOption(click.Option):
    """``--name``: its help shows :data:`loratools.batch.plan.DEFAULT_NAME`, but a command line
    without it gets None, resolved by :func:`run_batch_cli` where the batch package is loaded
    anyway. Importing loratools.batch (worker pool, subprocess, multiprocessing) to fill in a
    default that a single-file command never uses cost more than that command's own setup."""

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if call:  # parsing a command line
            return None
        from ..batch.plan import DEFAULT_NAME  # --help

        return DEFAULT_NAME


def _batch_params(existing: set[str], command: str) -> list[click.Parameter]:
    params: list[click.Parameter] = [
        click.Option(["-r", "--recursive"], is_flag=True, help="Batch: descend into subfolders of folder inputs."),
        _NameOption(
            ["--name", "name_template"],
            show_default=True,
            help="Batch: output file name; fields {stem} {name} {ext} {suffix}.",
        ),
        click.Option(
            ["--engine"],
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="Batch: worker processes on this machine, or Ray tasks (pip install 'loratools[ray]').",
        ),
        click.Option(["--address"], default=None, help="Batch with --engine ray: the cluster (e.g. auto)."),
    ]
    if "jobs" not in existing:
        params.append(
            click.Option(
                ["-j", "--jobs"],
                type=click.IntRange(1, 256),
                default=None,
                help="Batch: files at once (default: the free cores).",
            )
        )
    if command == "blend":
        params.append(
            click.Option(
                ["--with", "partner"],
                default=None,
                metavar="PARTNER[:W]",
                help="Batch: blend every input with this LoRA (inputs may be PATH:W).",
            )
        )
    return params


def _is_folder_output(path: str | None) -> bool:
    # Only a trailing separator asks for a folder of outputs: one input with an existing folder as its
    # output stays a single-file call, refused as "already exists" (a peft/diffusers output is a folder).
    return path is not None and path.endswith(("/", "\\"))


def _is_pattern(text: str) -> bool:
    return not Path(text).exists() and any(c in text for c in "*?[")


def _is_many(inputs: list[str]) -> bool:
    if len(inputs) != 1:
        return True
    one = Path(inputs[0].rpartition(":")[0] or inputs[0]) if not Path(inputs[0]).exists() else Path(inputs[0])
    if not one.is_dir():
        return _is_pattern(inputs[0])
    from ..batch.plan import is_adapter_folder  # a folder only: a file never loads the batch machinery
    from ..io.checkpoint import is_diffusers_folder

    return not (is_adapter_folder(one) or is_diffusers_folder(one)) or _is_pattern(inputs[0])


def batchable(command: str, *, input_param: str | None = None) -> Callable[[click.Command], click.Command]:
    """Give a click command batch mode (see the module doc). ``input_param``: the argument holding
    the input (default: the command's first argument). One line per command."""

    def wrap(original: click.Command) -> click.Command:
        wrapped = _wrap(original, command, input_param, forced=False)
        BATCH_COMMANDS[command] = _wrap(original, command, input_param, forced=True)
        return wrapped

    return wrap


def _wrap(original: click.Command, command: str, input_param: str | None, *, forced: bool) -> click.Command:
    arguments = [p for p in original.params if isinstance(p, click.Argument)]
    two_paths = command == "convert"  # convert SOURCE OUTPUT: the last path is the output folder
    source = input_param or arguments[0].name
    source_param = next(p for p in original.params if p.name == source)
    params: list[click.Parameter] = []
    for p in original.params:
        if isinstance(p, click.Argument) and p.name == source:
            params.append(click.Argument([source], nargs=-1, required=True, type=str))
        elif two_paths and isinstance(p, click.Argument):
            continue  # OUTPUT folds into SOURCE… (last value) or -o
        else:
            params.append(p)
    if two_paths:
        params.append(
            click.Option(
                ["-o", "--output-dir", "output_dir"],
                default=None,
                help="Batch: the output folder (instead of the last path).",
            )
        )
    names = {p.name for p in params if p.name}
    params += _batch_params(names, command)

    def callback(**kwargs: Any) -> Any:
        inputs = list(kwargs.pop(source))
        batch = {
            k: kwargs.pop(k)
            for k in ("recursive", "name_template", "engine", "address", "partner", "output_dir")
            if k in kwargs
        }
        jobs = kwargs.get("jobs") if "jobs" in {p.name for p in original.params} else kwargs.pop("jobs", None)
        if two_paths:
            output = batch.pop("output_dir")
            if output is None and len(inputs) >= 2:
                output = inputs.pop()
            if output is None:
                raise click.UsageError("convert needs SOURCE OUTPUT (or SOURCE… -o FOLDER)")
            kwargs["output"] = output
        output = kwargs.get("output")
        many = forced or batch["recursive"] or batch["engine"] != "local" or batch.get("partner") is not None
        if command == "inspect":
            many = many or any(_is_pattern(i) for i in inputs)
        elif command == "blend":  # several inputs are one blend; a folder or glob of them is a batch
            many = many or any(_is_many([i]) for i in inputs) or _is_folder_output(output)
        elif two_paths:  # convert's OUTPUT may be a folder of its own (peft, diffusers checkpoint)
            many = many or _is_many(inputs) or _is_folder_output(output)
        else:
            many = many or _is_many(inputs) or _is_folder_output(output)
        if not many:
            kwargs[source] = tuple(inputs) if source_param.nargs == -1 else inputs[0]
            return original.callback(**kwargs) if original.callback else None
        return run_batch_cli(command, inputs, kwargs, jobs=jobs, **batch)

    return click.Command(
        name=original.name,
        params=params,
        callback=callback,
        help=original.help,
        epilog=original.epilog,
        short_help=original.short_help,
        context_settings=original.context_settings,
    )


def run_batch_cli(
    command: str,
    inputs: list[str],
    kwargs: dict[str, Any],
    *,
    jobs: int | None,
    recursive: bool,
    name_template: str | None,
    engine: str,
    address: str | None,
    partner: str | None = None,
) -> None:
    """Plan, run and report a batch; exits with the batch's status."""
    from ..batch import default_jobs, plan_tasks
    from ..batch.plan import DEFAULT_NAME
    from ..batch.records import exit_status
    from ..batch.work import READ_ONLY, WORK, output_suffix

    as_json = bool(kwargs.get("as_json"))
    console = Console(stderr=as_json)
    with user_errors():
        if command not in WORK:
            raise InputError(f"{command}: no batch mode")
        options = {k: v for k, v in kwargs.items() if k not in _NOT_WORK_OPTIONS}
        if command == "blend":
            from ..ops.blend import parse_weighted

            if partner is None:
                raise InputError("blend over many files needs --with PARTNER[:WEIGHT]")
            options["partner"] = parse_weighted(partner)
            options.pop("loras", None)
            weighted = [parse_weighted(i) for i in inputs]
            weights = {w for _, w in weighted}
            if len(weights) > 1:
                raise InputError("batch blend: give every input the same :WEIGHT (or none)")
            inputs = [p for p, _ in weighted]
            options["weight"] = weights.pop()
        output = kwargs.get("output") if command not in READ_ONLY else None
        if command not in READ_ONLY and output is None:
            raise InputError(f"{command} over many files needs -o FOLDER")
        dry_run = bool(kwargs.get("dry_run"))
        tasks = plan_tasks(
            command,
            inputs,
            output,
            options=options,
            recursive=recursive,
            name=DEFAULT_NAME if name_template is None else name_template,
            suffix=output_suffix(command, options),
            overwrite=bool(kwargs.get("overwrite")),
            create_folders=not dry_run,
        )
        if dry_run:
            from ..batch.records import Result

            results = [Result(t.command, t.source, t.output, "planned") for t in tasks]
        else:
            results = _run_with_bar(tasks, jobs=jobs or default_jobs(len(tasks)), engine=engine, address=address)
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        render_results(console, results)
    status = exit_status(results)
    if status:
        sys.exit(status)


def _run_with_bar(tasks: list[Any], *, jobs: int, engine: str, address: str | None) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..batch import run_tasks

    stderr = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        bar = progress.add_task(f"{tasks[0].command} ×{len(tasks)}", total=len(tasks))
        return run_tasks(tasks, jobs=jobs, engine=engine, address=address, progress=lambda r: progress.advance(bar))


def render_results(console: Console, results: list[Any]) -> None:
    """The summary: one row per file (result, seconds, output size), failures with their reason."""
    from rich.table import Table

    from .render import human_bytes

    table = Table(show_edge=False, header_style="bold")
    for column, justify in (("file", "left"), ("result", "left"), ("seconds", "right"), ("output", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    styles = {"ok": "green", "skipped": "dim", "failed": "red", "planned": "cyan"}
    for r in results:
        label = {"skipped": "skipped (complete)"}.get(r.status, r.status)
        if r.error:
            label += f": {r.error}"
        size = human_bytes(r.output_bytes) if r.output_bytes is not None else "—"
        table.add_row(r.file, f"[{styles[r.status]}]{label}[/]", f"{r.seconds:.2f}", size)
    width = console.width
    if not console.is_terminal:
        console.width = max(width, 200)  # piped: one line per file
    try:
        console.print(table, highlight=False)
    finally:
        console.width = width
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed", "planned")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(results)} files")


class BatchGroup(click.Group):
    """``loratools batch COMMAND …``: every batchable command, always in batch mode."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from ..batch.work import WORK

        for name in WORK:
            _load_command(name)
        return sorted(BATCH_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        _load_command(name)
        return BATCH_COMMANDS.get(name)


def _load_command(name: str) -> None:
    """Import the command's module (the CLI group loads commands lazily), which registers it here."""
    from .main import cli

    cli.commands.get(name)


batch_group = BatchGroup(
    "batch",
    help="""Run a command over many files: loratools batch COMMAND INPUTS… -o FOLDER [options].

    \b
    The same as the command itself with several inputs; also with a single input, and with
    --engine ray [--address auto] to run the files as Ray tasks on a cluster (see README,
    "More than one machine"). Exit status 0 when every file succeeded or was already complete,
    4 when some failed (each file's row says why).

    \b
    Examples:
      loratools batch resize loras/ --rank 16 -o out/ -j 2
      loratools batch rescale 'loras/*.safetensors' --by 0.5 -o out/ --name '{stem}-half{suffix}'
      loratools batch resize loras/ -r --rank 16 -o out/ --engine ray --address auto
    """,
)
