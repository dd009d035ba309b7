"""Every generated table and figure, rebuilt from the committed results (``results/``) and benchmark CSVs
(``docs/bench/``) without loading a model:

    python -m analysis.paper                  # docs/<table>.md and .tex, docs/figures/*.png, README blocks
    python -m analysis.paper --out /tmp/x     # the same files under another folder (the test compares them)

A table or block whose results folder is missing or empty, or holds a run made from a tree with uncommitted changes,
stops the rebuild with one sentence naming the folder: nothing published may rest on a run no commit rebuilds. Each
table ends with where its runs came from (device, dtype, threads, commits), from the runs' ``env_*`` keys. README
blocks lie between the markers ``<!-- generated: <name> -->`` and ``<!-- end generated: <name> -->``; nothing between
them is typed by hand.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.bench_table import (
    Quote,
    bench_table,
    model_table,
    quoted_table,
    scale_table,
    targets_table,
    threads_table,
)
from analysis.collect import collect_local
from analysis.report import (
    above_chance_tasks,
    add_paired_intervals,
    cache_table,
    chance_table,
    format_table,
    heal_table,
    long_table,
    paper_table,
    per_sample,
    row_interval,
)
from rap.harness.results import RunFolder

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "docs" / "bench"
HEALING = ("main_table", "heal")  # the training-free cells are the main table's
ABLATION = ("main_table_quick", "kvlatent_ablation")  # the baseline and RAP at eval=quick, as the ablation
RECIPES = ("main_table_quick", "baseline_recipes")  # each recipe's variants beside the options it chose between
VALUE_PATH = ("main_table_quick", "rap_value_path")  # RAP's joint value latent beside the per-head one and V channels
V_REFIT = ("main_table_quick", "rap_v_refit")  # RAP with W_o refit on the kept V channels beside plain RAP
HEAL_C4 = ("main_table", "heal", "heal_c4")  # RAP calibrated and healed on c4 beside the same on wiki
KVLATENT = "KV-Latent (strided dims, frequency-aware RoPE)"  # its published recipe
HEALED_RAP = "RAP (key_energy) + healed (layerwise, wiki)"
COMPACT = ["variant", "ratio", "ppl", "ppl x [95% CI]", "acc>chance", "Δacc>chance [95% CI]", "KV", "attn params",
           "attn FLOPs", "decode FLOPs"]


@dataclass(frozen=True)
class Table:
    """One generated table: the runs of ``results/<source>`` (a folder, or a tuple of folders read together) drawn by
    ``kind``, written to ``docs/<name>.md`` (and ``.tex``)."""

    name: str
    source: str | tuple
    kind: str = "paper"  # paper (per-task columns) | against (paired with a variant) | heal | design | cache | long
    against: tuple = ()  # (column, value) pairs for kind=against
    match: tuple = ("ratio",)


TABLES = (
    Table("main_table", "main_table"),
    Table("main_table_vs_rap", "main_table", "against", (("variant", "RAP (key_energy)"),)),
    Table("gemma3_270m", "gemma3_270m"),
    Table("healing_table", HEALING, "heal"),
    Table("kvlatent_ablation", ABLATION, "design"),
    Table("healing_vs_rap", "heal", "against", (("variant", HEALED_RAP),)),
    Table("criteria_ablation", "criteria_ablation"),
    Table("criteria_vs_key_energy", "criteria_ablation", "against", (("variant", "RAP (key_energy)"),)),
    Table("baseline_recipes", RECIPES),
    Table("kv_quant", "kv_quant", "cache"),
    Table("long_context", "long_context", "long"),
    Table("long_context_vs_rap", "long_context", "against", (("variant", "RAP (key_energy)"),)),
)
# results folder -> {figure: file stem}; the methods' frequency maps are apart from the criteria's kept_frequency_r*
FIGURES = {"main_table": {"ratio_curves": "ratio_curves", "pareto": "pareto", "kept_frequency": "method_frequency"},
           "criteria_ablation": {"criteria_ablation": "criteria_ablation", "kept_frequency": "kept_frequency"}}
BENCH = {"bench/grid_r0.3": ("bench/grid.csv", 0.3)}  # docs/<name>.md <- (docs/<csv>, ratio)
TARGETS = {"decode": 0.72, "prefill": 0.78}  # RAP 0.3's attention time against rap-full (docs/benchmark.md)
BIG = ("llama3-8b", "mistral-7b", "qwen2.5-7b")
DEC, PRE = {"mode": "decode"}, {"mode": "prefill"}
# The cells that docs/benchmark.md's prose cites from the CPU grid (docs/bench/grid.csv).
GRID_QUOTES = (
    Quote("Llama-3-8B, decode 8192, batch 1, dynamic", "rap-r0.3",
          {"shape": "llama3-8b", **DEC, "length": 8192, "batch": 1, "cache": "dynamic"}),
    Quote("Mistral-7B, decode 4096, batch 1, dynamic", "rap-r0.3",
          {"shape": "mistral-7b", **DEC, "length": 4096, "batch": 1, "cache": "dynamic"}),
    Quote("Mistral-7B, decode 4096-8192, batch 4", "rap-r0.3",
          {"shape": "mistral-7b", **DEC, "length": (4096, 8192), "batch": 4}),
    Quote("Mistral-7B, decode 8192, batch 1, static", "rap-r0.3",
          {"shape": "mistral-7b", **DEC, "length": 8192, "batch": 1, "cache": "static"}),
    Quote("Llama-3-8B, prefill 4096", "palu-r0.3", {"shape": "llama3-8b", **PRE, "length": 4096}),
    *(Quote(f"7-8B shapes, decode, {cache}", v, {"shape": BIG, **DEC, "cache": cache})
      for v in ("palu-r0.3", "elitekv-r0.3") for cache in ("dynamic", "static")),
    *(Quote(f"Llama-3-8B, decode 2048, batch 4, {cache}", v,
            {"shape": "llama3-8b", **DEC, "length": 2048, "batch": 4, "cache": cache})
      for v in ("palu-r0.3", "rap-full") for cache in ("dynamic", "static")),
    *(Quote(f"SmolLM2, prefill {lengths}", v, {"shape": "smollm2-135m", **PRE, "length": n})
      for lengths, n in (("256", 256), ("512-4096", (512, 1024, 2048, 4096))) for v in ("rap-r0.3", "rap-r0.3-round8")),
)
# The cells that the GPU prose cites: (csv under docs/bench, quotes).
GPU_QUOTES = (
    ("gpu_h100_decode_fused.csv", (
        Quote("decode, dynamic, round_to 1", "rap-r0.3", {"cache": "dynamic"}),
        Quote("decode, dynamic, batch 4-16", "rap-r0.3-round8", {"cache": "dynamic", "batch": (4, 16)}),
        Quote("decode 32768, batch 1, dynamic", "rap-r0.3-round8", {"length": 32768, "batch": 1, "cache": "dynamic"}),
        Quote("decode 32768, batch 16, dynamic", "rap-r0.3-round8", {"length": 32768, "batch": 16, "cache": "dynamic"}),
        Quote("decode 8192, batch 1, dynamic", "rap-r0.3-round8", {"length": 8192, "batch": 1, "cache": "dynamic"}),
        Quote("decode, static", "rap-r0.3-round8", {"cache": "static"}),
        Quote("decode, static", "rap-r0.5-round8", {"cache": "static"}),
        Quote("decode, dynamic (stock against rap-full)", "stock", {"cache": "dynamic"}),
        Quote("decode, static (stock against rap-full)", "stock", {"cache": "static"}))),
    ("gpu_h100_grid_matmul_decode.csv", (
        Quote("prefill, round_to 1", "rap-r0.3", PRE),
        Quote("prefill 8192-32768", "rap-r0.3-round8", {**PRE, "length": (8192, 32768)}),
        *(Quote(f"prefill {n}", v, {**PRE, "length": n}) for v in ("palu-r0.3", "elitekv-r0.3") for n in (8192, 32768)),
        Quote("decode, matmul path (stock against rap-full)", "stock", DEC))),
)


def gpu_quotes(_df=None) -> str:
    """The GPU prose's cited cells, from both H100 CSVs, one table with the CSV named per row."""
    frames = [quoted_table(BENCH_DIR / csv, quotes).assign(csv=csv) for csv, quotes in GPU_QUOTES]
    return markdown(pd.concat(frames, ignore_index=True))


