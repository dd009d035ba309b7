#!/usr/bin/env bash
# The GPU check, one command on one GPU (about 8 minutes on an H100/H200): the default job and RAP at 0.3 on
# SmolLM2 in bf16, then the Llama-3-8B-shaped layer grid at 8k-32k tokens against the stock attention with both
# caches. Results go to results/gpu_check/ (jobs) and docs/bench/gpu_grid.csv (the grid), from which
# `python -m analysis.paper` regenerates the GPU tables. Run it as is whenever a GPU is available:
#
#   bash scripts/gpu_check.sh            # PY=<python> to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device; this check needs a GPU")'
"$PY" run.py -m ratio=0,0.3 device=cuda model.dtype=bfloat16 out_dir=results sweep=gpu_check tracking=none
"$PY" -m rap.harness.bench layer --shapes llama3-8b --modes decode prefill --contexts 8192 16384 32768 \
    --lengths 8192 --batches 1 4 --caches dynamic static --methods rap palu elitekv --ratios 0.3 --round-to 8 \
    --rounds 10 --warmup 2 --dtype bfloat16 --device cuda --out docs/bench/gpu_grid.csv
