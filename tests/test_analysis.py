"""analysis.collect / report / figures on synthetic result folders (no model runs)."""
import json
import time

import numpy as np
import pytest
import yaml

from analysis import collect as collect_module
from analysis import figures, report

TASKS = ("piqa", "arc_easy")


def make_run(root, name, method, ratio, ppl, acc_shift=0.0, criterion="key_energy", kv=100.0, nll_shift=0.0,
             head_dim=8, layers=2, extra=None, seed=0):
    """A finished job folder as run_job writes it, with per-document scores drawn around the baseline's."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"model": {"name": "m"}, "method": {"name": method, "tag": method if method != "rap" else f"rap-{criterion}"},
           "criterion": {"name": criterion}, "ratio": ratio, "seed": 0, "sweep": root.name}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rng = np.random.default_rng(seed)
    base_rng = np.random.default_rng(123)  # the same documents' baseline scores in every run
    zs = {}
    for t in TASKS:
        base = (base_rng.random(200) < 0.5).astype(float)
        flip = rng.random(200) < abs(acc_shift)
        acc = np.where(flip, 1.0 if acc_shift > 0 else 0.0, base)
        zs[t] = {"doc_id": list(range(200)), "acc": acc.tolist()}
    window = 3.0 + base_rng.normal(0, 0.1, 6) + nll_shift + rng.normal(0, 0.001, 6)
    (d / "per_sample.json").write_text(json.dumps({"ppl": {"window_nll": window.tolist(), "seqlen": 64},
                                                   "zeroshot": zs}))
    m = {"model": "m", "method": method, "ratio": ratio, "eval_profile": "quick", "seed": 0, "status": "complete",
         "ppl_wikitext2": ppl, "acc_avg": float(np.mean([np.mean(z["acc"]) for z in zs.values()])),
         "kv_bytes_per_token": kv, "kv_bytes_per_token_ratio": kv / 100.0, "env_torch": "2.13.0", **(extra or {})}
    m.update({f"acc_{t}": float(np.mean(z["acc"])) for t, z in zs.items()})
    (d / "metrics.json").write_text(json.dumps(m))
    if method == "rap":
        kept = max(1, round((1 - ratio) * head_dim / 2))
        pairs = list(range(kept)) if criterion == "key_energy" else list(range(head_dim // 2 - kept, head_dim // 2))
        plan = {"method": "rap", "head_dim": head_dim,
                "layers": [{"k_channels": [pairs + [p + head_dim // 2 for p in pairs]]} for _ in range(layers)]}
        (d / "plan.json").write_text(json.dumps(plan))
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "main_table"
    make_run(root, "base", "none", 0.0, 20.0, kv=100.0)
    make_run(root, "rap2", "rap", 0.2, 24.0, acc_shift=-0.1, kv=80.0, nll_shift=0.18, seed=1)
    make_run(root, "palu2", "palu", 0.2, 22.0, acc_shift=0.0, kv=80.0, nll_shift=0.1, seed=2)
    make_run(root, "rap3", "rap", 0.3, 30.0, acc_shift=-0.2, kv=70.0, nll_shift=0.4, seed=3)
    make_run(root, "rapw3", "rap", 0.3, 900.0, criterion="weight_norm", kv=70.0, nll_shift=3.8, seed=4)
    (root / "crashed").mkdir()
    (root / "crashed" / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "elitekv"}, "ratio": 0.2}))
    (root / "crashed" / "failure.json").write_text(json.dumps({"error": "RuntimeError", "message": "out of memory"}))
    (root / "running").mkdir()
    (root / "running" / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "elitekv"}, "ratio": 0.3}))
    return root


def test_collect_lists_failed_and_unfinished_jobs(sweep, capsys):
    df, problems = collect_module.collect(sweep)
    assert len(df) == 5 and set(df["method"]) == {"none", "rap", "palu"}
    assert dict(zip(problems["path"].map(lambda p: p.rsplit("/", 1)[-1]), problems["status"])) == {
        "crashed": "failed", "running": "unfinished"}
    err = capsys.readouterr().err
    assert "out of memory" in err and "unfinished" in err
    assert set(df["criterion"]) == {"-", "key_energy", "weight_norm"} and set(df["experiment"]) == {"main_table"}


def test_collect_from_wandb_has_the_local_columns(sweep):
    class Run:
        def __init__(self, rid, state, summary, config):
            self.id, self.state, self.summary, self.config = rid, state, summary, config

    class Api:
        def runs(self, path, filters=None):
            assert path == "me/rap" and filters == {"group": "main_table"}
            local = collect_module.collect_local(sweep)[0]
            out = []
            for i, row in local.iterrows():
                summary = {k: v for k, v in row.items()
                           if not k.startswith("cfg.")
                           and k not in ("path", "variant", "tag", "criterion", "experiment")}
                config = {k[4:]: v for k, v in row.items() if k.startswith("cfg.")}
                out.append(Run(f"r{i}", "finished", summary, config))
            return out + [Run("x", "crashed", {}, {"method.name": "elitekv"})]

    df, problems = collect_module.collect_wandb("me/rap", group="main_table", api=Api())
    local = collect_module.collect_local(sweep)[0]
    assert len(df) == len(local) and set(local.columns) - {"path"} <= set(df.columns)
    assert list(problems["status"]) == ["crashed"]


def test_per_sample_data_rebuilt_from_wandb_tables_pairs_as_the_files_do(sweep):
    """The per-sample tables a job logs to W&B (``rap.harness.tracking.per_sample_tables``) give back the same
    ``per_sample.json``, so a paired table can be rebuilt from W&B alone."""
    from rap.harness.tracking import per_sample_tables

    runs = {p.name: json.loads((p / "per_sample.json").read_text()) for p in sweep.iterdir()
            if (p / "per_sample.json").exists()}

    class Artifact:
        def __init__(self, frame):
            self.frame = frame

        def get(self, key):
            return self

        def get_dataframe(self):
            return self.frame

    class Api:
        def artifact(self, name):
            project, _, rest = name.rpartition("/run-")
            run_id, key = rest.removesuffix(":latest").split("-", 1)
            assert project == "me/rap"
            return Artifact(per_sample_tables(runs[run_id])[key])

    base, rap2 = (collect_module.per_sample_from_wandb(f"wandb:me/rap/{r}", api=Api()) for r in ("base", "rap2"))
    assert base["ppl"]["window_nll"] == runs["base"]["ppl"]["window_nll"]
    assert base["zeroshot"] == runs["base"]["zeroshot"]
    assert report.paired(base, rap2) == report.paired(runs["base"], runs["rap2"])


def test_paper_table_pairs_each_run_with_its_baseline(sweep):
    df, _ = collect_module.collect(sweep, quiet=True)
    t = report.paper_table(df)
    assert list(t["method"])[0] == "none" and list(t["ratio"]) == sorted(t["ratio"])
    rap2 = t[(t["method"] == "rap") & (t["ratio"] == 0.2)].iloc[0]
    assert rap2["ppl_ratio"] == pytest.approx(np.exp(0.18), rel=1e-2) and rap2["ppl_ratio_significant"] == 1.0
    assert rap2["acc_diff"] < 0 and rap2["acc_diff_low"] < rap2["acc_diff"] < rap2["acc_diff_high"]
    palu2 = t[t["method"] == "palu"].iloc[0]
    assert palu2["acc_diff"] == 0.0 and palu2["acc_diff_significant"] == 0.0
    assert np.isnan(t[t["method"] == "none"].iloc[0]["ppl_ratio"])


def test_heal_table_pairs_healed_runs_with_the_baseline_and_their_training_free_run(sweep):
    heal = sweep.parent / "heal"
    for name, ratio, shift, seed in (("rap2h", 0.2, 0.08, 5), ("rap3h", 0.3, 0.25, 6)):
        d = make_run(heal, name, "rap", ratio, 21.0, kv=80.0, nll_shift=shift, seed=seed, extra={"heal_time_s": 60.0})
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "heal": {"name": "layerwise", "source": "wiki"}}))
    df, _ = collect_module.collect(sweep, heal, quiet=True)
    assert set(df.loc[df["path"].str.endswith("h"), "heal"]) == {"layerwise"}
    assert set(df.loc[~df["path"].str.endswith("h"), "heal"]) == {"none"}
    t = report.heal_table(df)
    assert list(t["ratio"]) == ["0.20", "0.30"] and set(t["variant"]) == {"RAP (key_energy)"}  # one row per healed run
    row = t.iloc[0]
    est = float(row["healed / training-free [95% CI]"].split()[0])
    assert est == pytest.approx(np.exp(0.08 - 0.18), rel=1e-2)  # against RAP 0.2 training-free, not the baseline
    assert float(row["ppl x, healed [95% CI]"].split()[0]) == pytest.approx(np.exp(0.08), rel=1e-2)
    assert float(row["ppl x, training-free [95% CI]"].split()[0]) == pytest.approx(np.exp(0.18), rel=1e-2)
    assert row["ppl training-free"] == "24.00" and "heal time" not in row  # timed beside other jobs: not shown


def add_long(run_dir, scores: dict):
    """RULER per-document scores ({(task, length): [score per document]}) into a run's per_sample.json."""
    per = json.loads((run_dir / "per_sample.json").read_text())
    long = per.setdefault("long", {})
    for (task, length), sc in scores.items():
        cell = long.setdefault(task, {"doc_id": [], "length": [], "score": []})
        cell["doc_id"] += list(range(len(sc)))
        cell["length"] += [length] * len(sc)
        cell["score"] += sc
    (run_dir / "per_sample.json").write_text(json.dumps(per))


