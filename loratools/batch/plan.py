"""Which files a batch works on, and what each output is called.

Inputs are files, folders (their weight files; ``recursive`` descends into subfolders) and glob
patterns (``loras/*.safetensors``, ``**`` with ``recursive``). A peft adapter folder is one input,
not a folder of inputs. Outputs go to one folder, named by a template over the input's name
(:func:`output_name`); a folder input's subfolders are kept below the output folder, so two
``a.safetensors`` in different subfolders never collide. Every plan is checked before any work:
two inputs may not share an output, and no output may be an input.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.suffixes import WEIGHT_FILE_SUFFIXES

WEIGHT_SUFFIXES = WEIGHT_FILE_SUFFIXES
DEFAULT_NAME = "{stem}{suffix}"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Task:
    """One unit of work: ``command`` on ``source``, writing ``output`` (None for read-only commands).

    ``options`` are the command's own keyword options (plain, picklable values); the work function
    registered for ``command`` in :mod:`loratools.batch.work` turns them into the API call.
    """

    command: str
    source: str
    output: str | None
    options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


def is_adapter_folder(path: Path) -> bool:
    """A peft adapter folder (or one holding adapter subfolders) is one LoRA input."""
    if (path / "adapter_config.json").exists():
        return True
    return any((p / "adapter_config.json").exists() for p in path.iterdir() if p.is_dir())


def _is_candidate(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES


def _walk(folder: Path, recursive: bool) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden files include our own .name.XXXX.partial temporaries
        if entry.is_dir():
            if is_adapter_folder(entry):
                found.append(entry)
            elif recursive:
                found.extend(_walk(entry, recursive))
        elif _is_candidate(entry):
            found.append(entry)
    return found


def discover(inputs: list[str], *, recursive: bool = False) -> list[tuple[Path, Path]]:
    """Every input file as ``(path, relative name)``; the relative name keeps a folder's subfolders.

    Explicit files are taken whatever their suffix (the command will say if one is not a LoRA);
    folders and globs yield weight files only (``.safetensors``, ``.ckpt``, ``.pt``, ``.pth``,
    ``.bin``, ``.sft``) and peft adapter folders. Order: as given, each folder sorted by name;
    a file named twice is taken once. Raises :class:`InputError` for an input that names nothing.
    """
    out: list[tuple[Path, Path]] = []
    seen: set[str] = set()

    def add(path: Path, rel: Path) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            out.append((path, rel))

    for text in inputs:
        path = Path(text)
        if path.is_dir() and not is_adapter_folder(path):
            for found in _walk(path, recursive):
                add(found, found.relative_to(path))
        elif path.exists():
            add(path, Path(path.name))
        elif any(c in text for c in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=recursive))
            if not matches:
                raise InputError(f"{text}: pattern matches no file")
            for match in matches:
                found_path = Path(match)
                if _is_candidate(found_path) or (found_path.is_dir() and is_adapter_folder(found_path)):
                    add(found_path, Path(found_path.name))
        else:
            raise InputError(f"{text}: no such file or folder")
    return out


def output_name(template: str, source: Path, suffix: str) -> str:
    """The output file name for ``source``: ``template`` with ``{stem}`` (the input's name without
    its suffix), ``{name}`` (with it), ``{ext}`` (the input's suffix) and ``{suffix}`` (the
    output's: ``.safetensors``, or nothing for a folder output) filled in."""
    stem = source.name if source.is_dir() else source.stem
    try:
        name = template.format(stem=stem, name=source.name, ext=source.suffix, suffix=suffix)
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"--name {template!r}: {exc} (fields: {{stem}}, {{name}}, {{ext}}, {{suffix}})") from None
    if not name or "/" in name or name in (".", ".."):
        raise InputError(f"--name {template!r} gives {name!r} for {source.name}, not a file name")
    return name


def plan_tasks(
    command: str,
    inputs: list[str],
    output_dir: str | None,
    *,
    options: dict[str, Any] | None = None,
    recursive: bool = False,
    name: str = DEFAULT_NAME,
    suffix: str = ".safetensors",
    overwrite: bool = False,
    create_folders: bool = True,
) -> list[Task]:
    """One :class:`Task` per discovered input; outputs in ``output_dir`` (None: a read-only command).

    Refuses, before any work, two inputs with one output and an output that is an input.
    ``create_folders`` makes the output folder and the subfolders the outputs need.
    """
    found = discover(inputs, recursive=recursive)
    if not found:
        raise InputError(f"{', '.join(inputs)}: no LoRA files found (.safetensors/.ckpt/.pt/.bin; -r to recurse)")
    options = dict(options or {})
    if output_dir is None:
        return [Task(command, str(p), None, options, overwrite) for p, _ in found]
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: -o must be a folder when there are several inputs")
    planned = [(path, root / rel.parent / output_name(name, path, suffix)) for path, rel in found]
    for path, target in planned:
        if os.path.realpath(path) == os.path.realpath(target):
            raise InputError(f"{target}: output is its own input; choose another -o or --name")
    targets = {os.path.realpath(t) for _, t in planned}
    # an earlier run's outputs found among the inputs (-o inside the input folder) are not inputs
    planned = [(p, t) for p, t in planned if os.path.realpath(p) not in targets]
    sources = {os.path.realpath(p): p for p, _ in planned}
    tasks: list[Task] = []
    owners: dict[str, Path] = {}
    for path, target in planned:
        key = os.path.realpath(target)
        if key in sources:
            raise InputError(f"{target}: output would overwrite the input {sources[key]}; choose another -o or --name")
        if key in owners:
            raise InputError(f"{owners[key]} and {path} would both be written to {target}; use --name with {{ext}}")
        owners[key] = path
        tasks.append(Task(command, str(path), str(target), options, overwrite))
    if create_folders:
        for task in tasks:
            assert task.output is not None
            Path(task.output).parent.mkdir(parents=True, exist_ok=True)
    return tasks