def qk_norm_error(_df=None) -> str:
    """``docs/qk_norm_error.csv`` (``experiments/qk_norm_error.py``): the mean relative error of ``kept`` mode's
    normalised queries and keys against ``exact``'s, per ratio and layer kind, with and without the correction."""
    d = pd.read_csv(REPO / "docs" / "qk_norm_error.csv")
    mean = d.groupby(["ratio", "kind"], sort=True)[["kept_q", "kept_k", "kept_rho1_q", "kept_rho1_k"]].mean()
    rows = [{"ratio": f"{ratio:.1f}", "layers": f"{kind} ({int((d['ratio'].eq(ratio) & d['kind'].eq(kind)).sum())})",
             "queries, corrected": f"{r.kept_q:.1%}", "keys, corrected": f"{r.kept_k:.1%}",
             "queries, uncorrected": f"{r.kept_rho1_q:.1%}", "keys, uncorrected": f"{r.kept_rho1_k:.1%}"}
            for (ratio, kind), r in mean.iterrows()]
    return markdown(pd.DataFrame(rows))


def in_job_latency(df: pd.DataFrame) -> str:
    """The range of the in-job attention latency ratios (compressed against uncompressed, timed at other moments in
    the same job) over the committed runs of each folder: why the quality tables leave them out."""
    rows = []
    for experiment, g in df[df["method"] != "none"].groupby("experiment"):
        row = {"results": experiment, "runs": str(len(g))}
        for name, key in (("decode", "latency_decode_attention_ms_ratio"),
                          ("prefill", "latency_prefill_attention_ms_ratio")):
            v = g[key].dropna() if key in g else pd.Series(dtype=float)
            row[f"{name} attention, to baseline"] = f"{v.min():.3f}-{v.max():.3f}" if len(v) else ""
        rows.append(row)
    return markdown(pd.DataFrame(rows))


