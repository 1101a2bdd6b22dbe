"""The hostile cases, generated: each builds its input(s) in the pair's own folder at test time.

A case names its family (the report's row), the argument role its file plays (``ckpt``, ``lora``
or ``any`` for container-level damage that every slot must refuse), how to make it, and what each
command must do with it: ``refused`` (one ``error:`` line, non-zero exit), ``warned`` (a warning
and a sound result) or ``accepted`` (a sound result). ``expect`` maps command names to outcomes,
``"*"`` being the default.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import build
from .commands import Slot

REFUSE = {"*": "refused"}
Made = Path | dict[str, Path]


@dataclass
class Ctx:
    """The folder one pair runs in: ``in/`` for inputs, ``out/`` for outputs, and the sentinel."""

    root: Path
    inputs: Path
    out: Path
    sentinel: Path
    slot: Slot

    @property
    def role(self) -> str:
        return self.slot.role

    @property
    def scale(self) -> str:
        return self.slot.scale

    def good_bytes(self) -> bytes:
        """The bytes of a good input for this slot (a tiny checkpoint, or a LoRA of the slot's size)."""
        from .harness import companions

        good = companions()
        return (good["ckpt"] if self.role == "ckpt" else good[f"lora-{self.scale}"]).read_bytes()

    def file(self, name: str, content: bytes) -> Path:
        return build.write(self.inputs / name, content)


@dataclass(frozen=True)
class Case:
    """One hostile input (or fault) and what every command must do with it."""

    id: str
    family: str
    role: str  # "ckpt", "lora" or "any"
    make: Callable[[Ctx], Made]
    expect: dict[str, str] = field(default_factory=lambda: dict(REFUSE))
    code: int | None = 2  # exit status of a refusal (None: any non-zero)
    match: str | None = None  # what the error line must say (a regex)
    fault: Callable[[Ctx], contextlib.AbstractContextManager[None]] | None = None
    signal: int | None = None  # sent to a child process once it writes
    weight: str | None = None  # replaces the hostile LoRA's weight / strength argument
    args: tuple[str, ...] = ()
    per_template: bool = False
    only: frozenset[str] | None = None  # commands it applies to (None: every command with the role)
    skip: Callable[[Slot], bool] | None = None
    isolate: Callable[[Slot], bool] | None = None  # run these slots in a child process (may hang)
    allow_nonfinite: bool = False  # the inputs themselves hold NaN/inf, so may a faithful output

    def expected(self, slot: Slot) -> str:
        """What ``slot`` must do: ``expect["merge[lora]"]``, else ``expect["merge"]``, else ``expect["*"]``."""
        for key in (slot.id, slot.command.name, f"*[{slot.role}]", "*"):
            if key in self.expect:
                return self.expect[key]
        return "refused"


CASES: list[Case] = []


def case(
    id: str, family: str, role: str, expect: dict[str, str] | None = None, **kwargs: object
) -> Callable[[Callable[[Ctx], Made]], Callable[[Ctx], Made]]:
    """Register the decorated builder as a case."""

    def register(make: Callable[[Ctx], Made]) -> Callable[[Ctx], Made]:
        CASES.append(Case(id, family, role, make, dict(expect or REFUSE), **kwargs))  # type: ignore[arg-type]
        return make

    return register


# ==================================================================================================
# safetensors containers: every slot must refuse them before allocating anything
# ==================================================================================================
ST = "safetensors"


def _header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def _st_case(id: str, match: str, builder: Callable[[Ctx], bytes], **kwargs: object) -> None:
    def make(ctx: Ctx) -> Path:
        return ctx.file("bad.safetensors", builder(ctx))

    CASES.append(Case(f"st-{id}", ST, "any", make, dict(REFUSE), match=match, **kwargs))  # type: ignore[arg-type]


def _one(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8), data: bytes = b"\0" * 8) -> bytes:
    return build.st_bytes({"w": {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                                 "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}}, data)  # fmt: skip


_st_case("empty", "empty|too short", lambda ctx: b"")
_st_case("three-bytes", "too short", lambda ctx: b"\x01\x02\x03")
_st_case("truncated-in-length", "too short", lambda ctx: ctx.good_bytes()[:5])
_st_case("truncated-in-header", "header claims", lambda ctx: (g := ctx.good_bytes())[: 8 + _header_len(g) // 2])
_st_case("truncated-after-header", "ends at byte", lambda ctx: (g := ctx.good_bytes())[: 8 + _header_len(g)])
_st_case(
    "truncated-in-tensor", "ends at byte", lambda ctx: (g := ctx.good_bytes())[: (8 + _header_len(g) + len(g)) // 2]
)
_st_case("truncated-last-byte", "ends at byte", lambda ctx: ctx.good_bytes()[:-1])
_st_case(
    "header-longer-than-file",
    "header claims",
    lambda ctx: struct.pack("<Q", len(ctx.good_bytes())) + ctx.good_bytes()[8:],
)
_st_case("header-length-2^63", "limit", lambda ctx: struct.pack("<Q", 2**63) + ctx.good_bytes()[8:])
_st_case("header-length-zero", "not valid JSON", lambda ctx: struct.pack("<Q", 0) + ctx.good_bytes()[8:])
_st_case("header-over-limit", "limit", lambda ctx: struct.pack("<Q", 100_000_001) + b"{" + b" " * 64)
_st_case("json-invalid", "not valid JSON", lambda ctx: build.st_bytes(None, raw=b'{"w": {"dtype": "F32",'))
_st_case("json-not-utf8", "not valid JSON", lambda ctx: build.st_bytes(None, raw=b'{"\xff\xfe": 1}'))
_st_case("json-array", "not a JSON object", lambda ctx: build.st_bytes([1, 2, 3]))
_st_case("json-string", "not a JSON object", lambda ctx: build.st_bytes("hello"))
_st_case(
    "json-deeply-nested",
    "not valid JSON",
    lambda ctx: build.st_bytes(None, raw=b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
)
_st_case("json-leading-spaces", "unknown LoRA key layout|not a Stable Diffusion checkpoint|A is a lora", lambda ctx: build.st_bytes(None, raw=b"   " + json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), ) + b"\0" * 8)  # fmt: skip
_st_case("entry-not-object", "not an object", lambda ctx: build.st_bytes({"w": 5}))
_st_case("entry-missing-fields", "unknown dtype", lambda ctx: build.st_bytes({"w": {"shape": [2]}}))
_st_case("metadata-not-strings", "__metadata__", lambda ctx: build.st_bytes({"__metadata__": {"k": 1}}))
_st_case("metadata-a-list", "__metadata__", lambda ctx: build.st_bytes({"__metadata__": ["k"]}))
_st_case("dtype-unknown", "unknown dtype", lambda ctx: _one(dtype="F33"))
_st_case("dtype-lowercase", "unknown dtype", lambda ctx: _one(dtype="f32"))
_st_case("dtype-not-a-string", "unknown dtype", lambda ctx: _one(dtype=4))
_st_case("dtype-complex", "unknown dtype", lambda ctx: _one(dtype="C64", shape=(1,)))
_st_case("shape-negative", "invalid shape", lambda ctx: _one(shape=(-2,)))
_st_case("shape-float", "invalid shape", lambda ctx: _one(shape=[2.0]))
_st_case("shape-bool", "invalid shape", lambda ctx: _one(shape=[True, True]))
_st_case("shape-not-a-list", "invalid shape", lambda ctx: _one(shape="2"))
_st_case("shape-vs-span", "needs", lambda ctx: _one(shape=(3,)))
_st_case("shape-10^12-elements", "needs", lambda ctx: _one(shape=(10**6, 10**6)))
_st_case(
    "shape-10^12-elements-spanned", "ends at byte", lambda ctx: _one(shape=(10**6, 10**6), offsets=(0, 4 * 10**12))
)
_st_case("shape-2^128-elements", "needs|ends at byte", lambda ctx: _one(shape=(2**64, 2**64), offsets=(0, 2**130)))
_st_case("offsets-out-of-range", "ends at byte", lambda ctx: _one(offsets=(0, 16)))
_st_case("offsets-negative", "invalid data_offsets", lambda ctx: _one(offsets=(-8, 0)))
_st_case("offsets-reversed", "invalid data_offsets", lambda ctx: _one(offsets=(8, 0)))
_st_case("offsets-floats", "invalid data_offsets", lambda ctx: _one(offsets=[0.0, 8.0]))
_st_case("offsets-three", "invalid data_offsets", lambda ctx: _one(offsets=(0, 4, 8)))
_st_case(
    "offsets-overlap",
    "overlap",
    lambda ctx: build.st_bytes(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
)
_st_case(
    "offsets-gap",
    "unused bytes",
    lambda ctx: build.st_bytes(
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        b"\0" * 12,
    ),
)
_st_case("trailing-bytes", "after the last tensor", lambda ctx: ctx.good_bytes() + b"\0" * 16)


def _entries_reversed(ctx: Ctx) -> Path:
    """A valid file whose header lists its tensors in reverse offset order (the spec allows any)."""
    good = ctx.good_bytes()
    n = _header_len(good)
    table = json.loads(good[8 : 8 + n])
    reordered = dict(reversed(list(table.items())))
    raw = json.dumps(reordered).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return ctx.file("unordered.safetensors", build.st_bytes(None, good[8 + n :], raw=raw))


CASES.append(Case("st-entries-in-reverse-order", ST, "any", _entries_reversed, {"*": "accepted"}))


_st_case(
    "duplicate-keys",
    "duplicate key",
    lambda ctx: build.st_bytes(
        None,
        b"\0" * 4,
        raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ),
)
_st_case(
    "no-tensors", "no tensors|holds no|A is a lora", lambda ctx: build.st_bytes({"__metadata__": {"format": "pt"}})
)
_st_case("random-bytes", "limit|header claims", lambda ctx: bytes((i * 7919 + 13) % 251 for i in range(4096)))


# ==================================================================================================
# pickles: nothing in them may run; zips are checked before torch opens them
# ==================================================================================================
PK = "pickle"
REFUSED_UNRUN = "refused without running it"


class _Payload:
    """Unpickling this calls ``function(*args)``: what a hostile .ckpt does."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def _payloads(sentinel: Path, companion: Path) -> dict[str, object]:
    """Every payload creates the sentinel file if it ever runs."""
    import builtins
    import subprocess

    touch = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os-system": _Payload(os.system, f"touch {sentinel}"),
        "eval": _Payload(builtins.eval, touch),
        "exec": _Payload(builtins.exec, touch),
        "subprocess-call": _Payload(subprocess.call, ["touch", str(sentinel)]),
        "subprocess-popen": _Payload(subprocess.Popen, ["touch", str(sentinel)]),
        "open-for-write": _Payload(builtins.open, str(sentinel), "w"),
        "shutil-copy": _Payload(shutil.copyfile, str(companion), str(sentinel)),
        "torch-save": _Payload(torch.save, {"x": 1}, str(sentinel)),  # a torch.* global is no safer
    }


def _nested_getattr(sentinel: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch S')`` as hand-written protocol-0 opcodes."""
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + f"touch {sentinel}".encode() + b"\ntR."
    )


def _tensors_for(ctx: Ctx) -> dict[str, torch.Tensor]:
    """Good tensors for the slot: a tiny checkpoint's, or a small LoRA's."""
    if ctx.role == "ckpt":
        return build.checkpoint_tensors()
    return build.lora_tensors(ctx.scale)[0]


def _payload_case(name: str, container: str) -> None:
    def make(ctx: Ctx) -> Path:
        from .harness import companions

        payload = _payloads(ctx.sentinel, companions()["ckpt"])[name]
        small = {"w": torch.ones(2)}
        if container == "zip-nested":  # a Lightning-style .ckpt: payload beside the state dict
            path = ctx.inputs / "model.ckpt"
            torch.save({"state_dict": small, "global_step": 1, "callbacks": payload}, path)
        elif container == "zip-top":  # the whole object is the payload
            path = ctx.inputs / "model.pt"
            torch.save(payload, path)
        elif container == "zip-in-tensor-dict":
            path = ctx.inputs / "lora.bin"
            torch.save({**small, "lora_unet_x.alpha": payload}, path)
        else:  # legacy (non-zip) pickles of several protocols, as old .pt/.bin files are
            protocol = int(container.rsplit("-p", 1)[1])
            path = ctx.file(f"model{protocol}.pt", pickle.dumps({"w": torch.ones(2), "x": payload}, protocol=protocol))
        return path

    CASES.append(Case(f"pickle-{name}-{container}", PK, "any", make, dict(REFUSE), match=REFUSED_UNRUN))


for _name in ("os-system", "eval", "exec", "subprocess-call", "subprocess-popen", "open-for-write", "shutil-copy",
              "torch-save"):  # fmt: skip
    _payload_case(_name, "zip-nested")
    _payload_case(_name, "legacy-p2")
for _container in ("zip-top", "zip-in-tensor-dict", "legacy-p0", "legacy-p4", "legacy-p5"):
    _payload_case("os-system", _container)


@case("pickle-nested-getattr-p0", PK, "any", match=REFUSED_UNRUN)
def _(ctx: Ctx) -> Path:
    return ctx.file("model.pth", _nested_getattr(ctx.sentinel))


@case("pickle-payload-named-safetensors", PK, "any", match="limit|header claims|too short")
def _(ctx: Ctx) -> Path:
    return ctx.file("model.safetensors", pickle.dumps(_Payload(os.system, f"touch {ctx.sentinel}"), protocol=2))


@case("pickle-payload-no-suffix", PK, "any", match=REFUSED_UNRUN)
def _(ctx: Ctx) -> Path:
    return ctx.file("model.weights", pickle.dumps({"x": _Payload(os.system, f"touch {ctx.sentinel}")}, protocol=4))


def _torch_zip_with(ctx: Ctx, name: str, extra: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    members = build.torch_zip_members({"w": torch.ones(2)})
    path = ctx.inputs / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        for member, data in extra.items():
            archive.writestr(zipfile.ZipInfo(member), data, compress_type=compression)
    return path


@case("zip-member-traversal", PK, "any", match="escapes the archive")
def _(ctx: Ctx) -> Path:
    return _torch_zip_with(ctx, "model.ckpt", {"../../../tmp/evil.sh": b"touch /tmp/x"})


@case("zip-member-absolute", PK, "any", match="escapes the archive")
def _(ctx: Ctx) -> Path:
    return _torch_zip_with(ctx, "model.pt", {"/etc/cron.d/evil": b"* * * * * root touch /tmp/x"})


@case("zip-bomb-ratio", PK, "any", match="would inflate")
def _(ctx: Ctx) -> Path:
    return _torch_zip_with(ctx, "model.ckpt", {"archive/data/99": b"\0" * (4 << 20)}, zipfile.ZIP_DEFLATED)


@case("zip-bomb-data-pkl", PK, "any", match="would inflate")
def _(ctx: Ctx) -> Path:
    return ctx.file("bomb.pt", build.zip_of({"archive/data.pkl": b"\0" * (4 << 20)}, compression=zipfile.ZIP_DEFLATED))


@case("zip-size-lies", PK, "any", match="would inflate|cannot read torch pickle|damaged zip")
def _(ctx: Ctx) -> Path:
    """A deflated member whose central-directory entry claims ~4 GiB uncompressed."""
    raw = bytearray(build.zip_of(build.torch_zip_members({"w": torch.ones(2)}), compression=zipfile.ZIP_DEFLATED))
    at = raw.find(b"PK\x01\x02")  # first central-directory entry: uncompressed size at +24
    raw[at + 24 : at + 28] = struct.pack("<I", 0xFFFFFFF0)
    return ctx.file("model.ckpt", bytes(raw))


@case("zip-truncated", PK, "any", match="cannot read torch pickle|damaged zip")
def _(ctx: Ctx) -> Path:
    raw = build.zip_of(build.torch_zip_members({"w": torch.ones(8)}))
    return ctx.file("model.ckpt", raw[: len(raw) // 2])


@case("zip-without-data-pkl", PK, "any", match="cannot read torch pickle|not a plain")
def _(ctx: Ctx) -> Path:
    return ctx.file("model.pt", build.zip_of({"archive/readme.txt": b"hello", "archive/version": b"3\n"}))


@case("zip-second-data-pkl-payload", PK, "any", match=REFUSED_UNRUN + "|cannot read torch pickle|damaged zip")
def _(ctx: Ctx) -> Path:
    members = build.torch_zip_members({"w": torch.ones(2)})
    evil = build.torch_zip_members({"x": _Payload(os.system, f"touch {ctx.sentinel}")})
    path = ctx.inputs / "model.ckpt"
    with zipfile.ZipFile(path, "w") as archive, contextlib.suppress(UserWarning):
        for member, data in members.items():
            archive.writestr(member, data)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": the point of the case
            for member, data in evil.items():
                if member.endswith("data.pkl"):
                    archive.writestr(member, data)
    return path


@case("pickle-legacy-truncated", PK, "any", match="cannot read torch pickle|not a plain")
def _(ctx: Ctx) -> Path:
    raw = pickle.dumps({"w": torch.ones(64)}, protocol=2)
    return ctx.file("model.pt", raw[: len(raw) // 2])


@case("pickle-garbage-after-proto", PK, "any", match="cannot read torch pickle|not a plain")
def _(ctx: Ctx) -> Path:
    return ctx.file("model.ckpt", b"\x80\x04garbage that is not a pickle")


@case("pickle-of-a-list-of-ints", PK, "any", match="holds a|not LoRA|not a state dict|cloneofsimo|list|A is a lora")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "model.pt"
    torch.save([1, 2, 3], path)
    return path


@case("pickle-of-none", PK, "any", match="holds a NoneType|A is a lora")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "model.ckpt"
    torch.save(None, path)
    return path


@case("pickle-of-a-bare-tensor", PK, "any", match="holds a Tensor|A is a lora")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "model.pt"
    torch.save(torch.ones(3, 3), path)
    return path


@case("pickle-int-keys", PK, "any", match="holds no tensors|no tensors|not LoRA|A is a lora")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "model.pt"
    torch.save({0: torch.ones(2), 1: torch.ones(2)}, path)
    return path


@case("pickle-complex-tensor", PK, "any", match="unsupported dtype|complex")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "model.ckpt"
    tensors = _tensors_for(ctx)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.complex64)
    torch.save(tensors, path)
    return path


@case("pickle-safetensors-named-ckpt", PK, "any", match="cannot read torch pickle|not a plain")
def _(ctx: Ctx) -> Path:
    return ctx.file("model.ckpt", ctx.good_bytes())


@case("pickle-nested-state-dict", PK, "any", {"*": "accepted"})
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / ("model.ckpt" if ctx.role == "ckpt" else "lora.pt")
    torch.save({"state_dict": _tensors_for(ctx), "global_step": 875000, "epoch": 3}, path)
    return path


# checkpoints: the weights are all there and nothing else matters; LoRAs: the writers say what they
# left out (a LoRA file with stray entries is unusual enough to mention)
@case(
    "pickle-non-tensor-values",
    PK,
    "any",
    {"*": "accepted", "*[lora]": "warned", "inspect": "accepted", "diff": "accepted"},
)
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / ("model.ckpt" if ctx.role == "ckpt" else "lora.pt")
    torch.save({**_tensors_for(ctx), "note": "hello", "step": 5, "config": {"lr": 1e-4}}, path)
    return path


# ==================================================================================================
# folders, links and special files where a file is expected (and the reverse)
# ==================================================================================================
FO = "folders"


@case("path-missing", FO, "any", match="no such file")
def _(ctx: Ctx) -> Path:
    return ctx.inputs / "not-there.safetensors"


@case(
    "path-empty-folder",
    FO,
    "any",
    # a plain folder is a batch of LoRAs (issue 16): empty, it has none to work on
    match="neither a diffusers model nor a peft adapter|no diffusers weights|no adapter_config|no LoRA files found"
    "|needs --with",
)
def _(ctx: Ctx) -> Path:
    (ctx.inputs / "empty").mkdir()
    return ctx.inputs / "empty"


@case(
    "path-folder-named-safetensors",
    FO,
    "any",
    {"*": "refused", "inspect": "accepted"},  # inspect lists the folder row by row: readme.txt "skipped"
    match="neither a diffusers model|no diffusers weights|no adapter_config|no LoRA files found|needs --with",
)
def _(ctx: Ctx) -> Path:
    folder = ctx.inputs / "model.safetensors"
    folder.mkdir()
    build.write(folder / "readme.txt", b"not weights")
    return folder


@case("path-dangling-symlink", FO, "any", match="no such file")
def _(ctx: Ctx) -> Path:
    link = ctx.inputs / "model.safetensors"
    link.symlink_to(ctx.inputs / "gone.safetensors")
    return link


@case("path-symlink-loop", FO, "any", match="no such file|loop|symbolic links")
def _(ctx: Ctx) -> Path:
    a, b = ctx.inputs / "a.safetensors", ctx.inputs / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


@case("path-fifo", FO, "any", match="not a regular file")
def _(ctx: Ctx) -> Path:
    fifo = ctx.inputs / "model.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: it never does
    return fifo


@case("path-fifo-ckpt", FO, "any", match="not a regular file",
      isolate=lambda slot: slot.command.name in ("inspect", "diff", "convert"),
      skip=lambda slot: slot.id in ("diff[lora]", "convert[lora]"))  # fmt: skip
def _(ctx: Ctx) -> Path:
    fifo = ctx.inputs / "model.ckpt"  # not named .safetensors: the readers sniff its first bytes
    os.mkfifo(fifo)
    return fifo


@case("path-dev-zero", FO, "any", match="not a regular file")
def _(ctx: Ctx) -> Path:
    return Path("/dev/zero")  # endless zeros: whatever reads "the whole file" never ends


@case("path-empty-file-no-suffix", FO, "any", match="empty|too short")
def _(ctx: Ctx) -> Path:
    return ctx.file("model", b"")


@case("path-empty-ckpt", FO, "any", match="empty")
def _(ctx: Ctx) -> Path:
    return ctx.file("model.ckpt", b"")


def _diffusers(ctx: Ctx) -> Path:
    return build.checkpoint(ctx.inputs / "model-diffusers", layout="diffusers")


def _unet_file(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _shard(folder: Path, index: object, *, keep: bool = False) -> Path:
    """Turn the U-Net file into a 'sharded' one described by ``index``."""
    unet = _unet_file(folder)
    if not keep:
        unet.rename(unet.with_name("diffusion_pytorch_model-00001-of-00001.safetensors"))
    text = index if isinstance(index, str) else json.dumps(index)
    build.write(unet.with_name("diffusion_pytorch_model.safetensors.index.json"), text.encode())
    return folder


@case("diffusers-index-invalid-json", FO, "ckpt", match="not a valid shard index")
def _(ctx: Ctx) -> Path:
    return _shard(_diffusers(ctx), '{"weight_map": ')


@case("diffusers-index-outside-folder", FO, "ckpt", match="lies outside its folder")
def _(ctx: Ctx) -> Path:
    outside = build.write(ctx.inputs / "stolen.safetensors", ctx.good_bytes())
    return _shard(_diffusers(ctx), {"weight_map": {"conv_in.weight": f"../../{outside.name}"}})


@case("diffusers-index-missing-shard", FO, "ckpt", match="is missing")
def _(ctx: Ctx) -> Path:
    return _shard(
        _diffusers(ctx), {"weight_map": {"conv_in.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    )


@case("diffusers-duplicate-across-shards", FO, "ckpt", match="also appears in another shard")
def _(ctx: Ctx) -> Path:
    folder = _diffusers(ctx)
    unet = _unet_file(folder)
    shutil.copy(unet, unet.with_name("extra.safetensors"))
    return _shard(folder, {"weight_map": {"a": unet.name, "b": "extra.safetensors"}}, keep=True)


@case("diffusers-component-truncated", FO, "ckpt", match="ends at byte|header claims")
def _(ctx: Ctx) -> Path:
    folder = _diffusers(ctx)
    unet = _unet_file(folder)
    unet.write_bytes(unet.read_bytes()[:-100])
    return folder


@case("diffusers-model-index-garbage", FO, "ckpt", {"*": "accepted"})
def _(ctx: Ctx) -> Path:
    folder = _diffusers(ctx)
    (folder / "model_index.json").write_text("this is not json")  # the weights decide, not this file
    return folder


def _peft(ctx: Ctx) -> Path:
    from loratools.formats.io import save_lora

    return save_lora(build.lora_file(ctx.scale), ctx.inputs / "adapter", "peft")


def _peft_part(folder: Path) -> Path:
    return next(p for p in sorted(folder.iterdir()) if (p / "adapter_config.json").exists())


@case("peft-config-invalid-json", FO, "lora", match="not valid JSON")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    (_peft_part(folder) / "adapter_config.json").write_text('{"r": 4,')
    return folder


@case("peft-config-a-list", FO, "lora", match="not a LoraConfig object")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    (_peft_part(folder) / "adapter_config.json").write_text("[1, 2, 3]")
    return folder


@case("peft-config-alpha-nan", FO, "lora", match="not a finite number")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    config_path = _peft_part(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] = float("nan")
    config_path.write_text(json.dumps(config))  # Python writes NaN; json.loads reads it back
    return folder


@case("peft-config-r-lies", FO, "lora", match="says r=64")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    config_path = _peft_part(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 64  # the tensors have rank 2
    config_path.write_text(json.dumps(config))
    return folder


@case("peft-weights-missing", FO, "lora", match="no such file|adapter_model|no weights")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    for part in folder.iterdir():
        (part / "adapter_model.safetensors").unlink()
    return folder


@case("peft-weights-truncated", FO, "lora", match="ends at byte|header claims")
def _(ctx: Ctx) -> Path:
    folder = _peft(ctx)
    weights = _peft_part(folder) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return folder


# ==================================================================================================
# content: well-formed files whose numbers or names are wrong
# ==================================================================================================
CO = "content"
# inspect reads headers only (NaN in a factor is not in a header); everything that reads the
# factors refuses them: nothing sound can be made of a NaN
WRITERS_REFUSE = {"*": "refused", "inspect": "accepted"}


def _lora(
    ctx: Ctx,
    mutate: Callable[[dict[str, torch.Tensor], dict[str, str]], object] | None = None,
    *,
    fmt: str = "kohya",
    name: str = "lora.safetensors",
    dtype: torch.dtype = torch.float32,
    rank: int = 2,
) -> Path:
    tensors, metadata = build.lora_tensors(ctx.scale, fmt, dtype=dtype, rank=rank)
    if mutate is not None:
        mutate(tensors, metadata)
    return build.save_raw(ctx.inputs / name, tensors, metadata)


def _key(tensors: dict[str, torch.Tensor], suffix: str, nth: int = 0) -> str:
    return [k for k in tensors if k.endswith(suffix)][nth]


def _poison(value: float, suffix: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def mutate(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        key = _key(tensors, suffix)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return mutate


def _lora_case(id: str, mutate: Callable[..., object] | None, expect: dict[str, str] | None = None,
               match: str | None = None, **kwargs: object) -> None:  # fmt: skip
    options = {k: kwargs.pop(k) for k in ("fmt", "dtype", "rank", "name") if k in kwargs}

    def make(ctx: Ctx) -> Path:
        return _lora(ctx, mutate, **options)  # type: ignore[arg-type]

    CASES.append(Case(f"lora-{id}", CO, "lora", make, dict(expect or REFUSE), match=match, **kwargs))  # type: ignore[arg-type]


NONFINITE = "NaN or inf"
_lora_case("nan-in-up", _poison(float("nan"), "lora_up.weight"), WRITERS_REFUSE, NONFINITE)
_lora_case("inf-in-down", _poison(float("inf"), "lora_down.weight"), WRITERS_REFUSE, NONFINITE)
_lora_case("fp16-minus-inf", _poison(float("-inf"), "lora_up.weight"), WRITERS_REFUSE, NONFINITE, dtype=torch.float16)
_lora_case("bf16-nan", _poison(float("nan"), "lora_down.weight"), WRITERS_REFUSE, NONFINITE, dtype=torch.bfloat16)
_lora_case("nan-in-peft-factor", _poison(float("nan"), "lora_B.weight"), WRITERS_REFUSE, NONFINITE, fmt="diffusers")
_lora_case("alpha-nan", _poison(float("nan"), ".alpha"), match="alpha is nan")
_lora_case("alpha-inf", _poison(float("inf"), ".alpha"), match="alpha is inf")
_lora_case("alpha-zero", _poison(0.0, ".alpha"), {"*": "warned", "diff": "accepted"})
_lora_case("alpha-negative", _poison(-1.0, ".alpha"), {"*": "accepted"})


def _set(key_suffix: str, value: Callable[[torch.Tensor], torch.Tensor], nth: int = 0) -> Callable[..., None]:
    def mutate(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        key = _key(tensors, key_suffix, nth)
        tensors[key] = value(tensors[key])

    return mutate


def _drop(key_suffix: str, every: bool = False) -> Callable[..., None]:
    def mutate(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        for key in [k for k in tensors if k.endswith(key_suffix)][: None if every else 1]:
            del tensors[key]

    return mutate


_lora_case("alpha-a-vector", _set(".alpha", lambda t: torch.ones(2)), match="alpha has 2 elements")
_lora_case("missing-alpha", _drop(".alpha", every=True), {"*": "warned", "diff": "accepted"})
_lora_case("rank-mismatch", _set("lora_up.weight", lambda t: torch.cat([t, t[:, :1]], 1)), match="rank mismatch")
# a module whose factors fit no weight of the family: merge leaves it out and lists it (--strict
# refuses); rescale/resize/blend copy it verbatim with a warning (its factors make no adapter:
# formats/resolve.py Unplaced), as does a convert within kohya; the template's convert to
# diffusers refuses it by name (a malformed module has no other dialect's form), and so does the
# blend with a companion holding that module sound (two tensors for one key); inspect lists it
_UNPLACED = {"*": "warned", "diff": "accepted", "convert": "refused", "blend": "refused"}
_lora_case("up-down-swapped", _set("lora_up.weight", lambda t: t.T.contiguous()), _UNPLACED, match="not placed in")


def _rank_zero(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    for key, value in list(tensors.items()):
        if key.endswith("lora_down.weight"):
            tensors[key] = value[:0]
        elif key.endswith("lora_up.weight"):
            tensors[key] = value[:, :0]


_lora_case("rank-zero", _rank_zero, match="is empty")
_lora_case("only-down", _drop("lora_up.weight"), match="incomplete")
_lora_case("1d-factor", _set("lora_down.weight", lambda t: t.reshape(-1)), match="too few dimensions|are matrices")
_lora_case("int-factors", _set("lora_up.weight", lambda t: (t * 100).to(torch.int32)), match="are floating point")
_lora_case("bool-factor", _set("lora_down.weight", lambda t: t > 0), match="are floating point")


def _dora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    name = _key(tensors, "lora_up.weight").rsplit(".lora_up.weight", 1)[0]
    tensors[f"{name}.dora_scale"] = torch.ones(3, 5)  # fits neither axis


def _loha_incomplete(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Half a LoHa: w1 fits the module (so no shape check catches it), w2 is missing."""
    name = _key(tensors, "lora_up.weight").rsplit(".lora_up.weight", 1)[0]
    tensors[f"{name}.hada_w1_a"] = tensors.pop(f"{name}.lora_up.weight")
    tensors[f"{name}.hada_w1_b"] = tensors.pop(f"{name}.lora_down.weight")


def _lokr_both(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A LoKr whose first half is given both full and factored (which one counts?)."""
    name = _key(tensors, "lora_up.weight").rsplit(".lora_up.weight", 1)[0]
    up, down = tensors.pop(f"{name}.lora_up.weight"), tensors.pop(f"{name}.lora_down.weight")
    out, inp = up.shape[0], down.shape[1]
    tensors.update({f"{name}.lokr_w1": torch.ones(1, 1), f"{name}.lokr_w1_a": torch.ones(1, 1),
                    f"{name}.lokr_w1_b": torch.ones(1, 1), f"{name}.lokr_w2": torch.ones(out, inp) * 0.01})  # fmt: skip


_lora_case("dora-scale-wrong-shape", _dora, match="dora_scale")
_lora_case("loha-incomplete", _loha_incomplete, match="LoHa factors incomplete")
_lora_case("lokr-full-and-factored", _lokr_both, match="both full and factored")


def _twice(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A U-Net module once more under its LDM kohya spelling (input_blocks_4_1_… beside down_blocks_1_…)."""
    from loratools.formats.names import name_tables

    for spec in build.SPECS.values():
        tables = name_tables(spec)
        for module in (m for m in tables.modules if m.startswith("unet.")):
            diffusers_name = tables.kohya_name(module, sgm_unet=False, text_prefixes={})
            if f"{diffusers_name}.lora_up.weight" in tensors:
                ldm_name = tables.kohya_name(module, sgm_unet=True, text_prefixes={})
                for param in ("lora_up.weight", "lora_down.weight", "alpha"):
                    tensors[f"{ldm_name}.{param}"] = tensors[f"{diffusers_name}.{param}"].clone()
                return
    raise AssertionError("no U-Net module to duplicate")


_lora_case("module-given-twice", _twice, match="given twice")


def _unknown_keys(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors.clear()
    tensors.update({"model.layer1.weight": torch.ones(4, 4), "optimizer.step": torch.ones(1)})


def _fits_nothing(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    for key in list(tensors):
        if key.endswith("lora_down.weight"):
            tensors[key] = torch.ones(tensors[key].shape[0], 7)


def _embedding_only(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors.clear()
    tensors["emb_params"] = torch.ones(4, 768)


def _mixed(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    peft_tensors, _ = build.lora_tensors("full", "diffusers")
    tensors.update(dict(list(peft_tensors.items())[:2]))


_lora_case("unknown-keys", _unknown_keys, match="unknown LoRA key layout|not a Stable Diffusion")
# widths that fit no model: read by its SD names (issue 13: the family is a report); merge needs the base's widths
_lora_case(
    "shapes-fit-nothing",
    _fits_nothing,
    # blend's partner is a full-size LoRA: the same module at two widths cannot be summed
    {"*": "accepted", "merge": "refused", "unmerge": "refused", "blend": "refused"},
    match="fits|shapes differ",
)
_lora_case(
    "embedding-only", _embedding_only, {"*": "refused", "inspect": "warned"}, match="textual-inversion embedding"
)
_lora_case("kohya-and-peft-keys", _mixed, match="mixes kohya and diffusers/peft keys")
# the shapes say SD 1.x: they win, and the LoRA-only commands say so (merge/unmerge read it as the
# base's family, where the claim does not decide anything)
_lora_case("metadata-claims-sdxl", lambda t, m: m.update(ss_base_model_version="sdxl_base_v1-0"),
           {"*": "warned", "diff": "accepted", "merge": "accepted", "unmerge": "accepted"})  # fmt: skip
_lora_case("metadata-huge", lambda t, m: m.update(ss_tag_frequency="x" * (1 << 20)), {"*": "accepted"})
_lora_case(
    "peft-metadata-not-json", lambda t, m: m.update(lora_adapter_metadata="{"), match="not valid JSON", fmt="diffusers"
)
_lora_case(
    "peft-metadata-a-list",
    lambda t, m: m.update(lora_adapter_metadata="[1, 2]"),
    match="LoraConfig|not an object",
    fmt="diffusers",
)
_lora_case("peft-alpha-pattern-bad-regex",
           lambda t, m: m.update(lora_adapter_metadata=json.dumps({**json.loads(m["lora_adapter_metadata"]), "unet.alpha_pattern": {"(": 4}})),
           match="pattern", fmt="diffusers")  # fmt: skip


def _other_family(family: str) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        from loratools.families import FAMILIES
        from loratools.formats.io import save_lora
        from loratools.synthetic import TINY, make_lora

        spec = (TINY if ctx.scale == "tiny" else FAMILIES)[family]
        return save_lora(build.pick_modules(make_lora(spec, rank=2)), ctx.inputs / f"{family}.safetensors", "kohya")

    return make


for _family in ("sdxl", "sd2"):
    CASES.append(Case(f"lora-of-{_family}-into-sd1", CO, "lora", _other_family(_family),
                      {"*": "accepted", "merge": "refused", "unmerge": "refused", "blend": "refused"},
                      match="LoRA; the base is SD 1.x|do not fit|cannot blend"))  # fmt: skip


@case("lora-cloneofsimo-odd-list", CO, "lora", match="cloneofsimo lists hold")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "lora.pt"
    torch.save([torch.ones(4, 2), torch.ones(2, 4), torch.ones(4, 2)], path)
    return path


@case("lora-cloneofsimo-list-with-strings", CO, "lora", match="not a tensor|tensors|holds")
def _(ctx: Ctx) -> Path:
    path = ctx.inputs / "lora.pt"
    torch.save([torch.ones(4, 2), "up"], path)
    return path


@case("lora-rank-beyond-dims", CO, "lora", {"*": "accepted"}, only=frozenset({"merge", "unmerge"}))
def _(ctx: Ctx) -> Path:
    return _lora(ctx, rank=96)  # tiny modules are 16–64 wide: a rank larger than both dims is merely wasteful


# -- hostile strengths on the command line ----------------------------------------------------------
_WEIGHTED = frozenset({"merge", "unmerge", "blend", "rescale"})
for _weight, _label in (("nan", "nan"), ("inf", "inf"), ("-inf", "minus-inf"), ("1e39", "1e39")):
    # 1e39 is a finite double but inf in float32, where ΔW is computed; blend keeps it in factor
    # space (√1e39 on each side), where it stays finite: a sound, if extreme, LoRA
    CASES.append(Case(f"strength-{_label}", CO, "lora", lambda ctx: _lora(ctx),
                      {"*": "refused", "blend": "accepted"} if _weight == "1e39" else dict(REFUSE),
                      match="finite|nan|inf", weight=_weight, only=_WEIGHTED))  # fmt: skip


# -- NaN factors with --skip-nonfinite: the one place a warning and a sound result exist -----------
CASES.append(Case("lora-nan-skip-nonfinite", CO, "lora", lambda ctx: _lora(ctx, _poison(float("nan"), "lora_up.weight")),
                  {"*": "warned"}, args=("--skip-nonfinite",), only=frozenset({"merge", "unmerge"})))  # fmt: skip


# -- checkpoints whose numbers or names are wrong ------------------------------------------------------
UNET_Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # patched by the tiny LoRA
TE_K = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"  # patched too


def _ckpt(ctx: Ctx, mutate: Callable[[dict[str, torch.Tensor]], object] | None = None, *,
          dtype: torch.dtype = torch.float32, name: str = "model.safetensors") -> Path:  # fmt: skip
    tensors = build.checkpoint_tensors(dtype=dtype)
    if mutate is not None:
        mutate(tensors)
    return build.save_raw(ctx.inputs / name, tensors, {"format": "pt"})


def _ckpt_case(id: str, mutate: Callable[[dict[str, torch.Tensor]], object] | None, expect: dict[str, str],
               match: str | None = None, dtype: torch.dtype = torch.float32, **kwargs: object) -> None:  # fmt: skip
    def make(ctx: Ctx) -> Path:
        return _ckpt(ctx, mutate, dtype=dtype)

    CASES.append(Case(f"ckpt-{id}", CO, "ckpt", make, expect, match=match, **kwargs))  # type: ignore[arg-type]


def _put(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def mutate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return mutate


# NaN/inf already in the base: copying is faithful (convert), a merge carries them and says so;
# extract cannot factorize a NaN difference and refuses
_BASE_NONFINITE = {"*": "accepted", "merge": "warned", "unmerge": "warned", "extract": "refused", "diff": "accepted"}
_ckpt_case("nan-in-patched-weight", _put(UNET_Q, float("nan")), _BASE_NONFINITE, NONFINITE, allow_nonfinite=True)
_ckpt_case("inf-in-fp16-weight", _put(TE_K, float("inf")), _BASE_NONFINITE, NONFINITE, dtype=torch.float16,
           allow_nonfinite=True)  # fmt: skip


def _mixed_families(ctx: Ctx) -> Path:
    """An SD 2.x U-Net with an SD 1.x text encoder in one file."""
    from loratools.synthetic import TINY, iter_single_file, single_file_plan

    tensors = {}
    for family, prefix in (("sd2", "model."), ("sd1", "cond_stage_model.")):
        plan = {k: v for k, v in single_file_plan(TINY[family]).items() if k.startswith(prefix)}
        tensors.update(dict(iter_single_file(TINY[family], torch.float32, 0, plan)))
    return build.save_raw(ctx.inputs / "mixed.safetensors", tensors)


CASES.append(Case("ckpt-mixed-families", CO, "ckpt", _mixed_families, dict(REFUSE), match="mixed model families"))
_ckpt_case("random-keys", lambda t: (t.clear(), t.update({"layer.0.weight": torch.ones(4, 4)})), {"*": "refused"},
           match="not a Stable Diffusion checkpoint|cannot tell|A is a lora|unknown LoRA key layout")  # fmt: skip
_ckpt_case("int-weight-patched", lambda t: t.update({UNET_Q: (t[UNET_Q] * 100).to(torch.int32)}),
           {"*": "refused", "inspect": "accepted|warned", "convert": "accepted|warned", "diff": "accepted|warned",
            "extract": "accepted|refused"}, match="stored as I32")  # fmt: skip
_ckpt_case("zero-size-weight", lambda t: t.update({UNET_Q: torch.zeros(0, t[UNET_Q].shape[1])}),
           {"*": "refused", "inspect": "warned|refused", "convert": "accepted", "diff": "accepted|warned"},
           match="shape|empty|does not fit")  # fmt: skip
_ckpt_case("unet-missing", lambda t: [t.pop(k) for k in list(t) if k.startswith("model.diffusion_model.")],
           {"*": "warned|refused", "inspect": "accepted|warned", "convert": "accepted|warned", "diff": "accepted|warned"})  # fmt: skip
_ckpt_case("bf16", None, {"*": "accepted"}, dtype=torch.bfloat16)
_ckpt_case("metadata-huge", None, {"*": "accepted"})


@case("ckpt-metadata-not-strings-pickle", CO, "ckpt", {"*": "accepted"})
def _(ctx: Ctx) -> Path:
    """A Lightning .ckpt with the weights nested and a hyper-parameter dict beside them."""
    path = ctx.inputs / "model.ckpt"
    torch.save({"state_dict": build.checkpoint_tensors(), "hyper_parameters": {"lr": 1e-4, "betas": (0.9, 0.99)}}, path)
    return path


@case("ckpt-is-a-lora", CO, "ckpt", {"*": "refused", "inspect": "accepted", "convert": "accepted"},
      match="LoRA|lora|not a Stable Diffusion checkpoint|A is a")  # fmt: skip
def _(ctx: Ctx) -> Path:
    from .harness import companions

    return build.write(ctx.inputs / "lora.safetensors", companions()["lora-full"].read_bytes())


@case("lora-is-a-checkpoint", CO, "lora", {"*": "refused", "inspect": "accepted", "convert": "accepted"},
      match="checkpoint|LoRA|lora|A is a")  # fmt: skip
def _(ctx: Ctx) -> Path:
    from .harness import companions

    return build.write(ctx.inputs / "model.safetensors", companions()["ckpt"].read_bytes())


@case("ckpt-sdxl-for-sd1", CO, "ckpt", {"*": "accepted", "merge": "refused", "unmerge": "refused",
      "extract": "refused", "diff": "refused|accepted|warned"}, match="SDXL|SD 1.x|famil")  # fmt: skip
def _(ctx: Ctx) -> Path:
    from loratools.synthetic import TINY, write_checkpoint

    return write_checkpoint(TINY["sdxl"], ctx.inputs / "sdxl.safetensors", "single")


def _fp16_overflow(ctx: Ctx) -> dict[str, Path]:
    """An fp16 base at the edge of its range and a LoRA whose ΔW pushes it over: |W + ΔW| > 65504."""
    base = _ckpt(ctx, lambda t: t.update({k: torch.full_like(v, 65000.0) for k, v in t.items() if k in (UNET_Q, TE_K)}),
                 dtype=torch.float16)  # fmt: skip
    lora = _lora(ctx, lambda t, m: t.update({k: torch.tensor(1e6) for k in t if k.endswith(".alpha")}))
    return {"ckpt": base, "lora": lora}


CASES.append(Case("ckpt-fp16-overflow-after-merge", CO, "ckpt", _fp16_overflow, dict(REFUSE), match="overflows float16",
                  only=frozenset({"merge", "unmerge"})))  # fmt: skip
CASES.append(Case("ckpt-fp16-overflow-written-as-fp32", CO, "ckpt", _fp16_overflow, {"*": "accepted"},
                  args=("--dtype", "fp32"), only=frozenset({"merge", "unmerge"})))  # fmt: skip


@case("lora-delta-overflows-fp32", CO, "lora", match="NaN or inf|overflow", only=frozenset({"merge", "unmerge"}))
def _(ctx: Ctx) -> Path:
    """Finite factors of 1e20 whose product (1e40) is beyond float32: caught after the merge, not before."""
    return _lora(ctx, lambda t, m: t.update({k: torch.full_like(v, 1e20) for k, v in t.items() if "lora_" in k}))


# ==================================================================================================
# faults while writing: nothing half-written may remain, an existing output stays as it was
# ==================================================================================================
FA = "faults"


def _good_input(ctx: Ctx) -> Path:
    """A copy of the slot's good input (so the fault, not the input, is what the run meets)."""
    from .harness import companions

    good = companions()["ckpt"] if ctx.role == "ckpt" else companions()[f"lora-{ctx.scale}"]
    return build.write(ctx.inputs / good.name, good.read_bytes())


def _fault_case(id: str, code: int, match: str, *, make: Callable[[Ctx], Made] | None = None,
                skip: Callable[[Slot], bool] | None = None, **kwargs: object) -> None:  # fmt: skip
    """A fault met by every command that writes (once per command line, with good inputs)."""
    CASES.append(Case(f"fault-{id}", FA, "any", make or _good_input, dict(REFUSE), code=code, match=match,
                      per_template=True, skip=skip or (lambda slot: not slot.command.writes), **kwargs))  # type: ignore[arg-type]  # fmt: skip


@contextlib.contextmanager
def _patched(target: object, name: str, replacement: object) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def _oserror(number: int) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise OSError(number, os.strerror(number))

    return fail


@contextlib.contextmanager
def _disk_full_mid_write(ctx: Ctx) -> Iterator[None]:
    """The first write succeeds, every later one (and every kernel copy) finds the disk full;
    reservation is "not supported", so the write path, not fallocate, meets ENOSPC."""
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)  # type: ignore[arg-type]

    with (
        _patched(os, "write", write),
        _patched(os, "copy_file_range", _oserror(errno.ENOSPC)),
        _patched(os, "posix_fallocate", _oserror(errno.EOPNOTSUPP)),
    ):
        yield


@contextlib.contextmanager
def _interrupt_mid_write(ctx: Ctx, error: type[BaseException] = KeyboardInterrupt) -> Iterator[None]:
    """Ctrl-C (or another exception) arrives at the second tensor written."""
    from loratools.io import safetensors as st

    calls = {"n": 0}

    def wrap(original: Callable[..., None]) -> Callable[..., None]:
        def wrapper(self: object, *args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise error()
            original(self, *args, **kwargs)

        return wrapper

    with (
        _patched(st.StreamingWriter, "write", wrap(st.StreamingWriter.write)),
        _patched(st.StreamingWriter, "copy_raw", wrap(st.StreamingWriter.copy_raw)),
        _patched(st.StreamingWriter, "write_bytes", wrap(st.StreamingWriter.write_bytes)),  # the numpy path
    ):
        yield


_fault_case("disk-full-mid-write", 3, "disk full", fault=_disk_full_mid_write)
_fault_case("disk-full-on-reserve", 3, "not enough disk space",
            fault=lambda ctx: _patched(os, "posix_fallocate", _oserror(errno.ENOSPC)))  # fmt: skip
_fault_case("unwritable-folder-simulated", 3, "cannot write here", fault=lambda ctx: _both(
    _patched(tempfile, "mkstemp", _oserror(errno.EACCES)), _patched(tempfile, "mkdtemp", _oserror(errno.EACCES))))  # fmt: skip
_fault_case("keyboard-interrupt-mid-write", 130, "interrupted; nothing was written", fault=_interrupt_mid_write)
_fault_case("out-of-memory-mid-write", 70, "out of memory", fault=lambda ctx: _interrupt_mid_write(ctx, MemoryError))
_fault_case("sigterm-mid-write", 143, "terminated; nothing was written", signal=signal.SIGTERM)
_fault_case("sigint-mid-write", 130, "interrupted; nothing was written", signal=signal.SIGINT)


@contextlib.contextmanager
def _both(a: contextlib.AbstractContextManager[None], b: contextlib.AbstractContextManager[None]) -> Iterator[None]:
    with a, b:
        yield


def _with_out(out: Callable[[Ctx], Path]) -> Callable[[Ctx], dict[str, Path]]:
    def make(ctx: Ctx) -> dict[str, Path]:
        return {ctx.role: _good_input(ctx), "out": out(ctx)}

    return make


def _existing_output(ctx: Ctx) -> Path:
    build.write(ctx.out / "result.safetensors", b"the user's previous result")
    return ctx.out / "result"


def _folder_output(ctx: Ctx) -> Path:
    (ctx.out / "result.safetensors").mkdir()
    build.write(ctx.out / "result.safetensors" / "keep.txt", b"the user's file")
    return ctx.out / "result"


_fault_case("output-exists", 3, "already exists", make=_with_out(_existing_output))
_fault_case("output-is-a-folder", 3, "already exists", make=_with_out(_folder_output))
_fault_case("output-is-a-folder-overwrite", 3, "folder|directory|Is a directory", make=_with_out(_folder_output),
            args=("--overwrite",))  # fmt: skip
_fault_case(
    "output-folder-missing", 3, "does not exist", make=_with_out(lambda ctx: ctx.out / "no" / "such" / "result")
)


def _output_is_input(ctx: Ctx) -> dict[str, Path]:
    source = _good_input(ctx)
    return {ctx.role: source, "out": source.with_suffix("")}  # the template adds .safetensors back


_fault_case(
    "output-is-the-input", 2, "output is|one of the inputs|is the input", make=_output_is_input, args=("--overwrite",)
)


def _lora_with_embedding(ctx: Ctx) -> Path:
    return _lora(ctx, lambda t, m: t.update({"<my-token>": torch.ones(2, 768)}))


def _sidecar_exists(ctx: Ctx) -> dict[str, Path]:
    build.write(ctx.out / "result.embeddings.safetensors", b"the user's embeddings")
    return {"lora": _lora_with_embedding(ctx)}


@contextlib.contextmanager
def _second_output_fails(ctx: Ctx) -> Iterator[None]:
    """The disk fills up between the LoRA file and its embeddings sidecar (the second temporary file)."""
    import tempfile

    real_mkstemp = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    with _patched(tempfile, "mkstemp", mkstemp):
        yield


_SIDECAR = frozenset({"convert"})
CASES.append(Case("fault-embeddings-sidecar-exists", FA, "lora", _sidecar_exists, dict(REFUSE), code=3,
                  match="already exists", only=_SIDECAR, skip=lambda slot: "--to diffusers" not in slot.template))  # fmt: skip
CASES.append(Case("fault-embeddings-sidecar-disk-full", FA, "lora", _lora_with_embedding, dict(REFUSE), code=3,
                  match="disk full", only=_SIDECAR, fault=_second_output_fails,
                  skip=lambda slot: "--to diffusers" not in slot.template))  # fmt: skip


# -- the same faults on real filesystems: a full tmpfs, a read-only mount (root), a 0555 folder ----
_MOUNT: list[bool] = []


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN); probed once."""
    if not _MOUNT:
        probe = Path(tempfile.mkdtemp(prefix="loratools-mount-probe-"))
        ok = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
            ).returncode
            == 0
        )
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        probe.rmdir()
        _MOUNT.append(ok)
    return _MOUNT[0]


@contextlib.contextmanager
def _mounted(ctx: Ctx, options: str) -> Iterator[None]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(ctx.out)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(ctx.out)], capture_output=True)


@contextlib.contextmanager
def _read_only_folder(ctx: Ctx) -> Iterator[None]:
    if os.geteuid() == 0:  # root writes through 0555: only a read-only mount stops it
        with _mounted(ctx, "ro,size=64k"):
            yield
        return
    ctx.out.chmod(0o555)
    try:
        yield
    finally:
        ctx.out.chmod(0o755)


@contextlib.contextmanager
def _full_tmpfs(ctx: Ctx) -> Iterator[None]:
    """A small tmpfs at the output folder, filled to the last byte by a file of the user's."""
    with _mounted(ctx, "size=64k"):
        with contextlib.suppress(OSError), open(ctx.out / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
        yield


_fault_case("disk-full-tmpfs", 3, "not enough disk space|disk full", fault=_full_tmpfs,
            skip=lambda slot: not slot.command.writes or not can_mount())  # fmt: skip
_fault_case("unwritable-folder", 3, "cannot write here", fault=_read_only_folder,
            skip=lambda slot: not slot.command.writes or (os.geteuid() == 0 and not can_mount()))  # fmt: skip
