#!/usr/bin/env bash
# The full suite as CI runs it, with its 20 slowest tests: writes docs/bench/test_durations.txt, which
# `python -m analysis.paper` turns into the table in docs/usage.md#tests. Run it on an idle machine from a clean
# checkout; the file records the commit, the cores and pytest's closing line.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/bench/test_durations.txt
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/python -m pytest -q -n 2 tests --durations=20 -p no:cacheprovider | tee "$log"
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (uncommitted changes)')"
  echo "cores $(nproc)"
  grep -E '^[0-9.]+s (call|setup|teardown) ' "$log"
  grep -E '^=* ?[0-9]+ passed' "$log" | tail -n 1
} >"$out"
echo "wrote $out"
