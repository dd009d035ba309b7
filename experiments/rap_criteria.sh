#!/usr/bin/env bash
# Issue #3 table: RAP at 20% and 30% KV reduction for each criterion on SmolLM2-135M, quick eval.
# Finished cells are skipped on rerun; the table: python analysis/report.py outputs/rap_criteria
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py sweep=rap_criteria eval=quick                       # the baseline row
python run.py -m sweep=rap_criteria eval=quick method=rap ratio=0.2,0.3 \
    criterion=key_energy,qk_energy,weight_norm,fisher,attn_error,rope_blind "$@"
python analysis/report.py outputs/rap_criteria
