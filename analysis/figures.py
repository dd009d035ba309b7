"""Regenerates every figure from finished runs, without running a model: PNG and PDF at paper size.

    python -m analysis.figures outputs/main_table outputs/criteria_ablation outputs/default --out docs/figures
    python -m analysis.figures outputs/... --out docs/figures --wandb      # also log them to a W&B run

Figures (each drawn only when the runs hold what it needs):
- ``ratio_curves``: perplexity and average accuracy against the KV reduction ratio, one line per method;
- ``pareto``: perplexity against KV bytes per token, with the Pareto front;
- ``criteria_ablation``: RAP's perplexity against ratio, one line per scoring criterion;
- ``kept_frequency_r<ratio>``: which RoPE pairs each criterion keeps (layer x pair index), from saved plans;
- ``latency_decode``, ``latency_prefill``: attention latency against context (with the ideal line) and against
  sequence length, per layer shape, from the CSV of ``python -m rap.harness.bench`` (``--latency``).
Error bars are the 95% paired t-intervals against the baseline (``analysis.report``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.collect import collect  # noqa: E402
from analysis.report import add_paired_intervals  # noqa: E402
from rap.harness.results import RunFolder  # noqa: E402
from rap.methods import METHODS, Method  # noqa: E402

plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
                     "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 150, "savefig.bbox": "tight"})
COLUMN_WIDTH, PAGE_WIDTH = 3.4, 7.0  # inches, a two-column paper
DEFAULT_CRITERION = "key_energy"
MARKERS = "osD^v<>px*"


def _label(row) -> str:
    """A short legend label: the method, and what sets this variant apart."""
    tag = str(row.get("variant", row["method"]))
    return {"none": "baseline"}.get(tag, tag)


def _with_baseline(df: pd.DataFrame) -> pd.DataFrame:
    """Intervals, plus the baseline's ppl/acc on each row, for error bars in absolute units."""
    df = add_paired_intervals(df)
    base = (df.set_index("path")[["ppl_wikitext2", "acc_avg"]] if "acc_avg" in df
            else df.set_index("path")[["ppl_wikitext2"]])
    for col in base:
        df[f"base_{col}"] = [base[col].get(p, np.nan) if isinstance(p, str) else np.nan for p in df["baseline_path"]]
    return df


def _errorbars(group: pd.DataFrame, metric: str) -> np.ndarray | None:
    """(2, n) distances from each point to its interval ends, or None when no point has an interval."""
    if metric == "ppl_wikitext2":
        low, high = (group["base_ppl_wikitext2"] * group["ppl_ratio_low"],
                     group["base_ppl_wikitext2"] * group["ppl_ratio_high"])
    else:
        low, high = group["base_acc_avg"] + group["acc_diff_low"], group["base_acc_avg"] + group["acc_diff_high"]
    if low.isna().all():
        return None
    v = group[metric]
    return np.vstack([(v - low).fillna(0).clip(lower=0), (high - v).fillna(0).clip(lower=0)])


def _main_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Method comparisons use RAP's default criterion; the criteria have their own figure."""
    keep = (df["method"] != "rap") | (df.get("criterion", DEFAULT_CRITERION) == DEFAULT_CRITERION)
    return df[keep]


