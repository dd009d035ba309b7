"""The latency grid of ``python -m rap.harness.bench layer`` as one table per ratio: per shape and cell (mode, length,
batch, cache), each method's median ratio to rap's full-width path with its interquartile range, the ideal ratio (kept
KV fraction) and rap-full against the stock attention.

    python -m analysis.bench_table outputs/bench/grid.csv --ratio 0.3 --out docs/bench/grid_r0.3.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def _cell(r) -> str:
    return f"{r.ratio_to_full:.3f} [{r.ratio_to_full_q1:.3f}, {r.ratio_to_full_q3:.3f}]"


def bench_table(csv_path: str | Path, ratio: float = 0.3) -> pd.DataFrame:
    lat = pd.read_csv(csv_path)
    lat = lat[lat["status"] == "ok"]
    keys = ["shape", "mode", "length", "batch", "cache"]
    rows = []
    for cell, g in lat.groupby(keys, sort=False):
        row = dict(zip(keys, cell))
        at = g[g["ratio"] == ratio]
        for r in at.itertuples():
            row[r.variant.replace(f"-r{ratio}", "")] = _cell(r)
        if len(at):
            row["ideal"] = round(float(at[at["method"] == "rap"]["ideal_ratio"].median()), 3)
        stock = g[g["variant"] == "stock"]
        if len(stock):  # rap-full / stock = 1 / (stock / rap-full)
            row["rap-full / stock"] = round(1 / float(stock["ratio_to_full"].iloc[0]), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    if not Path(a.csv).exists():
        raise SystemExit(f"error: {a.csv} does not exist (write it with python -m rap.harness.bench layer)")
    text = bench_table(a.csv, a.ratio).to_markdown(index=False)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
