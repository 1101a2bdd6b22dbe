"""Weights-only loading of torch pickles (.pt / .bin / .ckpt / .pth).

Only ``torch.load(weights_only=True)`` ever touches a pickle: its unpickler allows tensors,
containers and plain numbers and nothing else, so a ``__reduce__`` payload is refused before any of
it can run. Before that, zip-format files are checked for what torch's reader would not catch in
time: member names that escape the archive and members that inflate absurdly.
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptFileError, InputError, UnsafePickleError
from .files import regular_file
from .suffixes import PICKLE_SUFFIXES  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

# Keys under which training scripts nest the weights (Lightning, A1111 training, EMA dumps).
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "module")
_MAX_INFLATION = 200  # uncompressed / compressed; stored (uncompressed) members are 1
_MAX_MEMBER_BYTES = 64 << 30


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                parts = Path(member.filename).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts:
                    raise UnsafePickleError(
                        f"{path.name}: archive member {member.filename!r} escapes the archive; refused"
                    )
                if member.file_size > _MAX_MEMBER_BYTES or (
                    member.compress_type != zipfile.ZIP_STORED
                    and member.file_size > max(1 << 20, _MAX_INFLATION * max(member.compress_size, 1))
                ):
                    raise UnsafePickleError(
                        f"{path.name}: archive member {member.filename!r} would inflate to {member.file_size} bytes; refused"
                    )
    except zipfile.BadZipFile as exc:
        raise CorruptFileError(f"{path.name}: damaged zip archive ({exc})") from None


# Globals torch's weights-only unpickler accepts; anything else in a pickle is named in the error.
_HARMLESS_PREFIXES = (
    "torch.",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "_codecs.encode",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
)


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return archive.read(name)[: 64 << 20] if name else b""
    with open(path, "rb") as fh:
        return fh.read(64 << 20)


def suspicious_globals(path: Path) -> list[str]:
    """Callables a pickle would import, read from its opcodes without executing anything."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(_pickle_bytes(path)):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged stream: report what was seen before the damage
        pass
    return [g for g in dict.fromkeys(found) if not g.startswith(_HARMLESS_PREFIXES)]


def load_pickle(path: str | Path) -> Any:
    """Load a torch pickle with weights only; refuse anything that would need code to run.

    Returns what the file holds (usually a dict of tensors; cloneofsimo files hold a list), with a
    nested ``state_dict`` unwrapped.
    """
    return unwrap_state_dict(load_pickle_raw(path))[0]


def load_pickle_raw(path: str | Path) -> Any:
    """What a weights-only pickle holds, wrappers included (see :func:`load_pickle`)."""
    path = Path(path)
    if regular_file(path).st_size == 0:
        raise CorruptFileError(f"{path.name}: empty file")
    import torch

    zipped = zipfile.is_zipfile(path)
    if zipped:
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about pickle protocols ≠ 2 ("Detected pickle protocol 4…"):
            # noise about the file's encoding, not the user's business, and not one line
            warnings.simplefilter("ignore")
            # mmap keeps zip-format tensors on disk until touched (legacy pickles cannot be mapped)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        wanted = suspicious_globals(path)
        if wanted:
            raise UnsafePickleError(
                f"{path.name}: pickle would call {', '.join(wanted[:3])}; refused without running it",
                hint="only plain tensor pickles are read",
            ) from None
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[-1] if lines else "")
        raise UnsafePickleError(
            f"{path.name}: not a plain weights-only pickle ({detail[:120]}); refused without running it",
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CorruptFileError(f"{path.name}: cannot read torch pickle ({reason})") from None
    return obj


def unwrap_state_dict(obj: Any) -> tuple[Any, list[str]]:
    """Descend into ``{"state_dict": {...}}``-style wrappers until tensors appear.

    Returns the inner object and the names of the wrapper entries left behind (``global_step``…).
    """
    import torch

    left: list[str] = []
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in NESTED_STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        left += [str(k) for k in obj if k != key]
        obj = obj[key]
    return obj, left


def split_tensors(obj: dict[str, Any], name: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a loaded dict, and the names of the non-tensor entries that were left out.

    A tensor of a dtype no safetensors file can hold (complex, quantized…) is refused here, once
    for every reader: no Stable Diffusion weight has one, and casting it would silently drop parts.
    """
    import torch

    from .safetensors import dtype_name

    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for key, tensor in tensors.items():
        try:
            dtype_name(tensor.dtype)
        except InputError:
            where = f"{name}: " if name else ""
            raise CorruptFileError(f"{where}tensor {key!r} has unsupported dtype {tensor.dtype}") from None
    others = [str(k) for k in obj if k not in tensors]
    return tensors, others
