"""Run one (case × command) pair and observe what a user would see, plus what must always hold.

The outcome is one of :data:`OUTCOMES`. Whatever it is, the harness also records every broken
invariant: an input whose bytes changed, a payload that ran (the sentinel file exists), a file left
behind after a refusal, a ``*.partial`` anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner

from loratools.cli.main import cli

from . import build, child
from .cases import CASES, Case, Ctx
from .commands import Slot, slots

REFUSED = "refused"  # non-zero exit, exactly one `error: …` line, nothing else
WARNED = "warned"  # exit 0 with a `warning:` line, and a sound result
ACCEPTED = "accepted"  # exit 0, a sound result
OUTCOMES = (REFUSED, WARNED, ACCEPTED, "internal error", "crashed", "messy error", "unsound result", "hung")


# -- the good companions, built once per process -----------------------------------------------------
_COMPANIONS: dict[str, Path] = {}


def companions() -> dict[str, Path]:
    """Good inputs that fill the slots a case does not: built once per process, never written to
    (each run checks their identity, :func:`companions_unchanged` their bytes)."""
    if not _COMPANIONS:
        root = Path(tempfile.mkdtemp(prefix="loratools-hostile-companions-"))
        from loratools.formats.io import save_lora

        _COMPANIONS["ckpt"] = build.checkpoint(root / "base.safetensors")
        _COMPANIONS["ckpt2"] = build.tuned(root / "tuned.safetensors")
        for scale in ("tiny", "full"):
            _COMPANIONS[f"lora-{scale}"] = save_lora(
                build.lora_file(scale), root / f"lora-{scale}.safetensors", "kohya"
            )
            _COMPANIONS[f"lora2-{scale}"] = save_lora(
                build.lora_file(scale, seed=1, rank=3), root / f"lora2-{scale}.safetensors", "kohya"
            )
        _DIGESTS.update(snapshot(root))
        import atexit

        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return _COMPANIONS


_DIGESTS: dict[str, str] = {}


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def companions_unchanged() -> list[str]:
    """Companions whose bytes differ from when they were built (empty: all unchanged)."""
    return [str(p) for p in companions().values() if _digest(p) != _DIGESTS[str(p)]]


# -- what happened --------------------------------------------------------------------------------------
@dataclass
class Observation:
    """What one run showed: its outcome, exit status, output, and the invariants it broke."""

    outcome: str
    code: int | None
    stdout: str
    stderr: str
    argv: list[str]
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        shown = (self.stderr.strip() or self.stdout.strip())[-600:]
        return f"{self.outcome} (exit {self.code}); loratools {' '.join(self.argv)}\n{shown}\n" + "\n".join(
            self.problems
        )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under the roots (FIFOs and sockets skipped, never opened)."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = _digest(root)
            continue
        for path in _files(root):
            out[str(path)] = _digest(path)
    return out


def _leftovers(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in names + dirs:
                if name.endswith(".partial") or (name.startswith(".") and name.endswith(".old")):
                    found.append(str(Path(folder) / name))
    return found


def _sound(path: Path, allow_nonfinite: bool) -> str | None:
    """Why the output at ``path`` is not sound (None if it is): readable by the safetensors library
    and by loratools, and finite unless the case says its inputs were not."""
    import torch
    from safetensors import safe_open

    from loratools.classify import classify
    from loratools.formats.io import load_lora
    from loratools.io.checkpoint import open_checkpoint

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    if not files:
        return f"no output at {path}"
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
                        return f"{file.name}: {key} holds NaN or inf"
        except Exception as exc:
            return f"{file.name}: the safetensors library cannot read it ({exc})"
    try:
        if classify(path) == "checkpoint":
            from loratools.families.detect import detect

            with open_checkpoint(path) as ckpt:
                detect(ckpt.shapes(), ckpt.metadata)
        else:
            try:
                lora = load_lora(path)
            except Exception:  # a LoRA extracted from the tiny test checkpoints fits only them
                lora = load_lora(path, family=build.SPECS["tiny"])
            if not allow_nonfinite:  # alphas live in configs and metadata too, not only in tensors
                for module, adapter in lora.adapters.items():
                    if not bool(torch.isfinite(adapter.delta()).all()):
                        return f"{path.name}: ΔW of {module} holds NaN or inf"
    except Exception as exc:
        return f"loratools cannot read its own output: {exc}"
    return None


def _classify(code: int | None, stdout: str, stderr: str, escaped: BaseException | None) -> str:
    text = stdout + stderr
    if escaped is not None or "Traceback" in text:
        return "crashed"
    if "internal error" in stderr:
        return "internal error"
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        if len(lines) == 1 and lines[0].startswith("error: ") and not stdout.strip():
            return REFUSED
        return "messy error"
    # a warning line, or a module the merge report lists as patching nothing (and why)
    if any(line.lstrip().lower().startswith(("warning:", "unmatched ")) for line in text.splitlines()):
        return WARNED
    return ACCEPTED


# -- running ------------------------------------------------------------------------------------------------
def _in_process(argv: list[str]) -> tuple[int | None, str, str, BaseException | None]:
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    escaped = result.exception if not isinstance(result.exception, SystemExit | type(None)) else None
    return result.exit_code, result.stdout, result.stderr, escaped


def _in_child(
    argv: list[str], sig: int | None, marker: Path, timeout: float = 60
) -> tuple[int | None, str, str, BaseException | None]:
    """Run in a child process whose writer is slowed down; send ``sig`` once it has started writing.

    Without ``sig``, just run it there: a command that may hang cannot hang the test process.
    """
    out_file, err_file = marker.with_name("child.out"), marker.with_name("child.err")
    proc = child.context().Process(target=child.run, args=(argv, str(marker), str(out_file), str(err_file)))
    with child.local_sockets_allowed():
        proc.start()
    deadline = time.monotonic() + timeout
    while sig is not None and not marker.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if sig is not None and proc.is_alive():
        os.kill(proc.pid, sig)
    proc.join(timeout)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    out, err = (p.read_text() if p.exists() else "" for p in (out_file, err_file))
    for p in (out_file, err_file):
        p.unlink(missing_ok=True)
    if hung:
        return None, out, err + "\n(hung)", None
    if sig is not None and not marker.exists():
        err += "\n(the command never started writing)"
    return proc.exitcode, out, err, None


def run_pair(case: Case, slot: Slot, root: Path) -> Observation:
    """Build the case's input(s) under ``root``, run the command, check every invariant."""
    ctx = Ctx(root=root, inputs=root / "in", out=root / "out", sentinel=root / "PWNED", slot=slot)
    ctx.inputs.mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    good = companions()
    paths = {
        "ckpt": str(good["ckpt"]),
        "ckpt2": str(good["ckpt2"]),
        "lora": str(good[f"lora-{slot.scale}"]),
        "lora2": str(good[f"lora2-{slot.scale}"]),
        "out": str(ctx.out / "result"),
    }
    made = case.make(ctx)
    if isinstance(made, dict):
        paths.update({k: str(v) for k, v in made.items()})
    else:
        paths[slot.role] = str(made)
    argv = slot.argv(paths, weight=case.weight) + list(case.args)
    output = Path(paths["out"] + ".safetensors") if "{out}" in slot.template else None
    with contextlib.ExitStack() as stack:
        if case.fault is not None:  # entered first, left last: the checks below see what it did
            stack.enter_context(case.fault(ctx))
        return _run_and_check(case, slot, ctx, argv, output, good)


