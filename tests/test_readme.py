"""README.md runs as written: every ```python and ```bash block, on tiny generated data.

How a block gets its files (read this before adding a README section):

* Each block runs in an empty temporary folder (its cwd). Before it runs, every file name the block
  mentions is created there, unless the block writes it. A *name* is a string constant (Python,
  found with ``ast``) or a shell word (bash, comments stripped) that looks like a weight file
  (``*.safetensors``, ``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.sft``), a folder (``word/``) or an
  ``hf://owner/repo/path[@rev]`` reference (laid out in an offline Hugging Face cache).
* Inputs are created by the first row of ``FIXTURES`` whose pattern matches the whole name
  (``re.fullmatch``); a row's generator writes the file or folder at the given path, for the
  given family spec. Checkpoints are always tiny SD1.5 ones (the real key set, small widths). A
  LoRA fits the checkpoint named beside it (in the same bash command, or the same Python block):
  then it has the tiny widths; alone, it has SD1.5's real widths, since a LoRA read without a
  base is matched to the real families. bash blocks are arranged command by command; a file an
  earlier command created is left as it is.
* Outputs are never created: a bash word after ``-o``/``--output``, the second positional word of
  ``loratools convert``, and every name in ``OUTPUTS`` (Python blocks: list what they write there).
* A name that matches no row and is no output fails the block's test with a message saying so:
  add a ``FIXTURES`` row (or an ``OUTPUTS`` entry) for it.
* bash: each line (``\\`` continuations joined) is a chain of commands joined by ``&&``.
  ``loratools …`` runs in-process through click; ``pip install …`` is not run (it is checked to
  install this project); ``python -m pytest`` is not run (it is this suite; it must be the command
  ``.ci/run`` runs). Anything else fails: mark such a block.
* A block that cannot run as written (a hub, a GPU, full-size files) is preceded by the line
  ``<!-- readme-test: skip (the reason) -->``; it is reported as skipped with that reason.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import REPO

from loratools.cli.main import cli
from loratools.families import FAMILIES
from loratools.families.spec import FamilySpec
from loratools.formats.adapters import LoKr, LoraFile
from loratools.formats.io import save_lora
from loratools.synthetic import TINY, make_lora, write_checkpoint

README = REPO / "README.md"
SKIP_MARK = re.compile(r"^<!-- readme-test: skip \((?P<reason>.+)\) -->$")
FENCE = re.compile(r"^```(?P<lang>python|bash)\n(?P<code>.*?)^```$", re.M | re.S)
FILE_NAME = re.compile(r"(?:\./)?[\w.-]+(?:/[\w.-]+)*\.(?:safetensors|ckpt|pt|pth|bin|sft)")
FOLDER_NAME = re.compile(r"(?:\./)?[\w.-]+(?:/[\w.-]+)*/")
HUB_NAME = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)/(?P<path>[\w./-]+?)(?:@(?P<rev>[\w.-]+))?")


# --- generators: each writes one input at ``path`` for ``spec`` ------------------------------------


def tiny_checkpoint(path: Path, spec: FamilySpec, *, seed: int = 0) -> None:
    """A tiny SD1.5 checkpoint (real key set, small widths): a single file, or a folder for ``name/``."""
    layout = "diffusers" if path.suffix == "" else "single"
    write_checkpoint(TINY["sd1"], path, layout, seed=seed)


def tuned_checkpoint(path: Path, spec: FamilySpec) -> None:
    """The same architecture with other weights (another seed): what ``extract`` compares against."""
    tiny_checkpoint(path, spec, seed=1)


def kohya_lora(path: Path, spec: FamilySpec, *, rank: int = 2, seed: int = 0) -> None:
    """A kohya LoRA (U-Net + text), fp16."""
    save_lora(make_lora(spec, rank=rank, seed=seed, dtype=torch.float16), path, "kohya")


def big_lora(path: Path, spec: FamilySpec) -> None:
    """A rank-8 kohya LoRA, so ``resize --rank N`` / ``--sv-fro`` have singular values to cut."""
    kohya_lora(path, spec, rank=8, seed=3)


def lokr_lora(path: Path, spec: FamilySpec) -> None:
    """A LyCORIS LoKr over the U-Net's 2-D modules (w1 ⊗ w2a·w2b), saved in kohya naming."""
    gen = torch.Generator().manual_seed(5)
    adapters = {}
    for module, adapter in make_lora(spec, rank=1, text=False).adapters.items():
        out, inp = adapter.up.shape[0], adapter.down.shape[1]  # type: ignore[union-attr]
        if adapter.down.dim() != 2 or out % 2 or inp % 2:  # type: ignore[union-attr]
            continue
        w1 = torch.randn(2, 2, generator=gen)
        w2a, w2b = torch.randn(out // 2, 2, generator=gen) * 0.1, torch.randn(2, inp // 2, generator=gen) * 0.1
        adapters[module] = LoKr(2.0, w1=w1, w2a=w2a, w2b=w2b)
    save_lora(LoraFile(adapters, spec, "synthetic"), path, "kohya")


def lora_folder(path: Path, spec: FamilySpec) -> None:
    """A folder of two LoRAs (what ``inspect DIR`` walks)."""
    path.mkdir(parents=True, exist_ok=True)
    kohya_lora(path / "one.safetensors", spec)
    kohya_lora(path / "two.safetensors", spec, rank=1, seed=1)


Generator = Callable[[Path, FamilySpec], None]
CHECKPOINTS: set[Generator] = {tiny_checkpoint, tuned_checkpoint}

# (pattern, generator): the first pattern that fully matches a name creates it. Add rows here.
FIXTURES: list[tuple[str, Generator]] = [
    (r"(v1-5-pruned-emaonly|sd15)\.safetensors", tiny_checkpoint),
    (r"tuned-diffusers/?", tuned_checkpoint),
    (r"[\w-]*-diffusers/?", tiny_checkpoint),
    (r"[\w-]*lokr[\w-]*\.safetensors", lokr_lora),
    (r"big\.safetensors", big_lora),
    (r"(my_lora|lora|style|detail|a|b|old|new)\.safetensors", kohya_lora),
    (r"(\./)?loras/", lora_folder),
]

# Files the README's Python blocks write (bash outputs are found from -o and convert's OUT).
OUTPUTS = {
    "sd15-diffusers",
    "my_lora_diffusers.safetensors",
    "lora.safetensors",
    "sd15-merged.safetensors",
    "restored.safetensors",
    "small.safetensors",
}


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Every ```python / ```bash block, with the skip reason of a marker on the line before it."""
    lines = text.splitlines()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = next((lines[i].strip() for i in range(line - 2, -1, -1) if lines[i].strip()), "")
        mark = SKIP_MARK.match(before)
        blocks.append(Block(match["lang"], match["code"], line, mark["reason"] if mark else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())


def _is_name(word: str) -> bool:
    return any(p.fullmatch(word) for p in (FILE_NAME, FOLDER_NAME, HUB_NAME))


def _commands(code: str) -> list[list[str]]:
    """bash: one word list per command (lines joined at ``\\``, split at ``&&``, comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1 :]
    return out


def _plain(word: str) -> str:
    return word if word.startswith("hf://") else word.split(":", 1)[0]  # LORA[:W] → LORA


def command_names(words: list[str]) -> tuple[set[str], set[str]]:
    """(inputs, outputs) one bash command names."""
    names = {_plain(w) for w in words if _is_name(_plain(w))}
    outputs = {_plain(w) for i, w in enumerate(words) if i and words[i - 1] in ("-o", "--output")}
    if words[:2] == ["loratools", "convert"]:
        positional = [w for w in words[2:] if not w.startswith("-")]
        outputs |= set(positional[1:2])
    outputs |= names & OUTPUTS
    return names - outputs, outputs


def python_names(code: str) -> tuple[set[str], set[str]]:
    """(inputs, outputs) a Python block names: its string constants that look like files."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = _plain(node.value)
            if _is_name(value) or value in OUTPUTS:
                names.add(value)
    return names - OUTPUTS, names & OUTPUTS


def _hub_file(cache: Path, ref: str) -> tuple[Path, str]:
    """Where an hf:// reference lives in an offline huggingface_hub cache (refs laid out), and its file name."""
    match = HUB_NAME.fullmatch(ref)
    assert match, ref
    repo = cache / f"models--{match['repo'].replace('/', '--')}"
    sha = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / (match["rev"] or "main")).write_text(sha)
    return repo / "snapshots" / sha / match["path"], Path(match["path"]).name