def test_long_table_pairs_each_task_and_length_with_the_baseline(tmp_path):
    root = tmp_path / "long_context"
    ones, some = [1.0] * 10, [1.0] * 6 + [0.0] * 4
    for name, method, ratio, scores in (
            ("base", "none", 0.0, {("niah", 1024): ones, ("niah", 4096): ones, ("vt", 1024): ones, ("vt", 4096): some}),
            ("rap", "rap", 0.3, {("niah", 1024): ones, ("niah", 4096): [0.0] * 10, ("vt", 1024): ones,
                                 ("vt", 4096): some})):
        d = make_run(root, name, method, ratio, 20.0, extra={"eval_profile": "long"})
        add_long(d, scores)
    df, _ = collect_module.collect(root, quiet=True)
    t = report.long_table(df).set_index("method")
    assert t.loc["none", "avg@4096"] == "0.800" and t.loc["rap", "avg@4096"] == "0.300"
    assert t.loc["rap", "niah@4096"] == "0.00" and t.loc["rap", "vt@4096"] == "0.60"
    assert t.loc["rap", "Δ@4096 [95% CI]"].startswith("-0.500") and t.loc["rap", "Δ@4096 [95% CI]"].endswith("*")
    # every document agrees at 1024: no difference, and an interval one discordant pair per task wide, not zero
    assert t.loc["rap", "Δ@1024 [95% CI]"] == "+0.000 [-0.157, +0.157]"