def standard_sizing(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per compressed run, the fraction of documents it scores differently from the baseline (over the tasks both
    scored) and the half-width of the 95% average-accuracy interval that gives (``detectable_difference``)."""
    from rap.stats import detectable_difference

    base = df[df["method"] == "none"]
    base_docs = per_sample(base.iloc[0]["path"])["zeroshot"]
    rows = []
    for _, r in df[df["method"] != "none"].sort_values(["ratio", "variant"]).iterrows():
        zs = per_sample(r["path"])["zeroshot"]
        flips = [a != b for t in base_docs for a, b in zip(base_docs[t]["acc"], zs[t]["acc"])]
        discordance = sum(flips) / len(flips)
        per_task = len(flips) // len(base_docs)
        half = 100 * detectable_difference(discordance, per_task, len(base_docs))
        rows.append({"variant": r["variant"], "ratio": f"{r['ratio']:.2f}", "documents differing": f"{discordance:.1%}",
                     "half-width (points)": f"{half:.1f}"})
    return markdown(pd.DataFrame(rows)), df


def standard_wall_time(df: pd.DataFrame) -> str:
    """Each run's wall time and its largest phases (``time_*_s``), and the compressed runs' total."""
    rows = []
    compressed = df[df["method"] != "none"]
    for _, r in df.sort_values(["ratio", "variant"]).iterrows():
        phases = {f"{p} s": f"{r.get(f'time_{p}_s', float('nan')):.0f}" for p in ("compress", "ppl", "zeroshot")}
        rows.append({"variant": r["variant"], "ratio": f"{r['ratio']:.2f}", "wall s": f"{r['wall_time_s']:.0f}",
                     **phases})
    rows.append({"variant": f"all {len(compressed)} compressed runs", "ratio": "",
                 "wall s": f"{compressed['wall_time_s'].sum():.0f} ({compressed['wall_time_s'].sum() / 3600:.1f} h)",
                 "compress s": "", "ppl s": "", "zeroshot s": ""})
    return markdown(pd.DataFrame(rows))


def default_job(df: pd.DataFrame) -> str:
    """What the default job (``python run.py``) measured, from its committed run."""
    (_, r), = df.iterrows()
    rows = [("WikiText-2 perplexity", f"{r['ppl_wikitext2']:.2f}"),
            ("average zero-shot acc / acc_norm", f"{r['acc_avg']:.3f} / {r['acc_norm_avg']:.3f}"),
            ("KV bytes per token", f"{r['kv_bytes_per_token']:,.0f}"),
            ("parameters (attention)", f"{r['params_total'] / 1e6:.1f}M ({r['params_attention'] / 1e6:.1f}M)"),
            (f"decode FLOPs per token at context {r['cfg.eval.measure.context_len']} (attention)",
             f"{r['flops_decode'] / 1e6:.1f}M ({r['flops_decode_attention'] / 1e6:.1f}M)"),
            (f"prefill of {r['cfg.eval.measure.context_len']} tokens", f"{r['latency_prefill_ms'] / 1000:.1f} s"),
            ("decode", f"{r['latency_decode_ms']:.0f} ms/token"),
            ("the whole job", f"{r['wall_time_s']:.0f} s")]
    return markdown(pd.DataFrame(rows, columns=["measure", "value"]))


def test_durations(_df=None) -> str:
    """``docs/bench/test_durations.txt`` (``scripts/test_durations.sh``): the full suite's 20 slowest tests and its
    closing line, as measured."""
    path = BENCH_DIR / "test_durations.txt"
    if not path.exists():
        raise SourceError(f"{path} is missing; run bash scripts/test_durations.sh on an idle machine.")
    lines = path.read_text().splitlines()
    head = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if line.startswith(("commit ", "cores "))}
    rows = [{"seconds": line.split("s ", 1)[0], "phase": line.split()[1], "test": line.split()[2]}
            for line in lines if re.match(r"^[0-9.]+s (call|setup|teardown) ", line)]
    total = next((line.strip("= ") for line in lines if " passed" in line), "")
    return (markdown(pd.DataFrame(rows)) + f"\n\nThe whole suite: {total}; commit {head.get('commit', '?')}, "
            f"{head.get('cores', '?')} cores, `pytest -n 2`.")


def bench_recipes(_df=None) -> str:
    """Each method's options in the latency benchmark (``Method.bench_options``: data-free, the real shapes) beside
    its default recipe in the quality tables (``conf/method``), so no row of one is read as the other."""
    from omegaconf import OmegaConf

    from rap.methods import METHODS

    words = lambda opts: ", ".join(f"{k}={v}" for k, v in opts.items()) or "(its defaults)"  # noqa: E731
    rows = []
    for name, method in METHODS.items():
        conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml"))
        quality = {k: v for k, v in conf.items() if k not in ("name", "tag") and not isinstance(v, list)}
        bench = {k: v for k, v in (method.bench_options(64, 1) or {}).items() if k != "round_to"}
        rows.append({"method": name, "benchmark": words(bench), "quality tables (conf/method)": words(quality)})
    return markdown(pd.DataFrame(rows))


def kvzap_r2(_df=None) -> str:
    """Each committed KVzap surrogate (``surrogates/*.safetensors``): what it was fitted for and its held-out R² per
    layer (the mean, the range and every layer)."""
    from rap.presses.surrogates import load_surrogate

    files = sorted((REPO / "surrogates").glob("*.safetensors"))
    if not files:
        raise SourceError(f"{REPO / 'surrogates'} holds no KVzap surrogate; fit one with python -m "
                          "rap.harness.train_kvzap.")
    rows = []
    for f in files:
        s = load_surrogate(f)
        r2, meta = s["r2"], s["fitted_for"]
        if meta.get("env_git_dirty") is not False:
            raise SourceError(f"{f} was not fitted from a clean commit (env_git_dirty={meta.get('env_git_dirty')}); "
                              "refit it with python -m rap.harness.train_kvzap from a clean checkout.")
        plan = meta.get("plan")
        rows.append({"file": f.name, "commit": str(meta.get("env_git_commit"))[:7], "model": meta.get("model"),
                     "plan": "none" if not plan else f"{plan['method']} {plan['ratio']}",
                     "texts": f"{meta.get('texts')} × {meta.get('seqlen')} ({meta.get('held_out')} held out)",
                     "mean R²": f"{sum(r2) / len(r2):.3f}", "range": f"{min(r2):.3f}-{max(r2):.3f}",
                     "per layer": " ".join(f"{r:.2f}" for r in r2),
                     "mean R² of the surrogate compared": (f"{meta.get('compare')}: "
                                                           f"{sum(s['r2_other']) / len(s['r2_other']):.3f}"
                                                           if "r2_other" in s else "")})
    return markdown(pd.DataFrame(rows))


def coverage(_df=None) -> str:
    """The perplexity interval's coverage by simulation (``analysis.coverage``), over the committed main table."""
    from analysis.coverage import coverage_table

    table = coverage_table(REPO / "results")
    table["coverage"] = table["coverage"].map("{:.3f}".format)
    committed = table["dependence"].str.startswith("committed")
    table["worst"] = [f"{w:.3f}" if c else "" for w, c in zip(table["worst"], committed)]
    return markdown(table)


def value_path_error(_df=None) -> str:
    """``docs/value_path_error.csv`` (``experiments/value_path_error.py``): per ratio and value path, the relative
    error of the values on held-out text, the mean over layers and its range."""
    d = pd.read_csv(REPO / "docs" / "value_path_error.csv")
    rows = [{"ratio": f"{ratio:.1f}", "value path": path, "layers": str(len(g)),
             "mean error": f"{g['relative_error'].mean():.3f}",
             "range": f"{g['relative_error'].min():.3f}-{g['relative_error'].max():.3f}"}
            for (ratio, path), g in d.groupby(["ratio", "v_path"], sort=False)]
    return markdown(pd.DataFrame(rows))


# Generated blocks inside hand-written pages: (page, block name) -> (results source or None, builder). A builder
# returns the block's text, or its text and the runs it read (its provenance line covers those, else every run).
BLOCKS = {
    ("README.md", "main_table"): ("main_table", lambda df: compact(df)),
    ("docs/architectures.md", "gemma3_270m"): ("gemma3_270m", lambda df: compact(df)),
    ("docs/architectures.md", "gemma3_270m_vs_rap"):
        ("gemma3_270m", lambda df: against_block(df, "RAP (key_energy, QK-norm exact)")),
    ("docs/architectures.md", "qk_norm_error"): (None, qk_norm_error),
    ("docs/results.md", "criteria_ablation"): ("criteria_ablation", lambda df: compact(df)),
    ("docs/results.md", "baseline_recipes"): (RECIPES, lambda df: compact(df)),
    ("docs/results.md", "long_context"): ("long_context", lambda df: long_per_length(df)),
    ("docs/results.md", "rap_value_path"): (VALUE_PATH, lambda df: against_rows(
        df, df["experiment"].eq("rap_value_path"),
        (({"variant": "RAP (key_energy, low-rank V)"}, ("ratio",)), ({"variant": "RAP (key_energy)"}, ("ratio",))))),
    ("docs/results.md", "rap_v_refit"): (V_REFIT, lambda df: against_rows(
        df, df["experiment"].eq("rap_v_refit"), (({"variant": "RAP (key_energy)"}, ("ratio",)),))),
    ("docs/results.md", "value_path_error"): (None, value_path_error),
    ("docs/results.md", "chance_main_table"): ("main_table", lambda df: markdown(chance_table(df))),
    ("docs/architectures.md", "chance_gemma3_270m"): ("gemma3_270m", lambda df: markdown(chance_table(df))),
    ("docs/usage.md", "coverage"): (None, coverage),
    ("docs/usage.md", "test_durations"): (None, test_durations),
    ("docs/presses.md", "kvzap_r2"): (None, kvzap_r2),
    ("docs/usage.md", "standard_sizing"): ("main_table", standard_sizing),
    ("docs/usage.md", "standard_wall_time"): ("main_table", standard_wall_time),
    ("docs/usage.md", "default_job"): ("default", default_job),
    ("docs/benchmark.md", "bench_recipes"): (None, bench_recipes),
    ("docs/benchmark.md", "in_job_latency"): (("main_table", "criteria_ablation"), in_job_latency),
    ("docs/healing.md", "heal_c4"): (HEAL_C4, lambda df: against_rows(
        df, df["experiment"].eq("heal_c4"), (({"variant": HEALED_RAP}, ("ratio",)),
                                             ({"variant": "RAP (key_energy)"}, ("ratio",))))),
    ("docs/scale.md", "scale"):
        (None, lambda _: markdown(scale_table(BENCH_DIR / "scale_llama3-8b.csv", BENCH_DIR / "scale_big.csv"))),
    ("docs/scale.md", "scale_threads"): (None, lambda _: markdown(threads_table(BENCH_DIR / "scale_threads.csv"))),
    ("docs/benchmark.md", "model_smollm2"): (None, lambda _: markdown(model_table(BENCH_DIR / "model_smollm2.csv"))),
    ("docs/benchmark.md", "targets"): (None, lambda _: markdown(targets_table(BENCH_DIR / "targets.csv", TARGETS))),
    ("docs/benchmark.md", "grid_quotes"): (None, lambda _: markdown(quoted_table(BENCH_DIR / "grid.csv", GRID_QUOTES))),
    ("docs/benchmark.md", "gpu_quotes"): (None, gpu_quotes),
    ("docs/bench/gpu_h100.md", "gpu_quotes"): (None, gpu_quotes),
    ("docs/bench/gpu_h100.md", "decode"):
        (None, lambda _: markdown(bench_table(BENCH_DIR / "gpu_h100_decode_fused.csv", (0.3, 0.5)))),
    # that file's decode rows predate the fused decode kernel: only its prefill rows are current code
    ("docs/bench/gpu_h100.md", "prefill"):
        (None, lambda _: markdown(bench_table(BENCH_DIR / "gpu_h100_grid_matmul_decode.csv", 0.3, ("prefill",)))),
}
# Page blocks that repeat a whole table of TABLES (its Markdown and provenance line): (page, block name) -> table name.
TABLE_BLOCKS = {("README.md", "main_table_vs_rap"): "main_table_vs_rap",
                ("docs/healing.md", "healing_table"): "healing_table",
                ("docs/results.md", "kvlatent_ablation"): "kvlatent_ablation",
                ("docs/healing.md", "healing_vs_rap"): "healing_vs_rap",
                ("docs/results.md", "criteria_vs_key_energy"): "criteria_vs_key_energy",
                ("docs/results.md", "kv_quant"): "kv_quant",
                ("docs/results.md", "long_context_vs_rap"): "long_context_vs_rap"}


def markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def provenance(df: pd.DataFrame) -> str:
    """Where the runs came from and what they were scored on, in one line, from their env and eval keys."""
    def values(col, fmt=str):
        if col not in df:
            return "unrecorded"
        counts = sorted(df[col].astype(str).map(fmt).value_counts().items())
        if len(counts) == 1:
            return counts[0][0]
        return ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts)

    def count(col, fmt=lambda v: str(int(float(v)))):
        return values(col, fmt) if col in df and df[col].notna().all() else None

    chosen = values("ppl_window_choice") if "ppl_window_choice" in df and df["ppl_window_choice"].notna().all() \
        else "the first"  # runs from before the choice read the first windows
    samples = [f"{count('ppl_windows')} windows of {count('ppl_seqlen')} tokens, {chosen}"] if count("ppl_windows") \
        else []
    samples += [f"{count('zs_limit')} documents per task"] if count("zs_limit") else []
    samples += [f"{count('ruler_limit')} documents per RULER task and length"] if count("ruler_limit") else []
    dirty = int(df["env_git_dirty"].astype(str).eq("True").sum()) if "env_git_dirty" in df else 0
    bases = df[df["method"] == "none"] if "method" in df else df.iloc[:0]
    above = sorted({f"{r['model']}, {r['eval_profile']}: "
                    f"{', '.join(above_chance_tasks(per_sample(r['path']))) or 'none'}"
                    for _, r in bases.iterrows() if (per_sample(r["path"]) or {}).get("zeroshot")})
    samples += [f"acc>chance over the tasks whose baseline is above chance ({'; '.join(above)})"] if above else []
    return (f"{len(df)} runs; eval {values('eval_profile')}" + (f" ({', '.join(samples)})" if samples else "")
            + f"; device {values('env_device_name')}; dtype {values('env_dtype')}; threads "
            f"{values('env_threads')}; commit {values('env_git_commit', lambda c: c[:7])}"
            + (f"; {dirty} with uncommitted changes" if dirty else "") + ".")


def compact(df: pd.DataFrame, **pairing) -> str:
    """The README's columns of the paper table (no model or method columns, no per-task or latency columns)."""
    return format_table(paper_table(df, tasks=False, **pairing), columns=COMPACT)


def against_table(df: pd.DataFrame, against: dict, match: tuple) -> pd.DataFrame:
    """Each run's perplexity ratio, and its accuracy and long-context score differences where the runs have them,
    against the ``against`` run (e.g. RAP) at its ratio."""
    paired = add_paired_intervals(df, against, match).dropna(subset=["reference_path"])
    columns = {"ppl x [95% CI]": ("ppl_ratio", ".3f"), "Δacc [95% CI]": ("acc_diff", "+.3f"),
               "Δacc>chance [95% CI]": ("acc_above_diff", "+.3f"), "Δlong [95% CI]": ("long_diff", "+.3f")}
    columns = {name: c for name, c in columns.items() if paired[c[0]].notna().any()}
    rows = []
    for _, r in paired.sort_values(["ratio", "variant"]).iterrows():
        ref = df.loc[df["path"] == r["reference_path"], "variant"].iloc[0]
        rows.append({"variant": r["variant"], "against": ref, "ratio": f"{r['ratio']:.2f}",
                     **{name: row_interval(r, col, spec) for name, (col, spec) in columns.items()}})
    return pd.DataFrame(rows)


def against_rows(df: pd.DataFrame, runs: pd.Series, pairings: tuple) -> tuple[str, pd.DataFrame]:
    """The runs selected by ``runs`` (a mask of ``df``) paired against each reference of ``pairings`` ((against,
    match) as ``against_table`` takes them), with each run's perplexity, compression (and heal) time, KV bytes and
    attention decode FLOPs (ratios to the baseline) beside; and the runs the table reads, for its provenance."""
    own = {(r["variant"], f"{r['ratio']:.2f}"): r for _, r in df[runs].iterrows()}
    table = pd.concat([against_table(df, against, match) for against, match in pairings], ignore_index=True)
    table = table[[(v, r) in own for v, r in zip(table["variant"], table["ratio"])]]
    table = table.fillna("").replace("nan", "")  # a pairing without documents (perplexity-only runs) has no Δacc
    table = table.loc[:, [c for c in table if table[c].astype(str).str.strip().ne("").any()]]
    run = [own[(v, r)] for v, r in zip(table["variant"], table["ratio"])]
    # no compression or heal times: they were timed with other jobs beside them (docs/benchmark.md times alone)
    for i, (name, key, spec) in enumerate((("ppl", "ppl_wikitext2", ".2f"),
                                           ("KV", "kv_bytes_per_token_ratio", ".3f"),
                                           ("attn FLOPs", "flops_decode_attention_ratio", ".3f"))):
        table.insert(3 + i, name, [format(r[key], spec) for r in run])
    shown = set(zip(table["variant"], table["ratio"])) | set(zip(table["against"], table["ratio"]))
    used = [(v, f"{r:.2f}") in shown for v, r in zip(df["variant"], df["ratio"])]
    return markdown(table), df[used]


def long_per_length(df: pd.DataFrame) -> str:
    """The long-context table's per-length columns only: each length's average score over the tasks and its paired
    difference from the baseline."""
    table = long_table(df)
    return markdown(table[["method", "ratio", *(c for c in table if c.startswith(("avg@", "Δ@")))]])


def design_table(df: pd.DataFrame, rap: str = "RAP (key_energy)") -> pd.DataFrame:
    """KV-Latent's design choices (``+experiment=kvlatent_ablation``): each combination of its RoPE frequencies and
    softmax scale, paired against the baseline and against RAP at the same ratio, on the same windows."""
    base = add_paired_intervals(df)
    vs_rap = add_paired_intervals(df, {"variant": rap}, ("ratio",))
    vs_recipe = add_paired_intervals(df, {"variant": KVLATENT}, ("ratio",))
    rows = []
    for i, r in base[base["experiment"] == "kvlatent_ablation"].sort_values(["ratio", "variant"]).iterrows():
        rows.append({"variant": r["variant"], "ratio": f"{r['ratio']:.2f}",
                     "frequencies": "each pair's own" if r.get("cfg.method.rope") == "original" else "new (published)",
                     "softmax scale":
                         "original" if r.get("cfg.method.scale") == "original" else "1/sqrt(d') (published)",
                     "ppl": f"{r['ppl_wikitext2']:.2f}", "ppl x baseline [95% CI]": row_interval(r, "ppl_ratio", ".3f"),
                     "ppl x published recipe [95% CI]": row_interval(vs_recipe.loc[i], "ppl_ratio", ".3f"),
                     f"ppl x {rap} [95% CI]": row_interval(vs_rap.loc[i], "ppl_ratio", ".3f")})
    return pd.DataFrame(rows)


KINDS = {"heal": heal_table, "design": design_table, "cache": cache_table, "long": long_table}


def table_text(t: Table, df: pd.DataFrame) -> dict[str, str]:
    """``{"md": ..., "tex": ...}`` for one table, each ending with its provenance line."""
    if t.kind != "paper":
        frame = against_table(df, dict(t.against), t.match) if t.kind == "against" else KINDS[t.kind](df)
        md, tex = markdown(frame), frame.to_latex(index=False)
    else:
        table = paper_table(df)
        md, tex = format_table(table), format_table(table, "latex")
    line = provenance(df)
    return {"md": f"{md}\n\n{line}\n", "tex": f"{tex}\n% {line}\n"}


class SourceError(SystemExit):
    """A table's results cannot be published: a folder is missing or empty, or a run in it is from a dirty tree."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def runs(results: Path, source: str | tuple) -> pd.DataFrame:
    """The finished runs of one results folder, or of several read together. A missing or empty folder, or a run
    made from a tree with uncommitted changes, ends the rebuild (``SourceError``)."""
    folders = [results / f for f in ((source,) if isinstance(source, str) else source)]
    for folder in folders:
        if not folder.is_dir() or not RunFolder.find(folder, finished=True):
            raise SourceError(f"{folder} holds no finished run, and the docs are rebuilt from it; restore it "
                              "(git checkout -- results) or rerun its preset.")
    df = collect_local(*folders)[0]
    dirty = df[df["env_git_dirty"].astype(str).eq("True")] if "env_git_dirty" in df else df.iloc[:0]
    if len(dirty):
        raise SourceError(f"{len(dirty)} run(s) in {', '.join(str(f) for f in folders)} were made from a tree with "
                          f"uncommitted changes ({', '.join(Path(p).name for p in dirty['path'])}); rerun them from a "
                          "clean commit.")
    return with_replayed_heal_times(df, results)


def with_replayed_heal_times(df: pd.DataFrame, results: Path) -> pd.DataFrame:
    """A run that replayed a saved healed plan (``plan=<run>/plan.json``) did not train. Plans saved since
    ``heal_outcome`` existed carry the heal time into the replay; a replay of an older plan has no ``heal_time_s`` and
    gets that of the run that trained the plan, found by folder name under ``results/``."""
    if "cfg.plan" not in df:
        return df
    trainer = df["cfg.plan"].map(lambda p: Path(p).parent.name if isinstance(p, str) else None)
    names = set(trainer.dropna())
    times = {run.name: run.metrics().get("heal_time_s") for run in RunFolder.find(results, finished=True)
             if run.name in names}
    df = df.copy()
    own = df["heal_time_s"] if "heal_time_s" in df else pd.Series(float("nan"), index=df.index)
    df["heal_time_s"] = own.fillna(trainer.map(times))
    return df


def against_block(df: pd.DataFrame, variant: str) -> str:
    return markdown(against_table(df, {"variant": variant}, ("ratio",)))


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every generated block replaced by its new content."""
    for name, body in blocks.items():
        tag = re.escape(name)
        pattern = re.compile(rf"(<!-- generated: {tag} -->\n).*?(<!-- end generated: {tag} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"error: a page has no generated block '{name}'")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def build(results: Path, root: Path, figures: bool = True) -> list[Path]:
    """Write every table, figure and generated block whose inputs exist under ``root`` (the repository, or another
    folder); returns the files written."""
    docs = root / "docs"
    written, frames, table_md, drawn = [], {}, {}, {}

    def frame(source):  # each results source is read once
        if source not in frames:
            frames[source] = runs(results, source)
        return frames[source]

    for t in TABLES:
        df = frame(t.source)
        texts = table_text(t, df)
        table_md[t.name] = texts["md"].rstrip("\n")
        for ext, text in texts.items():
            path = docs / f"{t.name}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    for name, (csv, ratio) in BENCH.items():
        path = docs / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(bench_table(REPO / "docs" / csv, ratio)) + "\n")
        written.append(path)
    for page in sorted({page for page, _ in [*BLOCKS, *TABLE_BLOCKS]}):
        blocks = {name: table_md[table] for (where, name), table in TABLE_BLOCKS.items()
                  if where == page and table in table_md}
        for (where, name), (source, draw) in BLOCKS.items():
            if where != page:
                continue
            df = frame(source) if source else None
            if (draw, source) not in drawn:  # a block on several pages is drawn once
                out = draw(df)
                text, used = out if isinstance(out, tuple) else (out, df)  # used: the runs it read
                drawn[draw, source] = text + ("" if used is None else f"\n\n{provenance(used)}")
            blocks[name] = drawn[draw, source]
        path = root / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill_blocks((REPO / page).read_text(), blocks))
        written.append(path)
    if figures:
        from analysis.figures import all_figures, latency_decode, latency_prefill, save

        for source, stems in FIGURES.items():
            df = frames.get(source)
            if df is not None:
                figs = all_figures(df, only=tuple(stems))
                figs = {k.replace(name, stem, 1): v for k, v in figs.items()
                        for name, stem in stems.items() if k.startswith(name)}
                written += save(figs, docs / "figures", formats=("png",))
        grid = REPO / "docs" / "bench" / "grid.csv"
        written += save({"latency_decode": latency_decode(grid), "latency_prefill": latency_prefill(grid)},
                        docs / "figures", formats=("png",))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--out", help="write docs/ and README.md under this folder instead of the repository")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else REPO
    written = build(Path(a.results), out, not a.no_figures)
    print(f"[paper] wrote {len(written)} files under {out}")


if __name__ == "__main__":
    main()
