"""The latency grid of ``python -m rap.harness.bench layer`` as one table per ratio: per shape and cell (mode, length,
batch, cache), each method's median ratio to rap's full-width path with its interquartile range and its ratio to the
stock transformers attention, each variant's ideal ratio (its kept KV fraction) and rap-full against stock.

    python -m analysis.bench_table outputs/bench/grid.csv --ratio 0.3 --out docs/bench/grid_r0.3.md
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


def _cell(r) -> str:
    """Ratio to rap-full [IQR] / ratio to the stock attention (medians of per-round ratios)."""
    return f"{r.ratio_to_full:.3f} [{r.ratio_to_full_q1:.3f}, {r.ratio_to_full_q3:.3f}] / {r.ratio_to_stock:.3f}"


def _ok(csv_path) -> pd.DataFrame:
    lat = pd.read_csv(csv_path)
    return lat[lat["status"] == "ok"]


def bench_table(csv_path: str | Path, ratio: float | tuple = 0.3, modes: tuple = ()) -> pd.DataFrame:
    """Per cell (shape, mode, length, batch, cache), each variant at ``ratio`` (or at each of several, then named
    with their ratio) as ratio to rap-full [IQR] / ratio to stock, each variant's own ideal (its kept KV fraction),
    and rap-full against stock; ``modes``: only these (prefill, decode)."""
    lat = _ok(csv_path)
    if modes:
        lat = lat[lat["mode"].isin(modes)]
    ratios = ratio if isinstance(ratio, tuple) else (ratio,)
    name = (lambda v: v) if len(ratios) > 1 else (lambda v: v.replace(f"-r{ratio}", ""))
    keys = ["shape", "mode", "length", "batch", "cache"]
    rows = []
    for cell, g in lat.groupby(keys, sort=False):
        row = dict(zip(keys, cell))
        at = g[g["ratio"].isin(ratios)]
        for r in at.itertuples():
            row[name(r.variant)] = _cell(r)
        for r in at[at["method"] == "rap"].itertuples():
            row[f"ideal {name(r.variant)}"] = f"{r.ideal_ratio:.3f}"
        full = g[g["variant"] == "rap-full"]
        if len(full):
            row["rap-full / stock"] = f"{float(full['ratio_to_stock'].iloc[0]):.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(q1: float, q3: float, target: float) -> str:
    """``met`` only when the whole interquartile range lies at or below ``target``; ``missed`` when it lies above."""
    if q3 <= target:
        return "met"
    return "missed" if q1 > target else "unresolved (the IQR spans it)"


def targets_table(csv_path: str | Path, targets: dict[str, float], ratio: float = 0.3) -> pd.DataFrame:
    """RAP at ``ratio`` against its latency target per mode (``targets``: mode -> ratio to rap-full), beside its
    ratio to the stock attention, Palu-style at the same ratio (and how many times RAP's time it takes: a ratio of
    the two medians), and rap-full against stock."""
    lat = _ok(csv_path)
    rows = []
    for (mode, length, batch, cache), g in lat.groupby(["mode", "length", "batch", "cache"], sort=False):
        v = {r.variant: r for r in g.itertuples()}
        rap, palu, full = v.get(f"rap-r{ratio}"), v.get(f"palu-r{ratio}"), v.get("rap-full")
        if rap is None:
            continue
        iqr = f"{rap.ratio_to_full:.3f} [{rap.ratio_to_full_q1:.3f}, {rap.ratio_to_full_q3:.3f}]"
        rows.append({"cell": f"{mode} {length}, batch {batch}, {cache}", f"RAP {ratio} / rap-full": iqr,
                     "target": f"≤ {targets[mode]}", "verdict": verdict(rap.ratio_to_full_q1, rap.ratio_to_full_q3,
                                                                      targets[mode]),
                     f"RAP {ratio} / stock": f"{rap.ratio_to_stock:.3f}", "ideal": f"{rap.ideal_ratio:.3f}",
                     f"Palu {ratio} / rap-full": "" if palu is None else
                     f"{palu.ratio_to_full:.3f} [{palu.ratio_to_full_q1:.3f}, {palu.ratio_to_full_q3:.3f}]",
                     "Palu / RAP": "" if palu is None else f"{palu.ratio_to_full / rap.ratio_to_full:.2f}",
                     "rap-full / stock": "" if full is None else f"{full.ratio_to_stock:.3f}"})
    return pd.DataFrame(rows)


def model_table(csv_path: str | Path, ratio: float = 0.3) -> pd.DataFrame:
    """The whole-model grid (``python -m rap.harness.bench model``): per context, each variant's decode step time as
    its median ratio to rap-full [IQR]; RAP's ratio to the stock attention (a ratio of the two medians: this grid
    keeps no per-round ratio to stock); and tokens per second."""
    lat = _ok(csv_path)
    rows = []
    for (length, batch), g in lat.groupby(["length", "batch"], sort=True):
        v = {r.variant: r for r in g.itertuples()}
        row = {"context": str(length), "batch": str(batch)}
        for name, r in v.items():
            if name != "rap-full":
                row[name.replace(f"-r{ratio}", f" {ratio}")] = (f"{r.ratio_to_full:.3f} [{r.ratio_to_full_q1:.3f}, "
                                                                f"{r.ratio_to_full_q3:.3f}]")
        rap, stock = v.get(f"rap-r{ratio}"), v.get("stock")
        if rap is not None and stock is not None:
            row[f"rap {ratio} / stock"] = f"{rap.ratio_to_full / stock.ratio_to_full:.3f}"
        for name in ("stock", "rap-full", f"rap-r{ratio}"):
            if name in v:
                row[f"{name.replace(f'-r{ratio}', f' {ratio}')} tok/s"] = f"{v[name].tokens_per_s:.1f}"
        if rap is not None:
            row["ideal"] = f"{rap.ideal_ratio:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Quote:
    """Cells of a latency CSV that a page's prose cites: ``variant`` where every column of ``where`` equals its value
    (or lies in its tuple of values); ``label`` names them in words."""

    label: str
    variant: str
    where: dict = field(default_factory=dict)


def _span(values, fmt: str = "{:.3f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def quoted_table(csv_path: str | Path, quotes: tuple) -> pd.DataFrame:
    """One row per quote: how many cells it covers, the variant's ratio to rap-full (one cell: its median [IQR];
    several: the range of their medians), its ratio to stock, and its median step time in ms."""
    lat = _ok(csv_path)
    rows = []
    for q in quotes:
        sel = lat["variant"] == q.variant
        for col, value in q.where.items():
            sel &= lat[col].isin(value if isinstance(value, tuple) else (value,))
        cells = lat[sel]
        if cells.empty:
            raise SystemExit(f"error: no cell of {csv_path} matches the quote '{q.label}'")
        if len(cells) == 1:
            r = cells.iloc[0]
            to_full = f"{r.ratio_to_full:.3f} [{r.ratio_to_full_q1:.3f}, {r.ratio_to_full_q3:.3f}]"
        else:
            to_full = _span(cells["ratio_to_full"])
        rows.append({"quoted": q.label, "variant": q.variant, "cells": str(len(cells)), "/ rap-full": to_full,
                     "/ stock": _span(cells["ratio_to_stock"]), "ms": _span(cells["median_ms"], "{:.2f}")})
    return pd.DataFrame(rows)


def scale_extrapolated(rows: pd.DataFrame) -> pd.DataFrame:
    """``experiments/scale.py``'s stage rows, per shape x run x stage, from the 1- and 2-layer measurements: seconds
    per layer (the difference), the peak at each, and the estimate at the real layer count L (``layers_real``):
    time t1 + (L-1)·(t2-t1), peak p1 + (L-1)·max(0, p2-p1)."""
    out = []
    for (shape, run, stage_name), g in rows.groupby(["shape", "run", "stage"], sort=False):
        m = {int(r.layers): r for r in g.itertuples()}
        if 1 not in m or 2 not in m:
            continue
        L = int(m[1].layers_real)
        t1, t2 = float(m[1].seconds), float(m[2].seconds)
        p1, p2 = int(m[1].peak_bytes), int(m[2].peak_bytes)
        per_layer = max(t2 - t1, 0.0)
        out.append({"shape": shape, "run": run, "stage": stage_name, "layers_real": L,
                    "s_per_layer": per_layer, "s_fixed": max(t1 - per_layer, 0.0),
                    "peak_mb_1": p1 / 2**20, "peak_mb_2": p2 / 2**20,
                    "est_s": t1 + (L - 1) * per_layer, "est_peak_gb": (p1 + (L - 1) * max(0, p2 - p1)) / 2**30})
    return pd.DataFrame(out)


def scale_table(*csv_paths: str | Path) -> pd.DataFrame:
    """The scale benchmark's extrapolation (``scale_extrapolated``) from one or more of its CSVs, formatted."""
    est = scale_extrapolated(pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True))
    return pd.DataFrame({"shape (layers)": [f"{r.shape} ({r.layers_real})" for r in est.itertuples()],
                         "method": est["run"], "stage": est["stage"],
                         "s/layer": est["s_per_layer"].map("{:.1f}".format),
                         "peak MB, 1 layer": est["peak_mb_1"].map("{:.0f}".format),
                         "peak MB, 2 layers": est["peak_mb_2"].map("{:.0f}".format),
                         "est. time, all layers": (est["est_s"] / 60).map("{:.1f} min".format),
                         "est. peak GB, all layers": est["est_peak_gb"].map("{:.2f}".format)})


def threads_table(csv_path: str | Path) -> pd.DataFrame:
    """``experiments/scale.py --threads``: per shape, the median time of one whitened factorisation with eigh/SVD on
    one thread and on torch's default count, over interleaved rounds, and the ratio of the two medians."""
    t = pd.read_csv(csv_path)
    rows = []
    for shape, g in t.groupby("shape", sort=False):
        med = g.groupby("linalg_threads")["seconds"].median()
        one, many = med.loc[1], med.drop(1)
        for threads, secs in many.items():
            rounds = int((g["linalg_threads"] == threads).sum())
            rows.append({"shape": shape, "rounds": str(rounds), "one thread": f"{one:.2f} s",
                         f"{threads} threads": f"{secs:.2f} s", "one against the other": f"{one / secs:.2f}x"})
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    if not Path(a.csv).exists():
        raise SystemExit(f"error: {a.csv} does not exist (write it with python -m rap.harness.bench layer)")
    text = bench_table(a.csv, a.ratio).to_markdown(index=False, disable_numparse=True)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
