"""Gather finished runs (every metrics.json under a folder) into one pandas table.

    python analysis/report.py outputs/default                 # markdown table to stdout
    python analysis/report.py outputs/default --csv runs.csv  # and a CSV
    python analysis/report.py outputs/a outputs/b --columns variant ratio ppl_wikitext2 kv_bytes_per_token
    python analysis/report.py outputs/baselines --latency latency.csv   # adds quiet_* columns from experiments/latency.py
    python analysis/report.py outputs/default --env          # with the environment columns (env_*)

Runs whose environments differ (package versions, commit, device, dtype, threads) are flagged on stderr and
the differing env_* columns are added to the table, so they are never compared silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "method", "variant", "criterion", "ratio", "eval_profile", "ppl_wikitext2", "acc_avg", "acc_norm_avg",
           "kv_bytes_per_token_ratio", "params_attention_ratio", "params_total_ratio", "flops_decode_ratio",
           "flops_decode_attention_ratio", "latency_decode_attention_ms_ratio", "latency_prefill_attention_ms_ratio",
           "time_compress_s"]


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per finished job under any of ``roots``; config fields flattened in as ``cfg.<key>``."""
    rows = []
    for path in sorted(p for root in roots for p in Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        cfg_path = path.with_name("config.yaml")
        if cfg_path.exists():
            from omegaconf import OmegaConf

            from rap.job import flat_config

            m.update({f"cfg.{k}": v for k, v in flat_config(OmegaConf.to_container(OmegaConf.load(cfg_path))).items()})
        m["path"] = str(path.parent)
        rows.append(m)
    df = pd.DataFrame(rows)
    if not df.empty and "cfg.criterion.name" in df:
        df["criterion"] = df["cfg.criterion.name"].where(df["method"] == "rap", "-")
    if not df.empty and "cfg.method.tag" in df:
        df["variant"] = df["cfg.method.tag"]
    return df


ENV_COLUMNS = ["env_rap_version", "env_git_commit", "env_git_dirty", "env_python", "env_torch", "env_transformers",
               "env_lm_eval", "env_datasets", "env_hydra_core", "env_device_name", "env_dtype", "env_threads"]


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
    """The comparison table: one row per cell, ratios against the uncompressed model of the same job."""
    cols = [c for c in (columns or COLUMNS) if c in df]
    keys = [c for c in ("model", "method", "ratio", "variant", "criterion") if c in cols]
    return df[cols].sort_values(keys).reset_index(drop=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+")
    ap.add_argument("--csv")
    ap.add_argument("--latency", help="CSV written by experiments/latency.py, joined as quiet_* columns")
    ap.add_argument("--columns", nargs="+", help=f"columns to show (default: {' '.join(COLUMNS)})")
    ap.add_argument("--env", action="store_true", help="add the environment columns (env_*)")
    a = ap.parse_args()
    df = load_runs(*a.roots)
    if df.empty:
        raise SystemExit(f"error: no metrics.json under {' '.join(a.roots)}")
    if a.latency:
        if not Path(a.latency).exists():
            raise SystemExit(f"error: latency file {a.latency} does not exist (write it with experiments/latency.py)")
        df = add_quiet_latency(df, a.latency)
    columns = list(a.columns or COLUMNS)
    differ = environment_differences(df)
    if differ:
        print(f"warning: these runs come from different environments ({', '.join(differ)}); "
              "the columns are shown, compare with care", file=sys.stderr)
    columns += [c for c in (ENV_COLUMNS if a.env else []) + differ if c not in columns]
    table = summary(df, columns)
    print(table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else table.to_string(index=False))
    if a.csv:
        df.to_csv(a.csv, index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
