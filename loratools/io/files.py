"""What every reader checks before opening a path: that it is a regular file.

Opening a FIFO for reading blocks until a writer appears (forever, for a hostile path), and a
device such as ``/dev/zero`` never ends: a reader that trusts ``open`` hangs on both. A
``stat`` first never blocks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError


def regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of ``path`` if it is a regular file (symlinks followed), else a one-line InputError."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, ENOTDIR…
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a folder, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a pipe, socket or device); give a file")
    return st


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same place, symlinks followed.

    ``os.path.realpath`` rather than ``Path.resolve``: the latter raises on a symlink loop, which
    a hostile input may well be (the reader then says what is wrong with it).
    """
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies inside ``folder`` once symlinks are followed (loops never raise)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
