"""The command matrix: one row per command, naming where a hostile input can go.

A row is a command name and its argument templates. Placeholders: ``{ckpt}`` / ``{lora}`` take a
hostile input (a case of that role), ``{ckpt2}`` / ``{lora2}`` a good companion of the same kind,
``{out}`` the output path. A command loratools gains is one more row here; a row whose command is
not (yet) in ``loratools --help`` is left out of the matrix automatically.

Which LoRA goes with a template: next to a checkpoint (merge, unmerge) a tiny LoRA that fits the
tiny test checkpoints; alone, a small LoRA with real SD1 shapes (LoRA-only commands resolve the
family from shapes, and a tiny LoRA fits no real model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loratools.cli.main import cli


@dataclass(frozen=True)
class Command:
    """One CLI command: its templates (argv as one string, split on spaces) and whether it writes."""

    name: str
    templates: tuple[str, ...]
    writes: bool


COMMANDS: tuple[Command, ...] = (
    Command("inspect", ("inspect {ckpt}", "inspect {lora}"), writes=False),
    Command("diff", ("diff {ckpt} {ckpt2}", "diff {lora} {lora2}"), writes=False),
    Command("convert", ("convert {ckpt} {out}.safetensors", "convert {lora} {out}.safetensors --to diffusers"), True),
    Command("merge", ("merge {ckpt} {lora} -o {out}.safetensors",), writes=True),
    Command("unmerge", ("unmerge {ckpt} {lora} -o {out}.safetensors",), writes=True),
    Command("rescale", ("rescale {lora} --by 0.5 -o {out}.safetensors",), writes=True),
    Command("resize", ("resize {lora} --rank 1 -o {out}.safetensors",), writes=True),
    Command("blend", ("blend {lora} {lora2}:0.5 -o {out}.safetensors",), writes=True),
    # --min-diff: modules that differ only by a dtype's rounding are skipped (fp16/bf16 cases stay fast)
    Command("extract", ("extract {ckpt} {ckpt2} --rank 1 --min-diff 0.005 -o {out}.safetensors",), writes=True),
)

ROLES = ("ckpt", "lora")


def available() -> tuple[Command, ...]:
    """The rows whose command exists in this build of the CLI."""
    return tuple(c for c in COMMANDS if c.name in cli.commands)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Slot:
    """Where a hostile input goes: a command, one of its templates, the placeholder it fills."""

    command: Command
    template: str
    role: str  # "ckpt" or "lora"

    @property
    def id(self) -> str:
        """``merge[lora]``, ``convert[ckpt]``: short and unique within a command."""
        return f"{self.command.name}[{self.role}]"

    @property
    def scale(self) -> str:
        """The LoRA size this template needs (see the module docstring)."""
        return "tiny" if "{ckpt}" in self.template else "full"

    def argv(self, paths: dict[str, str], *, weight: str | None = None) -> list[str]:
        """The argument list with every placeholder filled; ``weight`` replaces the hostile LoRA's."""
        text = self.template
        if weight is not None:
            if "{lora}:" in text:
                text = re.sub(r"\{lora\}:\S+", "{lora}:" + weight, text)
            elif "--by " in text:
                text = re.sub(r"--by \S+", f"--by {weight}", text)
            else:
                text = text.replace("{lora}", "{lora}:" + weight)
        return [part.format(**paths) for part in text.split(" ")]


def slots(commands: tuple[Command, ...] | None = None) -> list[Slot]:
    """Every (command, template, role) a hostile input can fill."""
    out = []
    for command in available() if commands is None else commands:
        for template in command.templates:
            for role in ROLES:
                if "{" + role + "}" in template:
                    out.append(Slot(command, template, role))
    return out
