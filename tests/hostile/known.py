"""Pairs that fail because of bugs in code this corpus may not change (owned elsewhere).

Each entry is ``pair id → reason``; the test marks them ``xfail(strict=True)``, so a fix there
turns the test red until the entry is removed here.
"""

from __future__ import annotations

_RESOLVE_LOOP = (
    "ops/rank_common.py check_output: Path.resolve() raises RuntimeError on a symlink loop, shown as "
    "'internal error'; loratools.io.files.same_path (os.path.realpath) compares without raising"
)
_CLASSIFY_FIFO = (
    "classify.py _is_safetensors: open() on a path not named .safetensors, before checking it is a "
    "regular file, blocks forever on a FIFO; loratools.io.files.regular_file(path) first refuses it"
)
KNOWN_BUGS: dict[str, str] = {
    **{
        f"path-symlink-loop-{c}": _RESOLVE_LOOP
        for c in ("rescale[lora]", "resize[lora]", "blend[lora]", "extract[ckpt]")
    },
    **{f"path-fifo-ckpt-{c}[ckpt]": _CLASSIFY_FIFO for c in ("inspect", "diff", "convert")},
}
