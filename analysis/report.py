"""Paper-style tables from finished runs, with paired intervals against each run's baseline or any other run.

    python -m analysis.report outputs/main_table                     # Markdown: method x ratio, baseline first
    python -m analysis.report outputs/main_table --format latex      # or csv (numbers, intervals as columns)
    python -m analysis.report outputs/a outputs/b --columns variant ratio ppl_wikitext2   # raw columns instead
    python -m analysis.report outputs/baselines --latency latency.csv   # quiet_* columns from experiments/latency.py
    python -m analysis.report outputs/default --env                  # with the environment columns (env_*)
    python -m analysis.report outputs/kv_quant --cache                # methods x quantized caches: bytes by part
    python -m analysis.report outputs/long_context --long             # RULER: each task x length, paired Δ
    python -m analysis.report outputs/main_table --against method=rap  # every run against RAP at its ratio
    python -m analysis.report outputs/main_table outputs/heal --heal     # training-free beside healed, paired
    python -m analysis.report outputs/main_table outputs/heal --against heal=none --match untrained_variant ratio

Each compressed run is paired with the uncompressed run of the same model, eval profile and seed (the same
documents and windows): ``ppl x`` is its perplexity ratio and ``Δacc`` its average-accuracy difference, each
with a 95% paired t-interval (``rap.stats``); ``*`` marks an interval that excludes no change. Bold marks the best
compressed value of a column at each ratio. Runs whose environments differ (package versions, commit,
device, dtype, threads) are flagged on stderr and the differing env_* columns added to the table.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import collect, collect_local
from rap.harness.evaluators import by_length, pair_runs
from rap.harness.results import RunFolder
from rap.harness.zeroshot import CHANCE
from rap.methods import METHODS
from rap.stats import above_chance, paired_accuracy_difference, wilson_lower_bound

COLUMNS = ["model", "method", "variant", "criterion", "ratio", "eval_profile", "ppl_wikitext2", "acc_avg",
           "acc_norm_avg", "kv_bytes_per_token_ratio", "params_attention_ratio", "params_total_ratio",
           "flops_decode_ratio", "flops_decode_attention_ratio", "latency_decode_attention_ms_ratio",
           "latency_prefill_attention_ms_ratio", "time_compress_s"]
ENV_COLUMNS = ["env_rap_version", "env_git_commit", "env_git_dirty", "env_python", "env_torch", "env_transformers",
               "env_lm_eval", "env_datasets", "env_hydra_core", "env_device_name", "env_dtype", "env_threads"]
# Measured costs, as ratios to the baseline. In-job latencies stay out: they are timed beside other work, so the
# benchmark (rap.harness.bench, docs/benchmark.md) is the latency source.
COST_COLUMNS = {"kv_bytes_per_token_ratio": "KV", "params_attention_ratio": "attn params",
                "flops_decode_attention_ratio": "attn FLOPs", "flops_decode_ratio": "decode FLOPs"}
# Each interval column and the value column that ranks with it.
RANKED = {"ppl_ratio": "ppl_wikitext2", "acc_diff": "acc_avg", "acc_above_diff": "acc_above"}
METHOD_ORDER = {"none": 0, **{name: m.order for name, m in METHODS.items()}}
PAIR_KEYS = ("model", "eval_profile", "seed")  # runs sharing these saw the same documents and windows


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per finished job under any of ``roots``; config fields flattened in as ``cfg.<key>``."""
    return collect_local(*roots)[0]


def environment_differences(df: pd.DataFrame) -> list[str]:
    """The env_* columns whose value is not the same in every run (a run without the key counts as different)."""
    cols = [c for c in df.columns if c.startswith("env_")]
    return [c for c in cols if df[c].astype(str).nunique(dropna=False) > 1 or df[c].isna().any()]


