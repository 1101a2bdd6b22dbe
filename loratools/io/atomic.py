"""Outputs that appear complete or not at all.

Every output is written to a hidden temporary file beside its destination, fsynced, and renamed
over the destination only when complete. Any exception — including KeyboardInterrupt, and SIGTERM
once the CLI has turned it into one — removes the temporary file, so nothing half-written is ever
left behind and an existing file at the destination is untouched until the rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Start writeback of what is written every this many bytes, so the fsync at the end finds little
# left to flush: a 2 GB output otherwise reaches the disk only at fsync, after all of it is written.
WRITEBACK_CHUNK = 64 * 2**20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range: Callable[[int, int, int, int], int] | bool | None = False  # False: not looked up yet


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where that does not exist.

    Durability still comes from the fsync in :meth:`AtomicFile.commit`; this only moves most of
    its work earlier, overlapped with producing the rest of the file.
    """
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = _libc_sync_file_range()
    if _sync_file_range is None or _sync_file_range is True or nbytes <= 0:
        return
    _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # errors only mean "not now"


def _size(nbytes: int) -> str:
    """Bytes as a person reads them: a LoRA needs "84.2 KiB", not "0.00 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def check_destination(path: Path, *, overwrite: bool) -> None:
    """Refuse an existing destination unless asked, and a parent folder that does not exist."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists", hint="pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: output folder does not exist")


def describe_os_error(exc: OSError, path: Path) -> OutputError:
    """Turn an OSError met while writing into a one-line OutputError."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full while writing; nothing was written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path.parent}: cannot write here ({exc.strerror})")
    return OutputError(f"{path}: write failed ({exc.strerror or exc})")


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on :meth:`commit`."""

    def __init__(self, path: Path, *, overwrite: bool = False, size_hint: int = 0) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.size_hint = size_hint
        self.tmp: Path | None = None
        self.fd: int | None = None

    def open(self) -> int:
        check_destination(self.path, overwrite=self.overwrite)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        except OSError as exc:
            raise describe_os_error(exc, self.path) from None
        self.fd, self.tmp = fd, Path(name)
        if self.size_hint and hasattr(os, "posix_fallocate"):
            # Reserve the space up front: a full disk is reported before any work is done.
            try:
                os.posix_fallocate(fd, 0, self.size_hint)
            except OSError as exc:
                self.abort()
                if exc.errno == errno.ENOSPC:
                    raise OutputError(f"{self.path}: not enough disk space ({_size(self.size_hint)} needed)") from None
                # EOPNOTSUPP and friends: the filesystem cannot reserve, write without it
                fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
                self.fd, self.tmp = fd, Path(name)
        return fd

    def commit(self, check: Callable[[Path], None] | None = None) -> None:
        """fsync and rename into place; ``check(temporary_path)`` runs first and may still refuse."""
        assert self.fd is not None and self.tmp is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            if check is not None:
                try:
                    check(self.tmp)
                except BaseException:
                    self.abort()
                    raise
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise describe_os_error(exc, self.path) from None
        self.tmp = None
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


class AtomicFolder:
    """A temporary folder beside ``path`` that becomes ``path`` on :meth:`commit`.

    Used for diffusers-folder outputs: every file is written inside the temporary folder, so a
    folder output is as all-or-nothing as a file output.
    """

    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_destination(self.path, overwrite=self.overwrite)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent))
        except OSError as exc:
            raise describe_os_error(exc, self.path) from None
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        _fsync_dir(self.path.parent)
