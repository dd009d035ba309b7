#!/usr/bin/env bash
# The test suite against another transformers release: a fresh environment from the lock with only
# transformers swapped (pip refuses if the locked neighbours do not fit it), then the README's test command.
#
#   bash scripts/test_transformers.sh 5.23.0      # the release before the locked one
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/test_transformers.sh VERSION}
venv=.venv-transformers-$version
lock=$(mktemp)
trap 'rm -f "$lock"' EXIT
grep -v '^transformers==' requirements.lock >"$lock"
echo "transformers==$version" >>"$lock"
RAP_VENV=$venv RAP_LOCK=$lock RAP_FRESH_VENV=1 bash scripts/install.sh
"$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'
"$venv/bin/python" -m pytest -q tests "${@:2}"
