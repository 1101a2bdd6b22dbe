#!/usr/bin/env bash
# Every GPU measurement of issue 18 in one prepared run (< 5 min on an H200), from the repo root:
#   bash bench/gpu_all.sh
# 1. bench/bench_delta_gpu.py: batched ΔW of a full-size SDXL rank-128 LoRA, GB/s against the
#    device's own copy bandwidth (goal ≥ 70 % of that HBM bound), and patch-through-host GB/s.
# 2. bench/bench_merge.py --only sd15: full-size SD1.5 merge (ΔW on the GPU, --device auto) against
#    cp, cp + fsync (the durable floor) and the naive script, one run.
# Without CUDA it says so and exits 0, so it is safe on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_all: no CUDA device (torch.cuda.is_available() is False): skipped"
  exit 0
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true
echo "== ΔW engine on the GPU (SDXL r128) =="
timeout 150 "$PY" bench/bench_delta_gpu.py --rank 128 --runs 5
echo "== data for the merge bench (SD1.5, skipped when present) =="
timeout 90 "$PY" bench/make_data.py --only sd15-fp16.safetensors sd15-r128-kohya.safetensors
echo "== full-size SD1.5 merge, ΔW on the GPU, against the durable floor =="
timeout 120 "$PY" bench/bench_merge.py --only sd15 --runs 1