def _run_and_check(
    case: Case, slot: Slot, ctx: Ctx, argv: list[str], output: Path | None, good: dict[str, Path]
) -> Observation:
    root = ctx.root
    before = snapshot(ctx.inputs)
    kept = snapshot(ctx.out)  # what was at the output before (a previous result must survive)
    # the companions are shared by every pair: their identity is checked here (any write changes
    # mtime/ctime), their bytes once per process by companions_unchanged()
    identity = {name: _identity(path) for name, path in good.items()}
    outside_before = set(os.listdir(root))
    if case.signal is not None:
        code, stdout, stderr, escaped = _in_child(argv, case.signal, root / "started")
    elif case.isolate is not None and case.isolate(slot):
        code, stdout, stderr, escaped = _in_child(argv, None, root / "started", timeout=2)
    else:
        code, stdout, stderr, escaped = _in_process(argv)

    outcome = _classify(code, stdout, stderr, escaped)
    if "(hung)" in stderr:
        outcome = "hung"
    obs = Observation(outcome, code, stdout, stderr, argv)
    if escaped is not None:
        import traceback

        obs.stderr += "".join(traceback.format_exception(escaped))
    # -- invariants that hold whatever the outcome ---------------------------------------------------
    if ctx.sentinel.exists():
        obs.problems.append(f"PAYLOAD RAN: {ctx.sentinel} was created")
    after = snapshot(ctx.inputs)
    changed = sorted(k for k in before if after.get(k) != before[k])
    changed += sorted(str(good[n]) for n in good if _identity(good[n]) != identity[n])
    if changed:
        obs.problems.append(f"input bytes changed or removed: {changed}")
    new_inputs = sorted(set(after) - set(before))
    if new_inputs:
        obs.problems.append(f"files appeared beside the inputs: {new_inputs}")
    stray = sorted(set(os.listdir(root)) - outside_before - {"started", "PWNED"})
    if stray:
        obs.problems.append(f"files appeared in the work folder: {stray}")
    leftovers = _leftovers(root, *(p.parent for p in good.values()))
    if leftovers:
        obs.problems.append(f"temporary files left behind: {leftovers}")
    if outcome not in (WARNED, ACCEPTED):
        now = snapshot(ctx.out)
        if now != kept:
            obs.problems.append(
                f"the output folder changed after a failure: {sorted(set(now) ^ set(kept)) or 'bytes of ' + str(sorted(kept))}"
            )
    if outcome in (WARNED, ACCEPTED) and output is not None and slot.command.writes:
        reason = _sound(output, case.allow_nonfinite)
        if reason is not None:
            obs.outcome = "unsound result"
            obs.problems.append(reason)
    return obs