def ratio_curves(df: pd.DataFrame):
    df = _main_variants(_with_baseline(df))
    base, comp = df[df["method"] == "none"], df[df["method"] != "none"]
    if comp.empty:
        return None
    metrics = [("ppl_wikitext2", "WikiText-2 perplexity"), ("acc_avg", "zero-shot accuracy (avg)")]
    metrics = [m for m in metrics if m[0] in df]
    fig, axes = plt.subplots(1, len(metrics), figsize=(PAGE_WIDTH, 2.4))
    axes = np.atleast_1d(axes)
    for k, (_variant, group) in enumerate(comp.groupby("variant")):
        group = group.sort_values("ratio")
        for ax, (metric, _) in zip(axes, metrics):
            b = base[metric].iloc[0] if not base.empty else None
            x = ([0.0] if b is not None else []) + group["ratio"].tolist()
            y = ([b] if b is not None else []) + group[metric].tolist()
            ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], ms=3, lw=1, label=_label(group.iloc[0]))
            err = _errorbars(group, metric)
            if err is not None:
                ax.errorbar(group["ratio"], group[metric], yerr=err, fmt="none", capsize=2, lw=0.8,
                            ecolor=ax.lines[-1].get_color())
    for ax, (metric, label) in zip(axes, metrics):
        ax.set_xlabel("KV-cache reduction ratio (fraction of dims removed)")
        ax.set_ylabel(label + (" (log)" if metric == "ppl_wikitext2" else ""))
        if metric == "ppl_wikitext2":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def pareto(df: pd.DataFrame):
    df = _main_variants(df)
    if "kv_bytes_per_token" not in df or df["method"].eq("none").all():
        return None
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
    for k, (_variant, group) in enumerate(df.groupby("variant")):
        ax.scatter(group["kv_bytes_per_token"] / 1024, group["ppl_wikitext2"], s=14, marker=MARKERS[k % len(MARKERS)],
                   label=_label(group.iloc[0]))
    pts = df.sort_values(["kv_bytes_per_token", "ppl_wikitext2"])[["kv_bytes_per_token", "ppl_wikitext2"]].to_numpy()
    front, best = [], np.inf
    for kv, ppl in pts:  # a point is on the front when nothing smaller has lower perplexity
        if ppl < best:
            front.append((kv, ppl))
            best = ppl
    front = np.array(front)
    ax.step(front[:, 0] / 1024, front[:, 1], where="post", color="k", lw=0.8, ls="--", label="Pareto front")
    ax.set_xlabel("KV cache per token (KiB)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def criteria_ablation(df: pd.DataFrame):
    df = _with_baseline(df)
    rap = df[(df["method"] == "rap")]
    if "cfg.method.v_path" in rap:
        rap = rap[rap["cfg.method.v_path"].fillna("channels") == "channels"]
    if rap.empty or rap["criterion"].nunique() < 2:
        return None
    base = df[df["method"] == "none"]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
    for k, (criterion, group) in enumerate(rap.groupby("criterion")):
        group = group.sort_values("ratio")
        x = ([0.0] if not base.empty else []) + group["ratio"].tolist()
        y = ([base["ppl_wikitext2"].iloc[0]] if not base.empty else []) + group["ppl_wikitext2"].tolist()
        ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], ms=3, lw=1, label=criterion)
        err = _errorbars(group, "ppl_wikitext2")
        if err is not None:
            ax.errorbar(group["ratio"], group["ppl_wikitext2"], yerr=err, fmt="none", capsize=2, lw=0.8,
                        ecolor=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache reduction ratio")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, ncol=2)
    return fig


def kept_pairs(plan: dict) -> np.ndarray | None:
    """(layers, d/2): per layer, how much of each original RoPE frequency (pair index) the plan keeps, as a fraction of
    KV heads (each method's ``Method.kept_frequencies``); None for a method that keeps no frequency as such."""
    return METHODS[plan["method"]].kept_frequencies(plan) if plan.get("method") in METHODS else None


def kept_frequency(df: pd.DataFrame) -> dict:
    """One heatmap figure per ratio: a panel per RAP criterion (and QK-norm mode), EliteKV variant and KV-Latent, layer
    x pair index (pair 0 rotates fastest). On a model with local and global layers (Gemma 3) the global layers' rows
    are marked "G" at the right."""
    mapped = df[df["method"].isin([n for n, m in METHODS.items() if m.kept_frequencies is not Method.kept_frequencies])]
    figs = {}
    for ratio, group in mapped.groupby("ratio"):
        plans, kinds = {}, {}
        for _, r in group.sort_values(["method", "criterion"] if "criterion" in group else "method").iterrows():
            plan = RunFolder(str(r["path"])).plan()
            if plan is None:
                continue
            label = METHODS[plan["method"]].panel_label(plan)
            if label not in plans:
                plans[label], kinds[label] = kept_pairs(plan), plan.get("layer_kinds")
        if not plans:
            continue
        n = len(plans)
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH, 1.9 * rows), squeeze=False, sharex=True, sharey=True)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, (criterion, grid) in zip(axes.flat, plans.items()):
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(criterion)
            for i, kind in enumerate(kinds[criterion] or []):
                if kind == "global":
                    ax.annotate("G", (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=6)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        for ax in axes[:, 0]:
            ax.set_ylabel("layer")
        fig.supxlabel("RoPE pair index (high → low frequency)", y=-0.02)
        fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of KV heads keeping the frequency")
        figs[f"kept_frequency_r{ratio:g}"] = fig
    return figs


def _bench(csv_path: str | Path, mode: str) -> pd.DataFrame:
    lat = pd.read_csv(csv_path)
    need = {"shape", "mode", "length", "batch", "cache", "variant", "method", "ratio", "round_to", "status",
            "median_ms"}
    if not need <= set(lat.columns):
        raise SystemExit(f"error: {csv_path} lacks the columns {sorted(need - set(lat.columns))} "
                         "(write it with python -m rap.harness.bench)")
    return lat[(lat["status"] == "ok") & (lat["mode"] == mode)]


def _latency_panels(lat: pd.DataFrame, ratio: float, ylabel: str, xlabel: str, ideal: bool):
    """One panel per layer shape: stock, rap-full and each method at ``ratio`` (round_to 1) against length;
    ``ideal``: rap-full's time scaled by the kept KV fraction."""
    shapes = list(dict.fromkeys(lat["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(min(PAGE_WIDTH, COLUMN_WIDTH * len(shapes)), 2.4), squeeze=False)
    keep = (lat["variant"].isin(["stock", "rap-full"])) | ((lat["ratio"] == ratio) & (lat["round_to"] == 1))
    for ax, shape in zip(axes[0], shapes):
        sub = lat[keep & (lat["shape"] == shape)]
        for k, (variant, group) in enumerate(sub.groupby("variant", sort=False)):
            group = group.sort_values("length")
            ax.plot(group["length"], group["median_ms"], marker=MARKERS[k % len(MARKERS)], ms=3, lw=1, label=variant)
        full = sub[sub["variant"] == "rap-full"].sort_values("length")
        rap = sub[(sub["method"] == "rap") & (sub["ratio"] == ratio)].sort_values("length")
        if ideal and len(full) and len(rap):
            ax.plot(full["length"], full["median_ms"].to_numpy() * rap["ideal_ratio"].median(), "k--", lw=0.8,
                    label=f"ideal ({rap['ideal_ratio'].median():.2f} x rap-full)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(frameon=False, fontsize=6)
    return fig


def latency_decode(csv_path: str | Path, ratio: float = 0.3, batch: int = 1, cache: str = "dynamic"):
    """Decode attention latency per step against context, with the ideal line, from ``python -m rap.harness.bench``."""
    lat = _bench(csv_path, "decode")
    lat = lat[(lat["batch"] == batch) & (lat["cache"] == cache)]
    return (_latency_panels(lat, ratio, f"decode attention (ms/step, batch {batch})", "context (tokens)", ideal=True)
            if len(lat) else None)


def latency_prefill(csv_path: str | Path, ratio: float = 0.3, cache: str = "dynamic"):
    """Prefill attention latency against sequence length, from ``python -m rap.harness.bench``."""
    lat = _bench(csv_path, "prefill")
    lat = lat[lat["cache"] == cache]
    return (_latency_panels(lat, ratio, "prefill attention (ms)", "sequence length (tokens)", ideal=False)
            if len(lat) else None)


FIGURES = ("ratio_curves", "pareto", "criteria_ablation", "kept_frequency", "latency_decode", "latency_prefill")


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell when several roots hold the same one (e.g. the baseline of two sweeps)."""
    keys = [k for k in ("model", "variant", "criterion", "ratio", "eval_profile", "seed") if k in df]
    return df.drop_duplicates(subset=keys).reset_index(drop=True)


def all_figures(df: pd.DataFrame, latency_csv=None, only=FIGURES) -> dict:
    df = dedupe(df)
    draw = {"ratio_curves": lambda: {"ratio_curves": ratio_curves(df)}, "pareto": lambda: {"pareto": pareto(df)},
            "criteria_ablation": lambda: {"criteria_ablation": criteria_ablation(df)},
            "kept_frequency": lambda: kept_frequency(df),
            "latency_decode": lambda: {"latency_decode": latency_decode(latency_csv) if latency_csv else None},
            "latency_prefill": lambda: {"latency_prefill": latency_prefill(latency_csv) if latency_csv else None}}
    figs = {}
    for name in only:
        figs.update(draw[name]())
    return {k: v for k, v in figs.items() if v is not None}


def save(figs: dict, out: str | Path, formats=("png", "pdf")) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        for ext in formats:
            fig.savefig(out / f"{name}.{ext}", dpi=200 if ext == "png" else None)
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
    return written


def log_to_wandb(files: list[Path], table: pd.DataFrame, project: str, group: str | None) -> None:
    """The figures and the report table, in a W&B run of their own (offline unless WANDB_MODE says otherwise)."""
    from rap.harness.tracking import init_wandb_run

    run = init_wandb_run(Path(files[0]).parent, project=project, group=group, name="figures", job_type="analysis")
    import wandb

    run.log({p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"})
    run.log({"report": wandb.Table(dataframe=table.astype(str))})
    run.finish()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*", help="result folders (none: only the latency figures of --latency)")
    ap.add_argument("--out", required=True, help="folder for the PNG and PDF files")
    ap.add_argument("--latency", help="CSV of python -m rap.harness.bench, for latency_decode and latency_prefill")
    ap.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES), help="draw only these figures")
    ap.add_argument("--wandb", action="store_true", help="also log the figures and the report table to W&B")
    ap.add_argument("--project", default="rap")
    ap.add_argument("--group", help="W&B group of the figures run (default: none)")
    a = ap.parse_args(argv)
    if not a.roots:  # the benchmark's figures alone
        if not a.latency:
            raise SystemExit("error: give result folders, or --latency <bench CSV>")
        latency = [f for f in a.only if f.startswith("latency_")]
        figs = {"latency_decode": latency_decode, "latency_prefill": latency_prefill}
        for f in save({n: fig for n in latency if (fig := figs[n](a.latency)) is not None}, a.out):
            print(f)
        return
    df, _ = collect(*a.roots)
    if df.empty:
        raise SystemExit(f"error: no metrics.json under {' '.join(a.roots)}")
    files = save(all_figures(df, a.latency, a.only), a.out)
    for f in files:
        print(f)
    if not files:
        print("warning: the runs hold nothing to draw", file=sys.stderr)
    if a.wandb and files:
        from analysis.report import paper_table

        log_to_wandb(files, paper_table(df), a.project, a.group)


if __name__ == "__main__":
    main()