def _generator(name: str) -> Generator | None:
    return next((make for pattern, make in FIXTURES if re.fullmatch(pattern, name)), None)


def arrange(where: str, names: set[str], cwd: Path, hub_cache: Path) -> None:
    """Create every input in ``names`` in ``cwd`` (hf:// ones in ``hub_cache``), or fail saying which."""
    planned = []
    for name in sorted(names):
        target, plain = _hub_file(hub_cache, name) if name.startswith("hf://") else (cwd / name, name)
        make = _generator(plain)
        if make is None:
            pytest.fail(
                f"{where} names {name!r}, which tests/test_readme.py cannot create: add a (pattern, generator) "
                "row to FIXTURES, list it in OUTPUTS if the block writes it, or mark the block "
                "`<!-- readme-test: skip (reason) -->`"
            )
        planned.append((target, make))
    # a LoRA beside a checkpoint must fit it (tiny widths); alone it has the real SD1.5 widths
    spec = TINY["sd1"] if any(make in CHECKPOINTS for _, make in planned) else FAMILIES["sd1"]
    for target, make in planned:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            make(target, spec)


def _ci_test_command() -> str:
    match = re.search(r"^step tests bash -c '(.+)'$", (REPO / ".ci" / "run").read_text(), re.M)
    assert match, ".ci/run lost its `step tests bash -c '…'` line"
    return match[1]


