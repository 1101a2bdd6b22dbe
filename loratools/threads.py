"""How many threads each kind of work gets: the one place loratools decides it.

Two kinds of numeric work, two rules:

- **Many small decompositions** (per-module Grams, Cholesky, r×r ``eigh``, randomized SVDs of one
  module, numpy Grams): BLAS/LAPACK threads help little at these sizes and collapse when another
  process holds a core — an OpenMP team waits at every barrier for a member the scheduler parked
  (``eigh`` of 128×128, 300 calls: 0.27 s on one thread, up to 6.2 s on two with the other core
  busy). They run **one thread per worker, workers in parallel** (:func:`module_workers`), so a
  busy core slows them by its fair share, not by spin-waits, and every module's bits are those of
  a single-threaded run whatever the core count.
- **Large GEMMs** (the merge engine's batched ``W + U·D``, chunks of up to 128 MiB): enough work
  per barrier that intra-op threads pay; they get :func:`gemm_threads` — the cores free *now*
  (affinity minus other runnable tasks), so a busy box gets one thread. The batched products
  split along the output, never along the rank, so their bits do not depend on the count either.

Limits, strongest first: ``--threads N`` (:func:`set_threads`), then ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` as the user set them before loratools started,
then the cores this process may run on (``sched_getaffinity``). :func:`prepare_environment`
(called by the CLI before torch or numpy load) sets the libraries' start-up defaults to one thread
unless the user set them, so nothing runs with a spinning team by accident; the code paths above
raise the count where it pays. This module imports neither torch nor numpy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The variables BLAS/OpenMP runtimes read once, when they load.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Below this many multiply-adds a GEMM runs on one thread: a barrier costs ~10 µs quiet and
# milliseconds when a team member is descheduled.
GEMM_MIN_FLOPS = 64 * 2**20

_requested: int | None = None  # --threads N
# What the user set before loratools touched the environment (captured at import).
_USER_ENV: dict[str, str] = {name: os.environ[name] for name in ENV_VARS if name in os.environ}


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def set_threads(count: int | None) -> None:
    """``--threads N``: at most N threads for any work (None: back to the default policy)."""
    global _requested
    if count is not None and count < 1:
        from .errors import InputError

        raise InputError(f"--threads must be ≥ 1, got {count}")
    _requested = count


def cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_limit() -> int | None:
    """The thread limit the user gave: ``--threads``, else the smallest BLAS/OpenMP variable set."""
    if _requested is not None:
        return _requested
    given = [v for v in (_positive_int(_USER_ENV.get(name)) for name in ENV_VARS) if v is not None]
    return min(given) if given else None


def busy_elsewhere() -> int:
    """Runnable tasks other than this one right now (``/proc/loadavg``'s running count − 1).

    An instant reading, not the 1-minute average: the average still reports a box that went
    quiet a minute ago as busy. Falls back to the rounded 1-minute load average.
    """
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            running = int(handle.read().split()[3].split("/")[0])
        return max(0, running - 1)
    except (OSError, ValueError, IndexError):
        try:
            return max(0, round(os.getloadavg()[0]))
        except OSError:
            return 0


def free_cores() -> int:
    """Cores not taken by other runnable tasks now (at least 1)."""
    return max(1, cores() - busy_elsewhere())


def budget() -> int:
    """Threads loratools may use in all: the user's limit, else every core it may run on."""
    limit = user_limit()
    return limit if limit is not None else cores()


def module_workers(items: int | None = None) -> int:
    """Parallel single-threaded workers for per-module work (never more than there are items).

    Not reduced by load: single-threaded workers lose only their fair share to a busy core, and
    two of them on two busy cores still get more CPU than one.
    """
    count = budget()
    return max(1, min(count, items) if items is not None else count)


def gemm_threads(flops: float | None = None) -> int:
    """Intra-op threads for one large matrix product of ``flops`` multiply-adds (None: large)."""
    if flops is not None and flops < GEMM_MIN_FLOPS:
        return 1
    limit = user_limit()
    free = free_cores()
    return max(1, min(free, limit) if limit is not None else free)


def file_workers(files: int) -> int:
    """Worker processes for a batch over ``files`` files (``-j`` when not given): one per core free
    now, within the user's limit, never more than there are files. Each worker runs one thread."""
    limit = user_limit()
    free = free_cores() if limit is None else min(free_cores(), limit)
    return max(1, min(free, files))


def io_workers(remote: bool, limit: int | None = None) -> int:
    """Threads for header-only reads over many files (census): they wait on the disk or network,
    not a core, so the count is not the core count — 4 for local files, 16 for HTTP range
    requests (latency-bound). ``limit`` (``-j``) wins when given."""
    if limit:
        return limit
    return 16 if remote else 4


def prepare_environment() -> None:
    """Before torch/numpy load: their thread pools start with one thread unless the user set one.

    Call it first thing in an entry point. Variables the user set are left as they are.
    """
    for name in ENV_VARS:
        if name not in _USER_ENV:
            os.environ[name] = "1"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count (process-wide; also MKL's and OpenMP's) for the block."""
    import torch

    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# numpy's OpenBLAS names its thread calls with a build prefix/suffix (pip wheels: scipy_…64_); the
# same affixes joblib/threadpoolctl:threadpoolctl.py (OpenBLASController) tries.
OPENBLAS_AFFIXES = tuple((p, s) for p in ("scipy_", "") for s in ("64_", "_64", ""))
_blas_handles: dict[str, tuple[Any, Any] | None] = {}  # library path → (get, set) calls, or None


def _openblas_calls(path: str) -> tuple[Any, Any] | None:
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS already loaded from ``path``."""
    import ctypes

    try:  # RTLD_NOLOAD: only a library this process has loaded already, never a second copy
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", ctypes.DEFAULT_MODE))
    except OSError:
        return None
    for prefix, suffix in OPENBLAS_AFFIXES:
        get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
        put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
        if get is not None and put is not None:
            get.restype, get.argtypes = ctypes.c_int, []
            put.restype, put.argtypes = None, [ctypes.c_int]
            return get, put
    return None


def openblas_pools() -> list[tuple[Any, Any]]:
    """The ``(get, set)`` thread calls of every OpenBLAS loaded in this process (numpy's own
    among them once numpy is imported). Found in ``/proc/self/maps`` (Linux); elsewhere none."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            paths = {line.split(maxsplit=5)[5].strip() for line in handle if "openblas" in line.lower()}
    except (OSError, IndexError):
        return []
    found = []
    for path in sorted(
        p for p in paths if os.path.basename(p).lower().startswith(("libopenblas", "libscipy_openblas"))
    ):
        if path not in _blas_handles:
            _blas_handles[path] = _openblas_calls(path)
        calls = _blas_handles[path]
        if calls is not None:
            found.append(calls)
    return found


@contextmanager
def numpy_blas_threads(count: int) -> Iterator[None]:
    """numpy's BLAS threads for the block (process-wide), restored after it.

    OpenBLAS (numpy's pip wheels) is set through its own ``openblas_set_num_threads``, found in
    the loaded library with ctypes: without it an API caller with no thread variables set gets
    OpenBLAS on every core inside each single-threaded worker (issue 18: 34.5 s instead of 1.67 s
    on a busy box). Where no OpenBLAS is found (another platform, an MKL or Accelerate numpy),
    threadpoolctl is used when installed; else the count numpy started with stays (one, when the
    CLI's :func:`prepare_environment` ran first).
    """
    pools = openblas_pools()
    if pools:
        before = [get() for get, _ in pools]
        for _, put in pools:
            put(count)
        try:
            yield
        finally:
            for (_, put), value in zip(pools, before, strict=True):
                put(value)
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=count, user_api="blas"):
        yield


def describe() -> dict[str, object]:
    """The policy's inputs and decisions now (for ``--json`` reports and benchmarks)."""
    return {
        "cores": cores(),
        "busy_elsewhere": busy_elsewhere(),
        "user_limit": user_limit(),
        "module_workers": module_workers(),
        "gemm_threads": gemm_threads(),
    }
