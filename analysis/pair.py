"""Pair finished runs on the same windows and documents: B's perplexity over A's and B's accuracy minus A's, each
with its 95% paired t-interval (``rap.stats``, ``analysis.report.paired``).

    python -m analysis.pair outputs/gemma3_270m/<run A> outputs/gemma3_270m/<run B> [more B runs ...]

Runs must share the model, eval profile and seed (the same windows and documents); anything else is refused. ``*``
marks an interval that excludes no change. For whole sweeps, ``python -m analysis.report <roots> --against ...``
pairs every run with a chosen one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from analysis.report import interval_text, paired
from rap.harness.results import RunFolder

SAME = ("model", "eval_profile", "seed", "ppl_seqlen", "ppl_windows")


def load(folder: str | Path) -> tuple[dict, dict]:
    run = RunFolder(folder)
    metrics, per_sample = run.metrics(), run.per_sample()
    if metrics is None or per_sample is None:
        raise SystemExit(f"error: {run.path} is not a finished run (its metrics or per-sample scores are missing).")
    return metrics, per_sample


def pair(a: str | Path, b: str | Path) -> dict:
    """B against A: ``ppl_ratio`` and ``acc_diff`` (``rap.stats.Interval``) and the two run names."""
    (ma, sa), (mb, sb) = load(a), load(b)
    differ = [k for k in SAME if ma.get(k) != mb.get(k)]
    if differ:
        raise SystemExit(f"error: {a} and {b} differ in {', '.join(differ)}, "
                         "so they did not see the same windows and documents.")
    return {"a": ma["run_name"], "b": mb["run_name"], **paired(sa, sb)}


def fmt(i, signed: bool = False) -> str:
    return interval_text(i.estimate, i.low, i.high, i.significant, "+.3f" if signed else ".3f")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the reference run folder")
    ap.add_argument("b", nargs="+", help="run folders compared with it")
    args = ap.parse_args(argv)
    for b in args.b:
        p = pair(args.a, b)
        acc = p.get("acc_diff")
        line = f"{p['b']} against {p['a']}: ppl x {fmt(p['ppl_ratio'])}"
        print(line + (f", Δacc {fmt(acc, signed=True)}" if acc is not None else ""))


if __name__ == "__main__":
    main()
