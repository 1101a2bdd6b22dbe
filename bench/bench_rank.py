"""Rank-surgery benchmark: loratools' factor-space resize/blend and randomized extract against a
dense reference (ΔW formed per module, full SVD, truncated) run in the same bench. One run, one table.

    python bench/make_data.py --only sd15-fp16.safetensors sd15-r128-kohya.safetensors
    python bench/make_tuned.py            # sd15-tuned-fp16.safetensors = base + known rank-128 ΔW
    python bench/bench_rank.py [--runs 3] [--skip-extract]
    python bench/bench_rank.py --floors [--runs 3] [--spinners 1]   # resize 128→32 against its floor

``--floors`` prints one table instead (issue 18 item 3): the floor rows — interpreter + ``import
numpy``, one read of the 151 MB input, the bare factor-space arithmetic (Grams, Cholesky, one r×r
``eigh`` and the rank-32 factors per module, numpy float64, one thread) ÷ cores — and loratools'
resize 128→32 wall on the numpy path (CLI, and the API with no thread variables set) and on the
torch path (``load_lora`` + ``resize_lora`` + ``save_lora``), each ÷ the floor. Every row runs
quiet and with ``--spinners`` processes (``python -c 'while 1: pass'``) that the bench starts and
stops itself; the last column is busy ÷ quiet. floor = python + numpy + max(read, arithmetic ÷ cores).
The "part" row (the interpreter and every module the CLI resize imports, no work done) shows how
much of the CLI row start-up alone takes.

Rows (SD1.5 full size, 2.13 GB fp16 checkpoints, 151 MB rank-128 kohya LoRA):

- resize 128→32 and dynamic sv_fro 0.9 of the rank-128 LoRA (264 modules);
- svd blend of the rank-128 LoRA and a rank-32 one (``sd15-r32-kohya.safetensors``, generated here
  if missing) into rank 64;
- extract rank 64 from (sd15-fp16, sd15-tuned-fp16): 350 modules incl. 3×3 convs and text encoder.

Three dense references, all with loratools' own loaders and writers, differ only in the SVD call:

- "kohya's call": ``torch.linalg.svd(ΔW)`` with its default ``full_matrices=True``, exactly as
  kohya-ss/sd-scripts networks/resize_lora.py (``extract_linear``/``extract_conv``) and
  svd_merge_lora.py call it (without their quantile clamp) — the issue's "today's tools". Not run
  for extract: a full V of the 3×3 convs (11520×11520) makes it take far longer than the others;
  the goal there is met against the thin reference.
- "thin SVD": ``full_matrices=False``, a stronger reference than the tools in use;
- "thin, wide transposed": the thin SVD of a wide matrix taken as its transpose's (same result,
  ~4× faster in this torch/MKL build for 1280×23040).

Goals are judged against kohya's call; the table shows the speed-up against all three and the
verdicts say how each stronger reference compares. Each method runs in its own child process
(bench/measure.py): "in-process s" is the operation alone (load, compute, save) after imports,
"wall s" includes interpreter and torch start-up, "peak RSS" is that child's. Speed-ups are
in-process time ratios.
After timing, outputs are checked: ranks and ΔW against the reference's, and for extract the
Frobenius error ``‖(tuned − base) − ΔW_LoRA‖`` of both outputs against the optimal truncation's
(Σ of the dropped σ² from the reference's exact SVDs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # make_data (torch) is imported where it is used: the floor children stay torch-free

OUT = Path(__file__).resolve().parent / "out"
R128, R32 = "sd15-r128-kohya.safetensors", "sd15-r32-kohya.safetensors"
BASE, TUNED = "sd15-fp16.safetensors", "sd15-tuned-fp16.safetensors"

# task → (goal: minimum speed-up, description)
TASKS = {
    "resize-r32": (50, "resize 128→32"),
    "resize-fro": (50, "resize dynamic sv_fro 0.9"),
    "blend-svd64": (30, "svd blend r128 + r32 → 64"),
    "extract-r64": (8, "extract rank 64 (2 × 2.13 GB)"),
}
EXTRACT_RSS_GIB, EXTRACT_ERROR = 1.5, 1.01
KOHYA, REFERENCE, TRANSPOSED = "dense, kohya's call", "dense, thin SVD", "thin, wide transposed"
REFERENCES = (KOHYA, REFERENCE, TRANSPOSED)


# --- the dense reference ------------------------------------------------------------------------


TRANSPOSE_WIDE = False  # set in the child for the "wide transposed" reference
FULL_MATRICES = False  # set in the child for kohya's call


def _dense_truncate(matrix, rank: int | None = None, sv_fro: float | None = None):  # type: ignore[no-untyped-def]
    """Full SVD of a dense float32 matrix, truncated by a fixed rank or sv_fro; (factored, k, tail σ²).

    With TRANSPOSE_WIDE a wide matrix is decomposed as its transpose: this torch/MKL build's SVD of
    a 1280×23040 matrix takes ~4× longer than of its 23040×1280 transpose.
    """
    import torch

    from loratools.ops.lowrank import Factored

    if TRANSPOSE_WIDE and matrix.shape[0] < matrix.shape[1]:
        v, s, uh = torch.linalg.svd(matrix.t().contiguous(), full_matrices=False)
        u, vh = uh.t(), v.t()
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=FULL_MATRICES)
        u, vh = u[:, : s.numel()], vh[: s.numel()]
    if rank is not None:
        k = min(rank, s.numel())
    else:
        frac = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
        k = int((frac < sv_fro**2).sum()) + 1  # smallest k with ‖ΔW_k‖ ≥ F‖ΔW‖
        k = min(k, s.numel())
    tail = float((s[k:].double() ** 2).sum())
    return Factored(u * s, vh, s), k, tail


def dense_resize(src: str, out: str, rank: int | None, sv_fro: float | None) -> dict:
    import torch

    from loratools.formats.io import load_lora, save_lora
    from loratools.ops.lowrank import lowrank_from

    lora = load_lora(src)
    adapters = {}
    for module, adapter in lora.adapters.items():
        delta = adapter.delta()
        svd, k, _ = _dense_truncate(delta.reshape(delta.shape[0], -1), rank, sv_fro)
        adapters[module] = lowrank_from(svd, k, tuple(delta.shape), dtype=torch.float16)
    save_lora(lora.with_adapters(adapters), out, "kohya")
    return {}


def dense_blend(a: str, b: str, out: str, rank: int) -> dict:
    import torch

    from loratools.formats.io import load_lora, save_lora
    from loratools.ops.lowrank import lowrank_from

    first, second = load_lora(a), load_lora(b)
    adapters = {}
    for module in dict.fromkeys([*first.adapters, *second.adapters]):
        parts = [x.adapters[module].delta() for x in (first, second) if module in x.adapters]
        delta = sum(parts[1:], parts[0])
        svd, k, _ = _dense_truncate(delta.reshape(delta.shape[0], -1), rank)
        adapters[module] = lowrank_from(svd, k, tuple(delta.shape), dtype=torch.float16)
    save_lora(first.with_adapters(adapters), out, "kohya")
    return {}


def _differences(base: str, tuned: str):  # type: ignore[no-untyped-def]
    """(module, shape, tuned − base as float32 (out, in·kh·kw)) for every extract target, streamed."""
    import torch

    from loratools.families.detect import detect
    from loratools.formats.names import name_tables
    from loratools.io.checkpoint import open_checkpoint
    from loratools.ops.checkpoint import CanonicalSource
    from loratools.ops.extract import extract_targets

    with open_checkpoint(base) as a, open_checkpoint(tuned) as b:
        fa, fb = detect(a.shapes(), a.metadata), detect(b.shapes(), b.metadata)
        sa, sb = CanonicalSource(a, fa.keymap, fa.layout), CanonicalSource(b, fb.keymap, fb.layout)
        modules = name_tables(fa.family).modules
        for module in extract_targets(fa.family):
            w = f"{module}.weight"
            x, y = sa.canonical(w), sb.canonical(w)
            diff = y.reshape(y.shape[0], -1).to(torch.float32, copy=True)
            diff.sub_(x.reshape(x.shape[0], -1))
            yield module, tuple(modules[module].shape), fa.family, diff


def dense_extract(base: str, tuned: str, out: str, rank: int) -> dict:
    import torch

    from loratools.formats.adapters import LoraFile
    from loratools.formats.io import save_lora
    from loratools.ops.lowrank import lowrank_from

    adapters, optimal_sq, families = {}, 0.0, []
    for module, shape, spec, diff in _differences(base, tuned):
        families.append(spec)
        svd, k, tail = _dense_truncate(diff, rank)
        optimal_sq += tail
        adapters[module] = lowrank_from(svd, k, shape, dtype=torch.float16)
    save_lora(LoraFile(adapters, families[0], "extracted"), out, "kohya")
    return {"optimal_error_sq": optimal_sq}


# --- loratools ----------------------------------------------------------------------------------


def ours(task: str, data: Path, out: str) -> dict:
    if task == "resize-r32":
        from loratools.ops.resize import resize

        resize(data / R128, out, rank=32)
    elif task == "resize-fro":
        from loratools.ops.resize import resize

        resize(data / R128, out, sv_fro=0.9)
    elif task == "blend-svd64":
        from loratools.ops.blend import blend

        blend([f"{data / R128}:1", f"{data / R32}:1"], out, mode="svd", rank=64, to="kohya")
    elif task == "extract-r64":
        from loratools.ops.extract import extract

        extract(data / BASE, data / TUNED, out, rank=64)
    return {}


def reference(task: str, data: Path, out: str) -> dict:
    if task == "resize-r32":
        return dense_resize(str(data / R128), out, 32, None)
    if task == "resize-fro":
        return dense_resize(str(data / R128), out, None, 0.9)
    if task == "blend-svd64":
        return dense_blend(str(data / R128), str(data / R32), out, 64)
    return dense_extract(str(data / BASE), str(data / TUNED), out, 64)


def child(task: str, method: str, data: str, out: str, threads: str) -> None:
    """Run one task in this (child) process; print its in-process seconds as JSON."""
    import torch  # imports are not part of the measured work

    if int(threads) > 0:
        torch.set_num_threads(int(threads))

    import loratools.formats.io
    import loratools.ops.blend
    import loratools.ops.extract
    import loratools.ops.resize  # noqa: F401

    global TRANSPOSE_WIDE, FULL_MATRICES
    TRANSPOSE_WIDE, FULL_MATRICES = method == TRANSPOSED, method == KOHYA
    start = time.perf_counter()
    extra = (ours if method == "loratools" else reference)(task, Path(data), out)
    print(json.dumps({"seconds": time.perf_counter() - start, **extra}))


# --- checks -------------------------------------------------------------------------------------


def compare_loras(a: Path, b: Path) -> dict:
    """Ranks equal, and the largest relative ΔW difference, between two outputs."""
    import torch

    from loratools.formats.io import load_lora

    x, y = load_lora(a), load_lora(b)
    same_rank, worst = 0, 0.0
    for module, p in x.adapters.items():
        q = y.adapters[module]
        same_rank += p.rank == q.rank
        dp, dq = p.delta().double(), q.delta().double().reshape(p.delta().shape)
        worst = max(worst, float(torch.linalg.vector_norm(dp - dq) / torch.linalg.vector_norm(dq)))
    return {"modules": len(x.adapters), "same_rank": same_rank, "max_rel_diff": worst}


def extract_errors(data: Path, outputs: dict[str, Path]) -> dict[str, float]:
    """‖(tuned − base) − ΔW_LoRA‖_F over every module, for each output."""
    from loratools.formats.io import load_lora

    loras: dict = {}
    sq = dict.fromkeys(outputs, 0.0)
    for module, _, spec, diff in _differences(str(data / BASE), str(data / TUNED)):
        loras = loras or {name: load_lora(path, spec) for name, path in outputs.items()}
        for name, lora in loras.items():
            delta = lora.adapters[module].delta().reshape(diff.shape)
            sq[name] += float((diff - delta).double().square().sum())
    return {name: math.sqrt(v) for name, v in sq.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=int, default=3, help="runs of each loratools row (median); the reference runs once"
    )
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in every child (default: torch's); both sides alike"
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("TASK", "METHOD", "DATA", "OUT", "THREADS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--floors", action="store_true", help="resize 128→32 against its floor rows, quiet and busy")
    parser.add_argument("--spinners", type=int, default=1, help="with --floors: spinning processes for the busy run")
    parser.add_argument("--floor-child", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.floor_child:
        floor_child(*args.floor_child)
        return
    if args.floors:
        floors(args)
        return
    from make_data import data_dir

    data = data_dir()
    needed = [R128, BASE] + ([] if args.skip_extract else [TUNED])
    missing = [n for n in needed if not (data / n).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)} in {data}: run bench/make_data.py and bench/make_tuned.py first")
    if not (data / R32).exists():
        import torch
        from synth_lora import write_kohya_lora

        write_kohya_lora("sd1", data / R32, rank=32, dtype=torch.float16, seed=1)
    tasks = [t for t in TASKS if not (args.skip_extract and t.startswith("extract"))]
    load_start = os.getloadavg()[0]
    results: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    with tempfile.TemporaryDirectory(dir=data, prefix="_bench_rank_") as tmp:
        for task in tasks:
            methods = [("loratools", args.runs)] + [
                (m, 1) for m in REFERENCES if not (m == KOHYA and task.startswith("extract"))
            ]
            for method, runs in methods:
                records = []
                for run in range(runs):
                    out = Path(tmp) / f"{task}-{len(results[task])}-{run}.safetensors"
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        task,
                        method,
                        str(data),
                        str(out),
                        str(args.threads or 0),
                    ]
                    m = measure(cmd)
                    info = json.loads(m.stdout.strip().splitlines()[-1])
                    records.append({"wall_s": m.wall_s, "rss_mib": m.maxrss_mib, **info, "out": str(out)})
                    print(f"  {task} / {method}: {info['seconds']:.2f} s in-process, {m.wall_s:.2f} s wall, "
                          f"{m.maxrss_mib:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
                results[task][method] = {
                    "seconds": statistics.median(r["seconds"] for r in records),
                    "wall_s": statistics.median(r["wall_s"] for r in records),
                    "rss_mib": max(r["rss_mib"] for r in records),
                    "runs": records,
                }
            ours_out = Path(results[task]["loratools"]["runs"][0]["out"])
            ref_out = Path(results[task][REFERENCE]["runs"][0]["out"])
            if task.startswith("extract"):
                errors = extract_errors(data, {"loratools": ours_out, "reference": ref_out})
                optimal = math.sqrt(results[task][REFERENCE]["runs"][0]["optimal_error_sq"])
                results[task]["check"] = {"optimal_error": optimal, **{f"{k}_error": v for k, v in errors.items()}}
            else:
                results[task]["check"] = compare_loras(ours_out, ref_out)
    load_end = os.getloadavg()[0]
    print_table(results, load_start, load_end, args)


def print_table(results: dict, load_start: float, load_end: float, args: argparse.Namespace) -> None:
    lines = [
        f"command: python bench/bench_rank.py --runs {args.runs}{' --skip-extract' if args.skip_extract else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}   load average {load_start:.2f} → {load_end:.2f}   "
        f"{os.cpu_count()} CPUs, torch threads: {args.threads or 'default'}",
        "",
        "| task | method | in-process s | wall s | speed-up: vs kohya's call / thin / transposed | peak RSS MiB | check |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for task, rows in results.items():
        goal, title = TASKS[task]
        ours_s = rows["loratools"]["seconds"]
        speedups = {m: rows[m]["seconds"] / ours_s for m in REFERENCES if m in rows}
        judged = KOHYA if KOHYA in speedups else REFERENCE
        speedup = speedups[judged]
        others = "; ".join(f"{x:.1f}× the {m} reference" for m, x in speedups.items() if m != judged)
        check = rows["check"]
        if task.startswith("extract"):
            ratio = check["loratools_error"] / check["optimal_error"]
            ref_ratio = check["reference_error"] / check["optimal_error"]
            text = f"error {ratio:.4f}× optimal (dense reference as stored: {ref_ratio:.4f}×)"
            rss_gib = rows["loratools"]["rss_mib"] / 1024
            ok = speedup >= goal and rss_gib <= EXTRACT_RSS_GIB and ratio <= EXTRACT_ERROR
            extra = (
                f", peak RSS {rss_gib:.2f} GiB (goal ≤ {EXTRACT_RSS_GIB}), error {ratio:.4f}× optimal "
                f"(goal ≤ {EXTRACT_ERROR})"
            )
        else:
            text = f"ranks equal {check['same_rank']}/{check['modules']}, max ΔW diff {check['max_rel_diff']:.1e}"
            ok, extra = speedup >= goal, ""
        verdicts.append(
            f"- {title}: {speedup:.1f}× the {judged} reference (goal ≥ {goal}×; {others}){extra} — "
            f"{'PASS' if ok else 'FAIL'}"
        )
        for method in ("loratools", *REFERENCES):
            if method not in rows:
                continue
            r = rows[method]
            ratio_text = " / ".join(f"{speedups[m]:.1f}×" if m in speedups else "—" for m in REFERENCES)
            lines.append(
                f"| {title} | {method} | {r['seconds']:.2f} | {r['wall_s']:.2f} | "
                f"{ratio_text if method == 'loratools' else ''} | {r['rss_mib']:.0f} | "
                f"{text if method == 'loratools' else ''} |"
            )
    lines += ["", *verdicts]
    print("\n".join(lines))
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"bench_rank-{stamp}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"bench_rank-{stamp}.json").write_text(json.dumps(results, indent=2, default=str))


# --- floors: resize 128→32 against interpreter + read + bare arithmetic (issue 18 item 3) ----------

SPIN = "while 1: pass"
# what `loratools resize` imports on the numpy path before any work (cli/rank_cmds.py, ops/resize.py)
RESIZE_IMPORTS = (
    "import loratools.cli.main, loratools.cli.rank_cmds, loratools.ops.resize, loratools.ops.rank_numpy,"
    " loratools.ops.lowrank_np, loratools.ops.svd_sign, concurrent.futures"
)
FLOOR_ROWS = {
    "python + import numpy": "floor",
    "read of the input (in-process)": "floor",
    "bare arithmetic, 1 thread (in-process)": "floor",
    "bare arithmetic ÷ cores": "floor",
    "floor = python+numpy + max(read, arith÷cores)": "floor",
    "part: python + the CLI resize's imports (numpy path, no work)": "part",
    "loratools CLI resize (numpy path)": "run",
    "loratools API resize, no thread env vars (numpy path)": "run",
    "loratools torch path (load_lora + resize_lora + save_lora)": "run",
}


def floor_child(kind: str, src: str, out: str) -> None:
    """One floor measurement in this child; prints its in-process seconds as JSON."""
    import numpy as np

    if kind == "read":
        start = time.perf_counter()
        size = os.path.getsize(src)
        buffer = np.empty(size, dtype=np.uint8)
        view = buffer.data.cast("B")
        fd = os.open(src, os.O_RDONLY)
        done = 0
        while done < size:
            done += os.preadv(fd, [view[done:]], done)
        os.close(fd)
        print(json.dumps({"seconds": time.perf_counter() - start}))
        return
    if kind == "arith":  # the least factor-space work per module, on pre-decoded float64 factors
        from safetensors.numpy import load_file

        tensors = load_file(src)
        pairs = []
        for key, up in tensors.items():
            if key.endswith(".lora_up.weight"):
                down = tensors[key.replace("lora_up", "lora_down")]
                pairs.append(
                    (up.reshape(up.shape[0], -1).astype(np.float64), down.reshape(down.shape[0], -1).astype(np.float64))
                )
        start = time.perf_counter()
        for up, down in pairs:
            chol = np.linalg.cholesky(up.T @ up)
            core = chol.T @ (down @ down.T) @ chol
            _, vec = np.linalg.eigh(core)
            e = vec[:, ::-1][:, :32]
            _ = up @ np.linalg.solve(chol.T, e), (e.T @ chol.T) @ down
        print(json.dumps({"seconds": time.perf_counter() - start}))
        return
    if kind == "api":
        from loratools.ops.resize import resize

        resize(src, out, rank=32)
    elif kind == "torch":
        from loratools.formats.io import load_lora, save_lora
        from loratools.ops.rank_rule import RankRule
        from loratools.ops.resize import resize_lora

        resized, _ = resize_lora(load_lora(src), RankRule(rank=32))
        save_lora(resized, out, "kohya")
    print(json.dumps({"seconds": 0.0}))


def _floor_round(src: Path, tmp: Path, runs: int) -> dict[str, float]:
    """Every row once per run (interleaved), median over runs."""
    from loratools.threads import ENV_VARS

    no_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    one_thread = {**os.environ, **{k: "1" for k in ENV_VARS}}
    me = [sys.executable, __file__, "--floor-child"]
    samples: dict[str, list[float]] = {name: [] for name in FLOOR_ROWS}
    for run in range(runs):
        out = tmp / f"out-{run}.safetensors"
        samples["python + import numpy"].append(measure([sys.executable, "-c", "import numpy"]).wall_s)
        samples["part: python + the CLI resize's imports (numpy path, no work)"].append(
            measure([sys.executable, "-c", RESIZE_IMPORTS], env=no_env).wall_s
        )
        read = measure([*me, "read", str(src), "-"], env=one_thread)
        samples["read of the input (in-process)"].append(json.loads(read.stdout.strip().splitlines()[-1])["seconds"])
        arith = measure([*me, "arith", str(src), "-"], env=one_thread)
        samples["bare arithmetic, 1 thread (in-process)"].append(
            json.loads(arith.stdout.strip().splitlines()[-1])["seconds"]
        )
        for name, cmd, env in (
            ("loratools CLI resize (numpy path)",
             [sys.executable, "-m", "loratools", "resize", str(src), "--rank", "32", "-o", str(out), "--overwrite"], no_env),
            ("loratools API resize, no thread env vars (numpy path)", [*me, "api", str(src), str(out)], no_env),
            ("loratools torch path (load_lora + resize_lora + save_lora)", [*me, "torch", str(src), str(out)], no_env),
        ):  # fmt: skip
            out.unlink(missing_ok=True)
            samples[name].append(measure(cmd, env=env).wall_s)
    result = {name: statistics.median(v) for name, v in samples.items() if v}
    cores = len(os.sched_getaffinity(0))
    result["bare arithmetic ÷ cores"] = result["bare arithmetic, 1 thread (in-process)"] / cores
    result["floor = python+numpy + max(read, arith÷cores)"] = result["python + import numpy"] + max(
        result["read of the input (in-process)"], result["bare arithmetic ÷ cores"]
    )
    return result


def floors(args: argparse.Namespace) -> None:
    import subprocess

    from make_data import data_dir

    data = data_dir()
    src = data / R128
    if not src.exists():
        sys.exit(f"missing {src}: run bench/make_data.py --only {R128} first")
    with tempfile.TemporaryDirectory(dir=data, prefix="_bench_floor_") as name:
        tmp = Path(name)
        src.read_bytes()  # page cache warm for both rounds: the read row is the same read in each
        load_quiet = os.getloadavg()[0]
        quiet = _floor_round(src, tmp, args.runs)
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.spinners)]
        try:
            time.sleep(0.5)
            load_busy = os.getloadavg()[0]
            busy = _floor_round(src, tmp, args.runs)
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
    floor_name = "floor = python+numpy + max(read, arith÷cores)"
    lines = [
        f"command: python bench/bench_rank.py --floors --runs {args.runs} --spinners {args.spinners}   "
        f"resize {R128} 128→32 (264 modules)   {len(os.sched_getaffinity(0))} cores, "
        f"load average {load_quiet:.2f} (quiet) / {load_busy:.2f} (busy)",
        "",
        f"| row | quiet s | ÷ floor | busy ({args.spinners} spinning) s | ÷ floor | busy ÷ quiet |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, kind in FLOOR_ROWS.items():
        q, b = quiet[row], busy[row]
        ratio_q = f"{q / quiet[floor_name]:.2f}×" if kind == "run" else ""
        ratio_b = f"{b / busy[floor_name]:.2f}×" if kind == "run" else ""
        lines.append(f"| {row} | {q:.3f} | {ratio_q} | {b:.3f} | {ratio_b} | {b / q:.2f}× |")
    print("\n".join(lines))
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"bench_rank_floors-{stamp}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