def pairs() -> list[tuple[Case, Slot]]:
    """Every (case, slot) of the matrix, in a stable order."""
    out = []
    all_slots = slots()
    for case in CASES:
        seen: set[tuple[str, str]] = set()
        for slot in all_slots:
            if case.role not in (slot.role, "any") or (case.only is not None and slot.command.name not in case.only):
                continue
            if case.skip is not None and case.skip(slot):
                continue
            # one run per distinct command line: `inspect {ckpt}` and `inspect {lora}` are the same
            # run for a role-free input; a fault case needs one run per template, not per role
            if case.per_template:
                shape = slot.template
            elif case.role == "any":
                shape = slot.template.replace("{" + slot.role + "}", "{H}", 1)
            else:
                shape = f"{slot.template}|{slot.role}"
            key = (slot.command.name, shape)
            if key in seen:
                continue
            seen.add(key)
            out.append((case, slot))
    return out


def pair_id(case: Case, slot: Slot) -> str:
    return f"{case.id}-{slot.id}"


def verdict(case: Case, slot: Slot, obs: Observation) -> list[str]:
    """Everything about this run that is not as the case expects (empty: as expected)."""
    import re

    wrong = list(obs.problems)
    expected = case.expected(slot)
    if obs.outcome not in expected.split("|"):
        wrong.append(f"expected {expected}, got {obs.outcome}")
    elif obs.outcome == REFUSED:
        if case.code is not None and obs.code != case.code:
            wrong.append(f"exit status {obs.code}, expected {case.code}")
        if case.match is not None and not re.search(case.match, obs.stderr):
            wrong.append(f"the error does not say /{case.match}/")
    return wrong
