#!/usr/bin/env bash
# Issue #4 table: RAP against Palu-style and EliteKV-style at the same KV budget, SmolLM2-135M, quick eval.
# Finished cells are skipped on rerun. Run nothing else on the machine meanwhile: latency is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
python run.py sweep=baselines eval=quick                                  # the baseline row
python run.py -m sweep=baselines eval=quick method=rap,palu,elitekv ratio=0.2,0.3 "$@"
python run.py -m sweep=baselines eval=quick method=rap method.v_path=lowrank method.group_size=1 ratio=0.2,0.3 "$@"  # per-head V
python run.py -m sweep=baselines_vjoint eval=quick method=rap method.v_path=lowrank method.group_size=4 ratio=0.2,0.3 "$@"
python experiments/latency.py outputs/baselines outputs/baselines_vjoint --repeats 2 --out outputs/baselines/latency.csv
python analysis/report.py outputs/baselines outputs/baselines_vjoint --latency outputs/baselines/latency.csv \
    --columns variant cfg.method.group_size ratio ppl_wikitext2 acc_avg kv_bytes_per_token \
    kv_bytes_per_token_ratio params_attention params_attention_ratio flops_decode_attention flops_decode_attention_ratio \
    quiet_latency_decode_attention_ms quiet_latency_decode_attention_ms_ratio
