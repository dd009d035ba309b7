"""Latency benchmark of finished runs, on a quiet machine: rebuild each run's compressed model from its
``plan.json`` and time prefill and decode (whole model and attention modules) against the uncompressed model,
measured in the same process, before and after the compressed ones (to show drift).

    python experiments/latency.py outputs/baselines outputs/rap_criteria --context 2048 --out latency.csv

The sweep jobs time latency too, but when cells run side by side their timings share the CPU; this
re-times every plan with nothing else running. One model is loaded: each plan swaps its attention modules in and
the original ones back (no copy of the model, which a large one would not have room for).
"""
import argparse

import torch
from omegaconf import OmegaConf

from rap import apply_plan, measure
from rap.files import write_csv
from rap.harness.results import RunFolder
from rap.harness.settings import model_spec
from rap.models import load_model
from rap.modules import swapped_attention

KEYS = ["latency_prefill_ms", "latency_prefill_attention_ms", "latency_decode_ms", "latency_decode_attention_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="folders searched for finished runs (plan.json + metrics.json)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--out", default="latency.csv")
    a = ap.parse_args()
    runs = [r for r in RunFolder.find(*a.roots, finished=True) if r.plan_path.exists()]
    if not runs:
        raise SystemExit(f"error: no finished compressed runs under {' '.join(a.roots)}")
    cfg = OmegaConf.create(runs[0].config())
    base, _ = load_model(model_spec(cfg))

    def timed(model) -> dict:
        m = measure.measure_latency(model, a.context, repeats=a.repeats, warmup=1, decode_steps=a.decode_steps)
        return {k: m[k] for k in KEYS}

    rows = [{"run": "baseline (before)", **timed(base)}]
    print(rows[-1], flush=True)
    for run in runs:
        if run.config()["model"]["name"] != cfg.model.name:
            continue
        with swapped_attention(base):  # the uncompressed model again afterwards (modules and plan), for the next plan
            apply_plan(base, run.plan_path)
            rows.append({"run": str(run.path), **timed(base)})
        print(rows[-1], flush=True)
    rows.append({"run": "baseline (after)", **timed(base)})
    print(rows[-1], flush=True)
    ref = {k: (rows[0][k] + rows[-1][k]) / 2 for k in KEYS}
    for r in rows:
        r.update({f"{k}_ratio": r[k] / ref[k] for k in KEYS})
    write_csv(a.out, rows)
    print(f"threads={torch.get_num_threads()} context={a.context}; wrote {a.out}")


if __name__ == "__main__":
    main()