def test_cache_table_pairs_quantized_runs_with_the_full_precision_baseline(tmp_path):
    root = tmp_path / "kv_quant"

    def run(name, method, cache, nll_shift, kv, parts, seed, misses=0):
        tokens = 10
        extra = {"kv_cache": cache, "kv_bytes": kv * tokens, "kv_bytes_per_token_formula": kv, "ppl_mode": "cached",
                 **{f"kv_bytes_{p}": b * tokens for p, b in zip(("full", "packed", "scales"), parts)},
                 "ruler_niah_single_1_2048": 1 - misses / 20}
        d = make_run(root, name, method, 0.0 if method == "none" else 0.3, 20 * np.exp(nll_shift), kv=kv,
                     nll_shift=nll_shift, extra=extra, seed=seed)
        add_long(d, {("niah_single_1", 2048): [0.0] * misses + [1.0] * (20 - misses)})

    run("base_int4", "none", "hqq-int4-g16", 0.02, 20, (4, 10, 6), 1)  # listed before the fp baseline on purpose
    run("base", "none", "fp", 0.0, 100, (100, 0, 0), 0)
    run("rap_int4", "rap", "hqq-int4-g16", 0.3, 14, (3, 7, 4), 2, misses=8)
    df, _ = collect_module.collect(root, quiet=True)
    t = report.cache_table(df).set_index("cache")
    assert list(t.loc[["fp", "hqq-int4-g16"], "method"].values.ravel()) == ["none", "none", "rap"]
    quant_base = t[(t["method"] == "none")].loc["hqq-int4-g16"]
    assert quant_base["of fp baseline"] == "0.200" and quant_base["packed B/token"] == "10"
    assert quant_base["ppl x [95% CI]"].startswith("1.020")  # against fp, not itself
    rap = t[t["method"] == "rap"].iloc[0]
    assert rap["ppl x [95% CI]"].startswith("1.350") and rap["ppl x [95% CI]"].endswith("*")
    assert rap["Δ long [95% CI]"].startswith("-0.400") and rap["niah_single_1_2048"] == "0.600"
    assert t[t["method"] == "none"].loc["fp", "ppl x [95% CI]"] == ""


