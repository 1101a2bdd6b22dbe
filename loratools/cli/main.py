"""``loratools`` — the click group; one module per command, imported only when it runs."""

from __future__ import annotations

from .. import threads

# Before any command module loads torch or numpy: their BLAS/OpenMP pools start with one thread
# unless the user set OMP_NUM_THREADS/MKL_NUM_THREADS (loratools/threads.py raises it where it pays).
threads.prepare_environment()

import importlib  # noqa: E402

import click  # noqa: E402

from .. import __version__  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Command name → "module:attribute" under loratools.cli, imported on first use: `loratools inspect`
# never loads the merge engine (or torch). One line per command; `--help` lists them in this order.
COMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd:inspect_command",
    "check": "check_cmd:check_command",
    "diff": "diff_cmd:diff_command",
    "convert": "convert_cmd:convert",
    "merge": "merge_cmd:merge",
    "unmerge": "merge_cmd:unmerge",
    "rescale": "rank_cmds:rescale",
    "resize": "rank_cmds:resize",
    "blend": "rank_cmds:blend",
    "extract": "rank_cmds:extract",
    "demo": "demo_cmd:demo",
    "batch": "batch:batch_group",
    "census": "census_cmd:census",
    "docs": "docs_cmd:docs_command",
}


class LazyCommands(dict):
    """``click.Group.commands`` that imports a :data:`COMMANDS` entry when it is looked up.

    ``name in cli.commands`` and iteration see every registered name without importing anything;
    commands added with ``add_command`` are kept as by a plain dict.
    """

    def __missing__(self, name: str) -> click.Command:
        if name not in COMMANDS:
            raise KeyError(name)
        module, attribute = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
        assert isinstance(command, click.Command)
        self[name] = command
        return command

    def get(self, name: str, default: click.Command | None = None) -> click.Command | None:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or dict.__contains__(self, name)

    def __iter__(self):
        yield from COMMANDS
        yield from (name for name in dict.keys(self) if name not in COMMANDS)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def keys(self):
        return list(iter(self))

    def values(self):
        return [self[name] for name in self]

    def items(self):
        return [(name, self[name]) for name in self]


@click.group(
    context_settings=CONTEXT,
    epilog="Formats reference, cited as docs/FORMATS.md §N: `loratools docs N` prints section N "
    "(installed with the package; `loratools docs --list` shows them all).",
)
@click.version_option(__version__, prog_name="loratools")
def cli() -> None:
    """LoRA weight surgery for Stable Diffusion (SD 1.x, 2.x, SDXL) and FLUX.1, directly on state dicts.

    \b
    Every command reads headers first and tensors one at a time; outputs are written to a
    temporary file and renamed into place only when complete.

    \b
    Try:  loratools demo
          loratools inspect model.safetensors
          loratools convert model.safetensors model-diffusers --to diffusers
          loratools merge model.safetensors style.safetensors:0.8 -o merged.safetensors
    """


cli.commands = LazyCommands()


def main() -> None:
    cli(prog_name="loratools")


if __name__ == "__main__":
    main()
