#!/usr/bin/env bash
# One short GPU run for a lent device machine (torch CUDA, no registry, no TensorRT): the YOLOv6 N/S/M/L deploy
# graphs in fp32, fp16 and fp16 + CUDA graphs, bs1 / bs32 at 640, JSON in $OUT (or benchmarks/results/gpu/).
# Budget: under 5 minutes on an H100/H200 (timeout 280 s). Usage from the repo root: bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
PYTHONPATH=. timeout 280 python benchmarks/gpu/bench_gpu.py "$@"