@pytest.mark.parametrize("fmt", ["md", "latex", "csv"])
def test_report_formats_mark_best_and_significant(sweep, capsys, fmt):
    report.main([str(sweep), "--format", fmt])
    out = capsys.readouterr().out
    if fmt == "csv":
        assert out.splitlines()[0].startswith("model,method,variant,ratio,ppl_wikitext2,ppl_ratio,ppl_ratio_low")
        return
    bold = "**22.00**" if fmt == "md" else "\\textbf{22.00}"
    assert bold in out  # palu has the best perplexity at ratio 0.2
    assert "]*" in out  # a significant interval
    lines = [line for line in out.splitlines() if "none" in line]
    assert lines and out.index(lines[0]) < out.index("palu")  # the baseline row comes first


def test_figures_are_written_without_running_a_model(sweep, tmp_path):
    out = tmp_path / "figs"
    figures.main([str(sweep), "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    for fig in ("ratio_curves", "pareto", "criteria_ablation", "kept_frequency_r0.3"):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names
    assert (out / "pareto.png").stat().st_size > 5000


def test_kept_pairs_counts_fractions_of_heads():
    plan = {"method": "rap", "head_dim": 8,
            "layers": [{"k_channels": [[0, 1, 4, 5], [0, 2, 4, 6]]}, {"k_channels": [[3, 7], [3, 6]]}]}
    grid = figures.kept_pairs(plan)
    assert grid.shape == (2, 4)
    assert grid[0].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert grid[1].tolist() == [0.0, 0.0, 0.25, 0.75]  # a RoPE-blind channel counts half a pair
    elite = {"method": "elitekv", "head_dim": 8, "layers": [{"elite_pairs": [[0, 3], [0, 1]]}]}
    assert figures.kept_pairs(elite)[0].tolist() == [1.0, 0.5, 0.0, 0.5]
    # KV-Latent at width 4 of 8: exponents [1, 3] sit at pairs 1*8/8 = 1 and 3*8/8 = 3 (none at the fastest, pair 0)
    latent = {"method": "kvlatent", "head_dim": 8, "rope_exponents": [1, 3], "layers": [{"qk_dims": [0, 2, 4, 6]}]}
    assert figures.kept_pairs(latent)[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # with its original frequencies the exponents are 2i over head_dim: the kept pairs themselves
    original = {**latent, "rope": "original", "rope_exponents": [0, 4]}
    assert figures.kept_pairs(original)[0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_figures_and_table_logged_to_an_offline_wandb_run(sweep, tmp_path, monkeypatch):
    from rap.harness.tracking import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "figs"
    figures.main([str(sweep), "--out", str(out), "--wandb", "--group", "main_table"])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    expected = {"ratio_curves", "pareto", "criteria_ablation", "report"}
    for _ in range(60):  # wandb's service process may still be writing the run log after finish() returns
        logged = read_offline_run(run_dir)["history_keys"]
        if expected <= logged:
            break
        time.sleep(0.5)
    assert expected <= logged


def test_pair_compares_two_runs_on_the_same_windows_and_refuses_others(tmp_path, capsys):
    import math

    from analysis.pair import main, pair

    def run(name, nll, acc, **extra):
        folder = tmp_path / name
        folder.mkdir()
        m = {"run_name": name, "model": "m", "eval_profile": "quick", "seed": 0, "ppl_seqlen": 8, "ppl_windows": 3,
             **extra}
        (folder / "metrics.json").write_text(json.dumps(m))
        (folder / "per_sample.json").write_text(json.dumps(
            {"ppl": {"window_nll": nll}, "zeroshot": {"piqa": {"doc_id": [0, 1, 2, 3], "acc": acc}}}))
        return folder

    a = run("a", [1.0, 2.0, 1.5], [1, 0, 1, 1])
    b = run("b", [x + math.log(2) for x in (1.0, 2.0, 1.5)], [1, 1, 1, 1])
    p = pair(a, b)
    assert p["ppl_ratio"].estimate == pytest.approx(2.0) and p["ppl_ratio"].low == pytest.approx(2.0)
    assert p["acc_diff"].estimate == pytest.approx(0.25)
    main([str(a), str(b)])
    assert "b against a: ppl x 2.000 [2.000, 2.000]*, Δacc +0.250" in capsys.readouterr().out
    c = run("c", [1.0, 2.0, 1.5], [1, 0, 1, 1], eval_profile="standard")
    with pytest.raises(SystemExit, match="differ in eval_profile"):
        pair(a, c)


def test_a_run_calibrated_on_other_text_says_so_in_its_variant():
    """A compressed run calibrated on c4 is another variant than the same recipe on wiki (the default), so a pairing by
    variant never mixes them; the baseline, which reads no calibration text, is one variant whatever the setting."""
    import pandas as pd

    from analysis.collect import _derive

    rows = [{"method": m, "cfg.method.tag": t, "cfg.criterion.name": "key_energy", "cfg.calibration.source": s,
             "cfg.heal.name": h, "cfg.heal.source": s}
            for m, t, s, h in (("rap", "rap", "wiki", "layerwise"), ("rap", "rap", "c4", "layerwise"),
                               ("rap", "rap", "c4", "none"), ("none", "none", "c4", "none"))]
    assert list(_derive(pd.DataFrame(rows))["variant"]) == [
        "RAP (key_energy) + healed (layerwise, wiki)", "RAP (key_energy) calibrated on c4 + healed (layerwise, c4)",
        "RAP (key_energy) calibrated on c4", "baseline"]


def test_a_paired_block_names_the_runs_it_read_for_its_provenance(sweep):
    """A block that pairs some runs against a reference draws its provenance line from those runs and the references,
    not from every run in the folders it loaded."""
    from analysis.paper import against_rows, provenance

    df = collect_module.collect(sweep)[0].assign(time_compress_s=1.0, flops_decode_attention_ratio=0.8)
    text, used = against_rows(df, df["method"].eq("palu"), (({"variant": "RAP (key_energy)"}, ("ratio",)),))
    assert sorted(used["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["palu2", "rap2"]
    assert "RAP (key_energy)" in text and "0.20" in text and "0.30" not in text
    assert provenance(used).startswith("2 runs;")