def add_quiet_latency(df: pd.DataFrame, csv_path: str | Path) -> pd.DataFrame:
    """Join the timings of ``experiments/latency.py`` (re-timed with nothing else running) as ``quiet_*`` columns,
    matched by run folder; uncompressed runs get the mean of its before/after baseline timings."""
    lat = pd.read_csv(csv_path)
    keys = [c for c in lat.columns if c != "run"]
    is_base = lat["run"].str.startswith("baseline")
    base = lat[is_base][keys].mean()
    by_run = {str(Path(r).resolve()): t for r, t in zip(lat["run"], lat[keys].to_dict("records"))}
    rows = [base.to_dict() if m == "none" else by_run.get(str(Path(p).resolve()), {})
            for m, p in zip(df["method"], df["path"])]
    return df.join(pd.DataFrame(rows, index=df.index, columns=keys).add_prefix("quiet_"))


def summary(df: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Raw columns, one row per run, sorted by model, method, ratio."""
    cols = [c for c in (columns or COLUMNS) if c in df]
    keys = [c for c in ("model", "method", "ratio", "variant", "criterion") if c in cols]
    return df[cols].sort_values(keys).reset_index(drop=True)


@functools.cache
def _read_per_sample(path: str) -> dict | None:
    if path.startswith("wandb:"):  # a run collected from W&B: its per-sample tables
        from analysis.collect import per_sample_from_wandb

        return per_sample_from_wandb(path)
    return RunFolder(path).per_sample()


def per_sample(path) -> dict | None:
    """A run's ``per_sample.json`` (read once per report; callers do not modify it)."""
    return _read_per_sample(str(path))


def _references(df: pd.DataFrame, against: dict | None, match: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """The runs others are paired with, and the columns a run and its reference share: by default the uncompressed
    run (a full-precision cache first) of the same model, eval profile and seed; with ``against`` (column -> value),
    the run that has those values and also shares the ``match`` columns (the ratio, say)."""
    keys = [k for k in PAIR_KEYS if k in df]
    if against is None:
        refs = df[df["method"] == "none"]
        if "kv_cache" in refs:  # a full-precision cache is the reference of every quantized one
            refs = refs.sort_values("kv_cache", key=lambda c: c != "fp", kind="stable")
        if "cfg.press.name" in refs:  # and an unpressed cache that of every pressed one
            refs = refs[refs["cfg.press.name"].fillna("none").eq("none")]
        return refs, keys
    unknown = [k for k in against if k not in df]
    if unknown:
        raise SystemExit(f"error: --against names {', '.join(unknown)}, which no run has; columns are "
                         f"{', '.join(sorted(c for c in df if not c.startswith(('acc_', 'env_', 'time_'))))}")
    mask = pd.Series(True, index=df.index)
    for k, v in against.items():
        mask &= df[k].astype(str) == str(v)
    return df[mask], keys + [m for m in match if m in df and m not in keys]


def add_paired_intervals(df: pd.DataFrame, against: dict | None = None,
                         match: tuple[str, ...] = ("ratio",)) -> pd.DataFrame:
    """``ppl_ratio``/``acc_diff``/``long_diff`` (with ``_low``, ``_high``, ``_significant``) of each run against its
    reference (``_references``: the baseline unless ``against`` says otherwise), paired on the same windows and
    documents; ``reference_path`` names it (``baseline_path`` too, for the baseline)."""
    df = df.copy()
    names = [f"{m}{s}" for m in ("ppl_ratio", "acc_diff", "acc_above_diff", "long_diff")
             for s in ("", "_low", "_high", "_significant")]
    for n in names:
        df[n] = math.nan
    df["baseline_path"], df["reference_path"] = None, None
    refs, keys = _references(df, against, match)
    for i, row in df.iterrows():
        quantized = isinstance(row.get("kv_cache"), str) and row["kv_cache"] != "fp"
        pressed = isinstance(row.get("cfg.press.name"), str) and row["cfg.press.name"] != "none"
        if against is None and row["method"] == "none" and not (quantized or pressed):
            continue
        found = refs[(refs[keys] == row[keys]).all(axis=1)] if keys else refs
        if found.empty or found.iloc[0]["path"] == row["path"]:
            continue
        ref = found.iloc[0]
        df.at[i, "reference_path"] = ref["path"]
        if against is None:
            df.at[i, "baseline_path"] = ref["path"]
        for name, iv in paired(per_sample(ref["path"]), per_sample(row["path"])).items():
            df.at[i, name], df.at[i, f"{name}_low"], df.at[i, f"{name}_high"] = iv.estimate, iv.low, iv.high
            df.at[i, f"{name}_significant"] = float(iv.significant)
    return add_above_chance(df, refs, keys)


def above_chance_tasks(per_sample: dict | None) -> list[str]:
    """The zero-shot tasks on which a (baseline) run's accuracy is resolved above chance (``rap.stats.above_chance``,
    ``rap.harness.zeroshot.CHANCE``), in its task order."""
    zs = (per_sample or {}).get("zeroshot") or {}
    return [t for t, d in zs.items() if t in CHANCE and above_chance(d["acc"], CHANCE[t])]


def add_above_chance(df: pd.DataFrame, refs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``acc_above``: each run's mean accuracy over the tasks on which its model's baseline (same model, eval profile
    and seed) is above chance (``above_tasks``), and ``acc_above_diff`` against its reference on those tasks."""
    baselines = df[df["method"] == "none"]
    if "kv_cache" in baselines:
        baselines = baselines[baselines["kv_cache"].fillna("fp") == "fp"]
    if "cfg.press.name" in baselines:
        baselines = baselines[baselines["cfg.press.name"].fillna("none").eq("none")]
    base_keys = [k for k in PAIR_KEYS if k in df]
    df["acc_above"], df["above_tasks"] = math.nan, None
    for i, row in df.iterrows():
        base = baselines[(baselines[base_keys] == row[base_keys]).all(axis=1)] if base_keys else baselines
        tasks = above_chance_tasks(per_sample(base.iloc[0]["path"])) if len(base) else []
        if not tasks or not all(f"acc_{t}" in row and pd.notna(row[f"acc_{t}"]) for t in tasks):
            continue
        df.at[i, "acc_above"] = float(np.mean([row[f"acc_{t}"] for t in tasks]))
        df.at[i, "above_tasks"] = ", ".join(tasks)
        ref, own = row.get("reference_path"), per_sample(row["path"])
        ref_zs = (per_sample(ref) or {}).get("zeroshot") or {} if isinstance(ref, str) else {}
        if own and set(tasks) <= set(own.get("zeroshot") or {}) and set(tasks) <= set(ref_zs):
            iv = paired_accuracy_difference(ref_zs, own["zeroshot"], tasks=tasks)
            df.at[i, "acc_above_diff"], df.at[i, "acc_above_diff_low"] = iv.estimate, iv.low
            df.at[i, "acc_above_diff_high"], df.at[i, "acc_above_diff_significant"] = iv.high, float(iv.significant)
    return df


def chance_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each baseline's accuracy per task beside the chance accuracy: the margin, the 95% Wilson lower bound, and
    whether the task counts in the headline ``acc_above``."""
    rows = []
    for _, r in df[df["method"] == "none"].sort_values("model").iterrows():
        zs = (per_sample(r["path"]) or {}).get("zeroshot") or {}
        for t, d in zs.items():
            if t not in CHANCE:
                continue
            acc = float(np.mean(d["acc"]))
            rows.append({"model": r["model"], "task": t, "documents": str(len(d["acc"])), "acc": f"{acc:.3f}",
                         "chance": f"{CHANCE[t]:.3f}", "margin": f"{acc - CHANCE[t]:+.3f}",
                         "95% lower bound": f"{wilson_lower_bound(d['acc']):.3f}",
                         "above chance": "yes" if above_chance(d["acc"], CHANCE[t]) else "no"})
    return pd.DataFrame(rows)


def paired(a: dict | None, b: dict | None) -> dict:
    """Run ``b``'s intervals against run ``a`` from their ``per_sample.json``: ``ppl_ratio`` (b/a), ``acc_diff`` and
    ``long_diff`` (b - a), each where both runs have it on the same windows or documents (each evaluation's own
    pairing rule, ``rap.harness.evaluators``)."""
    return pair_runs(a, b)


def paper_table(df: pd.DataFrame, tasks: bool = True, extra: list[str] = (), against: dict | None = None,
                match: tuple[str, ...] = ("ratio",)) -> pd.DataFrame:
    """Numbers for the paper table: per model the baseline first, then each ratio's methods; intervals against the
    baseline, or against the ``against`` run (``add_paired_intervals``)."""
    df = add_paired_intervals(df, against, match)
    for col in COST_COLUMNS:  # the baseline is the reference of every ratio column
        if col in df:
            df.loc[df["method"] == "none", col] = df.loc[df["method"] == "none", col].fillna(1.0)
    df["_order"] = df["method"].map(METHOD_ORDER).fillna(9)
    df = df.sort_values([c for c in ("model", "ratio", "_order", "variant") if c in df]).reset_index(drop=True)
    task_cols = sorted(c for c in df
                       if c.startswith("acc_")
                       and not c.startswith(("acc_norm", "acc_stderr", "acc_avg", "acc_diff", "acc_above")))
    cols = ["model", "method", "variant", "ratio", "ppl_wikitext2", "ppl_ratio", "ppl_ratio_low", "ppl_ratio_high",
            "ppl_ratio_significant", "acc_avg", "acc_diff", "acc_diff_low", "acc_diff_high", "acc_diff_significant",
            "acc_above", "acc_above_diff", "acc_above_diff_low", "acc_above_diff_high", "acc_above_diff_significant",
            *(task_cols if tasks else []), *COST_COLUMNS, *extra]
    return df[[c for c in cols if c in df]]


# Which direction is better, for marking the best value of each column.
LOWER_IS_BETTER = {"ppl_wikitext2", "ppl_ratio", *COST_COLUMNS}


def _fmt(x, spec=".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def interval_text(est, low, high, significant, spec=".3f") -> str:
    """``est [low, high]``, ``*`` where the interval excludes no change; blank without an estimate."""
    if est is None or (isinstance(est, float) and math.isnan(est)):
        return ""
    return f"{_fmt(est, spec)} [{_fmt(low, spec)}, {_fmt(high, spec)}]" + ("*" if significant else "")


def format_table(table: pd.DataFrame, fmt: str = "md", columns: list[str] | None = None) -> str:
    """Markdown or LaTeX: intervals as ``est [low, high]``, ``*`` where significant, the best per ratio in bold;
    ``columns``: only these headers, in this order."""
    frame = formatted_frame(table, fmt)
    if columns:
        frame = frame[[c for c in columns if c in frame]]
    if fmt == "latex":
        body = frame.to_latex(index=False, escape=False)
        return body.replace("_", "\\_").replace("Δ", "$\\Delta$")
    return frame.to_markdown(index=False, disable_numparse=True)


def best_cells(table: pd.DataFrame, value_cols: list[str]) -> set:
    """(row, column) of each ratio's best compressed value that is bold: a measured cost where it is the best (costs
    carry no sampling noise), and a quality column (an interval and the value ranked with it) only where the best
    interval excludes the runner-up's estimate. Per-task accuracies have no interval, so none is bold."""
    best = set()
    for _, group in table[table["method"] != "none"].groupby("ratio"):
        for col in [c for c in COST_COLUMNS if c in value_cols]:
            vals = group[col].dropna()
            if len(vals) > 1 and vals.nunique() > 1:  # equal values (the KV budget of every method) mark nothing
                best |= {(idx, col) for idx in vals.index[vals == vals.min()]}
        for col, value in RANKED.items():
            if col not in value_cols:
                continue
            vals = group[col].dropna().sort_values(ascending=col in LOWER_IS_BETTER)
            if len(vals) < 2:
                continue
            top, runner_up = vals.index[0], vals.iloc[1]
            if not group.at[top, f"{col}_low"] <= runner_up <= group.at[top, f"{col}_high"]:
                best |= {(top, col), (top, value)}
    return best


def formatted_frame(table: pd.DataFrame, fmt: str = "md") -> pd.DataFrame:
    """``paper_table``'s numbers as text, under the headers of ``HEADERS``, the best per ratio in bold
    (``best_cells``)."""
    bold = (lambda s: f"**{s}**") if fmt == "md" else (lambda s: f"\\textbf{{{s}}}")
    task_cols = [c for c in table if c.startswith("acc_") and c != "acc_avg"
                 and not c.startswith(("acc_diff", "acc_above"))]
    value_cols = [c for c in ("ppl_wikitext2", "ppl_ratio", "acc_avg", "acc_diff", "acc_above", "acc_above_diff",
                              *task_cols, *COST_COLUMNS) if c in table]
    env_cols = [c for c in table if c.startswith("env_")]
    best = best_cells(table, value_cols)
    rows = []
    for i, r in table.iterrows():
        out = {"model": r.get("model", ""), "method": r["method"], "variant": r.get("variant", ""),
               "ratio": _fmt(r["ratio"], ".2f")}
        for col in value_cols:
            if col in RANKED:
                s = interval_text(r.get(col), r.get(col + "_low"), r.get(col + "_high"),
                                  r.get(col + "_significant") == 1.0, ".3f" if col == "ppl_ratio" else "+.3f")
            else:
                s = _fmt(r[col], ".2f" if col == "ppl_wikitext2" else ".3f")
            out[HEADERS.get(col, col.replace("acc_", ""))] = bold(s) if (i, col) in best and s else s
        out.update({c: r[c] for c in env_cols})
        rows.append(out)
    return pd.DataFrame(rows)


def cache_table(df: pd.DataFrame) -> pd.DataFrame:
    """Methods composed with KV-cache quantization (``+experiment=kv_quant``): per run, the KV bytes per token the
    cache really held, split into full-precision values (residual tokens), packed integers and scales with
    zero-points, against the closed form; the cached perplexity and the long-context scores, each with its paired
    95% interval against the uncompressed model with a full-precision cache."""
    df = add_paired_intervals(df)
    df["_order"] = df["method"].map(METHOD_ORDER).fillna(9)
    df = df.sort_values(["model", "_order", "ratio", "kv_bytes_per_token"], ascending=[True, True, True, False])
    tokens = df["kv_bytes"] / df["kv_bytes_per_token"]
    fp = df[(df["method"] == "none") & (df["kv_cache"] == "fp")]["kv_bytes_per_token"]
    rows = []
    for i, r in df.iterrows():
        out = {"model": r["model"], "method": r["method"], "ratio": _fmt(r["ratio"], ".2f"), "cache": r["kv_cache"],
               "KV B/token": f"{r['kv_bytes_per_token']:,.0f}",
               "of fp baseline": _fmt(r["kv_bytes_per_token"] / fp.iloc[0]) if len(fp) else "",
               **{f"{part} B/token": f"{r[f'kv_bytes_{part}'] / tokens[i]:,.0f}"
                  for part in ("full", "packed", "scales")},
               "closed form": f"{r['kv_bytes_per_token_formula']:,.0f}", "ppl": _fmt(r["ppl_wikitext2"], ".3f"),
               "ppl mode": r.get("ppl_mode", "")}
        for name, col in (("ppl x [95% CI]", "ppl_ratio"), ("Δ long [95% CI]", "long_diff")):
            out[name] = interval_text(r[col], r[col + "_low"], r[col + "_high"], r[col + "_significant"] == 1)
        for c in sorted(c for c in df if c.startswith("ruler_") and c != "ruler_limit" and isinstance(r[c], float)
                        and not pd.isna(r[c])):
            out[c.replace("ruler_", "")] = _fmt(r[c])
        rows.append(out)
    return pd.DataFrame(rows)


def heal_table(df: pd.DataFrame) -> pd.DataFrame:
    """Recovery (``+experiment=heal``): each healed run beside the training-free run of the same variant and ratio,
    both paired against the baseline, and the healed run paired against the training-free one, on the same windows
    and documents. Takes the training-free runs (``heal=none``) and the healed ones together."""
    base = add_paired_intervals(df)
    gain = add_paired_intervals(df, {"heal": "none"}, ("untrained_variant", "ratio"))
    base["_order"] = base["method"].map(METHOD_ORDER).fillna(9)
    healed = base[(base["heal"] != "none") & (base["method"] != "none")].sort_values(["ratio", "_order", "variant"])
    rows = []
    for i, r in healed.iterrows():
        free = base.loc[base["path"] == gain.at[i, "reference_path"]]
        f = free.iloc[0] if len(free) else None
        rows.append({
            "variant": r["untrained_variant"], "ratio": _fmt(r["ratio"], ".2f"),
            "healed": f"{r['heal']}, {r.get('cfg.heal.source')}", "KV B/token": f"{r['kv_bytes_per_token']:,.0f}",
            "ppl training-free": "" if f is None else _fmt(f["ppl_wikitext2"], ".2f"),
            "ppl healed": _fmt(r["ppl_wikitext2"], ".2f"),
            "ppl x, training-free [95% CI]": "" if f is None else row_interval(f, "ppl_ratio", ".3f"),
            "ppl x, healed [95% CI]": row_interval(r, "ppl_ratio", ".3f"),
            "healed / training-free [95% CI]": row_interval(gain.loc[i], "ppl_ratio", ".3f"),
            "Δacc, training-free [95% CI]": "" if f is None else row_interval(f, "acc_diff", "+.3f"),
            "Δacc, healed [95% CI]": row_interval(r, "acc_diff", "+.3f"),
            "Δacc, healed − training-free [95% CI]": row_interval(gain.loc[i], "acc_diff", "+.3f")})
    return pd.DataFrame(rows)


def row_interval(r, col: str, spec: str) -> str:
    """A row's ``col`` interval (``add_paired_intervals``'s columns) as ``interval_text``."""
    return interval_text(r[col], r[f"{col}_low"], r[f"{col}_high"], r[f"{col}_significant"] == 1.0, spec)


def long_table(df: pd.DataFrame) -> pd.DataFrame:
    """RULER scores (``eval=long``) per run: each task at each length, and per length the average over tasks with
    its paired 95% interval against the uncompressed run (same documents), so a reader sees where a method loses."""
    df = df[df.get("eval_profile", pd.Series("long", index=df.index)) == "long"]
    df = add_paired_intervals(df)  # its baseline choice: the uncompressed run with a full-precision cache
    df["_order"] = df["method"].map(METHOD_ORDER).fillna(9)
    df = df.sort_values(["model", "_order", "ratio"])
    rows = []
    for _, r in df.iterrows():
        run = per_sample(r["path"])
        if not (run or {}).get("long"):
            continue
        cells = by_length(run["long"])
        base = per_sample(r["baseline_path"]) if r["baseline_path"] else None
        base_cells = by_length(base["long"]) if base and base.get("long") else None
        out = {"model": r["model"], "method": r["method"], "ratio": _fmt(r["ratio"], ".2f")}
        lengths = sorted({int(k.rsplit("_", 1)[1]) for k in cells})
        for n in lengths:
            at = sorted(k for k in cells if k.endswith(f"_{n}"))
            out[f"avg@{n}"] = _fmt(float(np.mean([np.mean(cells[k]["score"]) for k in at])))
            if base_cells is not None:
                iv = paired_accuracy_difference(base_cells, cells, "score", tasks=at)
                out[f"Δ@{n} [95% CI]"] = interval_text(iv.estimate, iv.low, iv.high, iv.significant, "+.3f")
        for k in sorted(cells, key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_", 1)[1]))):
            task, n = k.rsplit("_", 1)
            out[f"{task}@{n}"] = _fmt(float(np.mean(cells[k]["score"])), ".2f")
        rows.append(out)
    frame = pd.DataFrame(rows)
    per_length = sorted((c for c in frame if c.startswith(("avg@", "Δ@"))),
                        key=lambda c: (int(c.split("@")[1].split()[0]), c.startswith("Δ")))
    rest = [c for c in frame if c not in per_length and c not in ("model", "method", "ratio")]
    return frame[["model", "method", "ratio", *per_length, *rest]].fillna("")


HEADERS = {"ppl_wikitext2": "ppl", "ppl_ratio": "ppl x [95% CI]", "acc_avg": "acc", "acc_diff": "Δacc [95% CI]",
           "acc_above": "acc>chance", "acc_above_diff": "Δacc>chance [95% CI]", **COST_COLUMNS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+")
    ap.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    ap.add_argument("--out", help="write the table to this file as well")
    ap.add_argument("--csv", help="write every column of every run to this CSV")
    ap.add_argument("--no-tasks", action="store_true", help="leave out the per-task accuracy columns")
    ap.add_argument("--latency", help="CSV written by experiments/latency.py, joined as quiet_* columns")
    ap.add_argument("--columns", nargs="+", help="raw columns instead of the paper table")
    ap.add_argument("--env", action="store_true", help="add the environment columns (env_*)")
    ap.add_argument("--cache", action="store_true", help="the KV-cache quantization table (+experiment=kv_quant)")
    ap.add_argument("--long", action="store_true", help="the RULER table (eval=long): task x length, paired Δ")
    ap.add_argument("--heal", action="store_true",
                    help="the healing table: give the training-free and the healed runs' folders")
    ap.add_argument("--against", nargs="+", metavar="COLUMN=VALUE",
                    help="pair every run with the run having these values (e.g. method=rap, variant=..., heal=none) "
                         "instead of the baseline")
    ap.add_argument("--match", nargs="+", default=["ratio"], metavar="COLUMN",
                    help="with --against: columns a run and its reference share (default: ratio)")
    a = ap.parse_args(argv)
    against = dict(x.split("=", 1) for x in a.against) if a.against else None
    df, _ = collect(*a.roots)
    if df.empty:
        raise SystemExit(f"error: no metrics.json under {' '.join(a.roots)}")
    if a.latency:
        if not Path(a.latency).exists():
            raise SystemExit(f"error: latency file {a.latency} does not exist (write it with experiments/latency.py)")
        df = add_quiet_latency(df, a.latency)
    differ = environment_differences(df)
    if differ:
        print(f"warning: these runs come from different environments ({', '.join(differ)}); "
              "the columns are shown, compare with care", file=sys.stderr)
    extra = [c for c in (ENV_COLUMNS if a.env else []) + differ]
    if a.cache or a.long or a.heal:
        table = cache_table(df) if a.cache else long_table(df) if a.long else heal_table(df)
        text = table.to_csv(index=False) if a.format == "csv" else table.to_markdown(index=False, disable_numparse=True)
    elif a.columns or a.env or a.latency:
        table = summary(df, list(a.columns or COLUMNS) + [c for c in extra if c not in (a.columns or COLUMNS)])
        text = table.to_csv(index=False) if a.format == "csv" else table.to_markdown(index=False, floatfmt=".4g")
    else:
        table = paper_table(df, tasks=not a.no_tasks, extra=differ, against=against, match=tuple(a.match))
        text = table.to_csv(index=False) if a.format == "csv" else format_table(table, a.format)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    if a.csv:
        df.to_csv(a.csv, index=False)


if __name__ == "__main__":
    main()