def run_bash(block: Block, cwd: Path, hub_cache: Path) -> None:
    for words in _commands(block.code):
        where = f"README.md:{block.line}: `{shlex.join(words)}`"
        if words[:2] == ["pip", "install"]:
            assert "-e" in words and any(w in (".", ".[test]") for w in words), f"{where}: installs something else"
            continue
        if words[:3] == ["python", "-m", "pytest"]:
            readme_command = next(line for line in block.code.splitlines() if "pytest" in line)
            assert readme_command.strip() == _ci_test_command(), f"{where}: .ci/run must run it verbatim"
            continue
        assert words[0] == "loratools", f"{where}: not a loratools command; mark the block if it cannot run"
        arrange(where, command_names(words)[0], cwd, hub_cache)
        result = CliRunner().invoke(cli, words[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{where} exited {result.exit_code}: {result.stderr or result.output}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip:
        pytest.skip(f"README.md:{block.line} marked: {block.skip}")
    import huggingface_hub.constants

    cwd, cache = tmp_path / "cwd", tmp_path / "hub"
    cwd.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(cwd)
    if block.lang == "python":
        arrange(f"README.md:{block.line}: the python block", python_names(block.code)[0], cwd, cache)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
    else:
        run_bash(block, cwd, cache)


def test_readme_code_is_plain() -> None:
    assert len(BLOCKS) >= 4
    for block in BLOCKS:
        assert "…" not in block.code, f"README.md:{block.line}: an ellipsis inside a code block"
        if block.lang == "python":
            ast.parse(block.code)  # a SyntaxError names the line


def test_unknown_names_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"README.md:7: .* names 'mystery.safetensors'.*FIXTURES"):
        arrange("README.md:7: `loratools inspect mystery.safetensors`", {"mystery.safetensors"}, tmp_path, tmp_path)
    inputs, outputs = command_names(shlex.split("loratools convert a.safetensors:0.5 out/x.safetensors -o y.pt"))
    assert inputs == {"a.safetensors"} and outputs == {"out/x.safetensors", "y.pt"}
    assert readme_blocks("<!-- readme-test: skip (needs a GPU) -->\n```bash\nx\n```\n")[0].skip == "needs a GPU"
