"""Gather jobs into one tidy DataFrame: one row per finished job, config fields as ``cfg.<key>`` columns.

    python -m analysis.collect outputs/main_table outputs/default        # local result folders (offline)
    python -m analysis.collect --wandb entity/project [--group main_table]  # the same columns from W&B
    python -m analysis.collect outputs/main_table --csv runs.csv

Jobs that failed (``failure.json``) or never finished (``config.yaml`` without ``metrics.json``: ``running`` while a
process holds the job's lock, ``killed`` when its holder died, else ``unfinished``) are listed on stderr and returned by
``collect`` as a second table, never dropped silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from rap.harness.results import RunFolder, flat_config, lock_state
from rap.methods import METHODS
from rap.naming import whiten_size


def _config(run: RunFolder) -> dict:
    return flat_config(run.config() or {})


def healed_suffix(row) -> str:
    """" + healed (layerwise, wiki)" for a healed compressed run, else "": the variant is ``untrained_recipe`` plus
    this, e.g. "RAP (key_energy) + healed (layerwise, wiki)"."""
    heal = row.get("cfg.heal.name")
    if isinstance(heal, str) and heal != "none" and row.get("method") != "none":
        return f" + healed ({heal}, {row.get('cfg.heal.source')})"
    return ""


def press_suffix(row) -> str:
    """" + streaming press 0.5" for a run whose context was pressed (``conf/press``), else ""."""
    press = row.get("cfg.press.name")
    if isinstance(press, str) and press != "none":
        return f" + {press} press {row.get('cfg.press.ratio')}"
    return ""


def calibration_suffix(row) -> str:
    """" calibrated on c4" for a compressed run whose calibration text is not the default (wiki), else "": the
    criteria's and decompositions' statistics, and a heal's data, come from it."""
    source = row.get("cfg.calibration.source")
    if isinstance(source, str) and source != "wiki" and row.get("method") != "none":
        return f" calibrated on {source}"
    return ""


def untrained_recipe(row) -> str:
    """The variant as a reader names it, from the job config, without healing: e.g. "Palu (whiten, per head,
    fisher_uniform)", "EliteKV + whitening (greedy)" (each method's ``Method.label``). Falls back to the method's
    tag."""
    name = row.get("method")
    if name == "none":
        return "baseline"
    if name in METHODS:
        return METHODS[name].label(row)
    return str(row.get("cfg.method.tag", name))


def _derive(df: pd.DataFrame) -> pd.DataFrame:
    """Columns every report uses: ``variant`` (the recipe, e.g. "EliteKV + whitening (greedy, r searched)"),
    ``untrained_variant`` (the same without healing), ``heal`` (the heal mode, ``none`` when not healed), ``tag``
    (the method's tag, as in the run name) and ``criterion`` (RAP's, else '-')."""
    if df.empty:
        return df
    if "cfg.method.tag" in df:
        df["tag"] = df["cfg.method.tag"]
        rows = [r for _, r in df.iterrows()]
        df["untrained_variant"] = [untrained_recipe(r) + press_suffix(r) + calibration_suffix(r)
                                   if isinstance(r.get("method"), str)
                                   else r.get("cfg.method.tag") for r in rows]
        df["variant"] = [u + healed_suffix(r) if isinstance(r.get("method"), str) else u
                         for u, r in zip(df["untrained_variant"], rows)]
    # runs from before the heal group existed, and the uncompressed baseline, were not healed
    df["heal"] = df["cfg.heal.name"].fillna("none") if "cfg.heal.name" in df else "none"
    if "method" in df:
        df.loc[df["method"] == "none", "heal"] = "none"
    if "cfg.criterion.name" in df and "method" in df:
        df["criterion"] = df["cfg.criterion.name"].where(df["method"] == "rap", "-")
    if "cfg.sweep" in df:
        df["experiment"] = df["cfg.sweep"]
    if "cfg.calibration.n_samples" in df:
        df["whiten_calibration"] = [whiten_size(r) for _, r in df.iterrows()]
    return df


