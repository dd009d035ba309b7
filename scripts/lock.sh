#!/usr/bin/env bash
# Refreshes requirements.lock: every dependency of rap (with the dev, launchers, quant and long extras), transitive ones included, at an
# exact version, resolved by uv for the tested platform (CPython 3.11, Linux x86_64).
#
#   bash scripts/lock.sh                          # newest versions allowed by pyproject.toml
#   bash scripts/lock.sh --upgrade-package transformers
#
# Commit a refreshed lock only with the whole suite green on it: `bash .ci/run` builds a fresh environment
# from the lock and runs the tests.
#
# torch is left out of the lock (install.sh pins it as torch==2.13.0): its build variant, CPU or CUDA, is the
# machine's choice, and the CUDA build pins its own runtime packages exactly. Its other dependencies are
# resolved against the CPU build, from TORCH_CPU_WHEELS (a folder or page of CPU wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
TORCH_CPU_WHEELS=${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/python" -m pip install -q "uv==$UV_VERSION"
"$tool/bin/uv" pip compile pyproject.toml --extra dev --extra launchers --extra quant --extra long \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --find-links "$TORCH_CPU_WHEELS" --no-emit-package torch \
    --custom-compile-command "bash scripts/lock.sh" \
    -o requirements.lock "$@"
echo "wrote requirements.lock; now run: bash .ci/run"