def collect_local(*roots: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(finished, problems)`` from the job folders under ``roots`` (any depth)."""
    missing = [str(r) for r in roots if not Path(r).exists()]
    if missing:
        raise SystemExit(f"error: no such result folder: {', '.join(missing)}")
    rows, problems = [], []
    for run in RunFolder.find(*roots):
        cfg = {f"cfg.{k}": v for k, v in _config(run).items()}
        if run.finished:
            row = run.metrics()
            row.update(cfg)
            row["path"] = str(run.path)
            rows.append(row)
        else:
            info = run.failure() or {}
            status = "failed" if info else {"running": "running", "killed": "killed"}.get(lock_state(run.path),
                                                                                           "unfinished")
            problems.append({"path": str(run.path), "status": status,
                             "error": info.get("error", ""), "message": info.get("message", ""), **cfg})
    return _derive(pd.DataFrame(rows)), pd.DataFrame(problems)


def collect_wandb(path: str, group: str | None = None, api=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(finished, problems)`` from a W&B project ``entity/project``, with the columns of ``collect_local``:
    each run's summary is its metrics.json and its config the flattened job config (``cfg.`` prefixed)."""
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {"group": group} if group else None
    rows, problems = [], []
    for run in api.runs(path, filters=filters):
        cfg = {f"cfg.{k}": v for k, v in dict(run.config).items() if not k.startswith("env_")}
        raw = getattr(run.summary, "_json_dict", None) or dict(run.summary)
        summary = {k: v for k, v in raw.items() if not k.startswith("_")}
        if run.state == "finished" and summary.get("status") == "complete":
            rows.append({**summary, **cfg, "path": f"wandb:{path}/{run.id}"})
        else:
            problems.append({"path": f"wandb:{path}/{run.id}", "status": run.state, "error": "", "message": "", **cfg})
    return _derive(pd.DataFrame(rows)), pd.DataFrame(problems)


def per_sample_from_wandb(path: str, api=None) -> dict | None:
    """A run's ``per_sample.json`` rebuilt from W&B (``path`` = ``wandb:<entity>/<project>/<run id>``, as
    ``collect_wandb`` names runs): its ``ppl_windows`` and ``zeroshot_docs`` tables. None when the run has none."""
    if api is None:
        import wandb

        api = wandb.Api()
    project, run_id = path[len("wandb:"):].rsplit("/", 1)
    tables = {}
    for key in ("ppl_windows", "zeroshot_docs"):
        try:
            tables[key] = api.artifact(f"{project}/run-{run_id}-{key}:latest").get(key).get_dataframe()
        except Exception:  # a run logged before these tables existed, or without zero-shot tasks
            tables[key] = None
    if tables["ppl_windows"] is None:
        return None
    out = {"ppl": {"window_nll": tables["ppl_windows"].sort_values("window")["nll"].tolist()}, "zeroshot": {}}
    docs = tables["zeroshot_docs"]
    for task, g in ([] if docs is None else docs.groupby("task", sort=True)):
        out["zeroshot"][task] = {"doc_id": g["doc_id"].tolist(),
                                 **{m: g[m].tolist() for m in ("acc", "acc_norm") if m in g and g[m].notna().all()}}
    return out


def collect(*roots: str | Path, wandb_path: str | None = None, group: str | None = None, quiet: bool = False):
    """Local roots and/or a W&B project; prints the failed and unfinished jobs to stderr unless ``quiet``."""
    parts = [collect_local(*roots)] if roots else []
    if wandb_path:
        parts.append(collect_wandb(wandb_path, group))
    if not parts:
        raise SystemExit("error: give result folders, or --wandb entity/project")
    finished = pd.concat([p[0] for p in parts], ignore_index=True)
    problems = pd.concat([p[1] for p in parts], ignore_index=True)
    if not quiet and not problems.empty:
        print(f"warning: {len(problems)} job(s) without results:", file=sys.stderr)
        for _, p in problems.iterrows():
            print(f"  {p['status']:10s} {p['path']}  {p['error']} {p['message'][:200]}".rstrip(), file=sys.stderr)
    return finished, problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="*")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of (or besides) folders")
    ap.add_argument("--group", help="with --wandb: only this group (experiment)")
    ap.add_argument("--csv", help="write the table here")
    a = ap.parse_args(argv)
    df, _ = collect(*a.roots, wandb_path=a.wandb, group=a.group)
    if df.empty:
        raise SystemExit("error: no finished job found")
    if a.csv:
        df.to_csv(a.csv, index=False)
    cols = [c for c in ("experiment", "model", "method", "variant", "ratio", "ppl_wikitext2", "acc_avg", "path")
            if c in df]
    print(df[cols].to_string(index=False))


if __name__ == "__main__":
    main()
