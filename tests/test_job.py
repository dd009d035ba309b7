import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, compose

from rap.errors import ConfigError, DataError
from rap.harness import job as job_module
from rap.harness import results, settings
from rap.harness.job import run_job


def tiny_cfg(tmp_path, *extra):
    return compose("model=tiny-llama", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", *extra)


def test_job_writes_results_and_skips_when_done(tmp_path, data_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    out = tmp_path / "job"
    m = run_job(cfg, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m)) and saved["status"] == "complete"
    assert (out / "config.yaml").exists()
    per_sample = json.loads((out / "per_sample.json").read_text())
    assert len(per_sample["ppl"]["window_nll"]) == 2 and len(per_sample["zeroshot"]["piqa"]["acc"]) == 4
    assert saved["kv_bytes_per_token"] == saved["kv_bytes_per_token_formula"]
    assert saved["flops_decode"] == saved["flops_decode_formula"]
    assert saved["params_attention"] == saved["params_attention_formula"]
    assert saved["n_piqa"] == 4 and 0 <= saved["acc_piqa"] <= 1
    assert saved["ppl_windows"] == 2 and saved["ppl_seqlen"] == 64 and saved["ppl_wikitext2"] > 1
    import torch
    import transformers

    assert saved["env_transformers"] == transformers.__version__ and saved["env_torch"] == torch.__version__
    assert saved["env_git_commit"] is None or len(saved["env_git_commit"]) == 40
    assert saved["env_threads"] == torch.get_num_threads() and saved["env_dtype"] == "float32"

    from analysis.report import load_runs, summary

    df = load_runs(tmp_path)
    assert len(df) == 1 and df["ppl_wikitext2"][0] == saved["ppl_wikitext2"] and df["criterion"][0] == "-"
    assert "ppl_wikitext2" in summary(df).columns

    # A rerun of the same config must not load or compute anything.
    monkeypatch.setattr(job_module, "load_model", lambda *a, **k: pytest.fail("finished job was rerun"))
    assert run_job(cfg, out) == saved
    # Nor one whose folder was reached through another out_dir or sweep name (a moved or re-rooted result).
    assert run_job(tiny_cfg(tmp_path, "out_dir=/elsewhere", "sweep=moved"), out) == saved
    # Another config never overwrites a finished result.
    with pytest.raises(ConfigError, match="different config"):
        run_job(tiny_cfg(tmp_path, "seed=1"), out)
    assert json.loads((out / "metrics.json").read_text()) == saved


def test_rap_job_reports_ratios_and_plan(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path, "method=rap", "ratio=0.25", "criterion=qk_energy", "eval.zeroshot.tasks=[]",
                   "calibration.n_samples=2", "calibration.seqlen=32")
    m = run_job(cfg, tmp_path / "rap")
    plan = json.loads((tmp_path / "rap" / "plan.json").read_text())
    assert plan["method"] == "rap" and plan["criterion"] == "qk_energy"
    assert m["kv_bytes_per_token_ratio"] == 0.75  # 6 of 8 pairs, 12 of 16 V channels
    assert m["kv_bytes_per_token"] == m["kv_bytes_per_token_formula"]
    assert m["flops_decode"] == m["flops_decode_formula"] and m["flops_decode_ratio"] < 1
    assert m["params_attention_ratio"] < 1 and m["time_compress_s"] > 0
    # round_to=auto ran as 1 on CPU and is recorded as that; where the model lived and which kernels ran.
    assert plan["round_to"] == m["round_to"] == 1 and "round_to: 1" in (tmp_path / "rap" / "config.yaml").read_text()
    assert m["model_devices"] == m["latency_device"] == "cpu"
    assert "scaled_dot_product" in m["sdpa_kernel_prefill"] and m["sdpa_kernel"] == "matmul"  # rap's CPU decode path


@pytest.mark.parametrize("method", ["palu", "elitekv"])
def test_baseline_jobs_match_rap_budget(tmp_path, data_dir, method):
    cfg = tiny_cfg(tmp_path, f"method={method}", "ratio=0.25", "eval.zeroshot.tasks=[]",
                   "calibration.n_samples=3", "calibration.seqlen=32", "calibration.whiten=[2,40]",
                   *(["method.search_sequences=1"] if method == "elitekv" else []))
    m = run_job(cfg, tmp_path / method)
    plan = json.loads((tmp_path / method / "plan.json").read_text())
    assert plan["method"] == method and (tmp_path / method / "plan.safetensors").exists()
    assert m["kv_bytes_per_token_ratio"] == 0.75 and m["kv_bytes_per_token"] == m["kv_bytes_per_token_formula"]
    assert m["flops_decode"] == m["flops_decode_formula"] and m["ppl_wikitext2"] > 1
    if method == "elitekv":  # value_path=auto, as it resolved
        assert m["value_path"] == plan["value_path"] in ("fold", "up")


def test_failed_job_leaves_no_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path, "data.dir=/nonexistent/data")
    with pytest.raises(DataError, match="does not exist"):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "metrics.json").exists()


def test_wandb_offline_run_mirrors_metrics_json(tmp_path, data_dir):
    from rap.harness.tracking import read_offline_run

    cfg = compose("model=tiny-llama", "eval=smoke", "tracking=wandb", f"out_dir={tmp_path}", "sweep=exp1")
    run_job(cfg, tmp_path / "job")
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])  # the run log, decoded with wandb's record schema
    saved = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert run["summary"] == saved
    assert run["config"]["model.name"] == "tiny-llama" and run["config"]["sweep"] == "exp1"
    assert {k: run["config"][k] for k in saved if k.startswith("env_")} == {k: v for k, v in saved.items()
                                                                            if k.startswith("env_")}
    assert {"per_task", "per_layer", "ppl_windows", "zeroshot_docs"} <= run["history_keys"]  # per-sample data too


def test_wandb_online_without_key_fails_in_one_sentence(tmp_path, data_dir, monkeypatch):
    from rap.errors import RapError

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose("model=tiny-llama", "eval=smoke", "tracking=wandb", f"out_dir={tmp_path}")
    monkeypatch.setattr(job_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    start = time.monotonic()
    with pytest.raises(RapError, match=r"needs an API key.*wandb login.*tracking.mode=offline.*tracking=none"):
        run_job(cfg, tmp_path / "job")
    assert time.monotonic() - start < 10  # the bound: a key check, not a network timeout
    assert not (tmp_path / "job" / "metrics.json").exists() and not (tmp_path / "job" / "config.yaml").exists()


def test_wandb_online_without_network_falls_back_to_offline(tmp_path, data_dir, monkeypatch, capsys):
    from rap.harness.tracking import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = compose("model=tiny-llama", "eval=smoke", "eval.zeroshot.tasks=[]", "tracking=wandb", f"out_dir={tmp_path}")
    saved = run_job(cfg, tmp_path / "job")
    assert "is not reachable; this run is logged offline" in capsys.readouterr().out
    (run,) = (tmp_path / "job" / "wandb").glob("offline-run-*")
    assert read_offline_run(run)["summary"] == saved and read_offline_run(run)["exit_code"] == 0


def test_ratio_zero_is_the_baseline_for_every_method():
    base = compose("model=tiny-llama", "method=none").run_name
    assert "_none_r0.0_" in base
    for method in ("rap", "palu", "elitekv"):
        assert compose("model=tiny-llama", f"method={method}", "ratio=0").run_name == base
    assert compose("model=tiny-llama").run_name == base  # the default method (rap) at the default ratio 0
    assert "_rap-key_energy-" in compose("model=tiny-llama", "ratio=0.2").run_name


def test_unset_options_leave_the_identity_of_earlier_results():
    """A result computed before an option with a null default existed is the same result."""
    old = {"method": {"name": "rap"}, "calibration": {"source": "wiki", "n_samples": 32}, "ratio": 0.2}
    new = {"method": {"name": "rap"}, "calibration": {"source": "wiki", "n_samples": 32, "whiten": None}, "ratio": 0.2}
    assert results.identity(old) == results.identity(new)
    assert results.identity(old) != results.identity({**new, "calibration": {**new["calibration"], "whiten": [2, 8]}})


def test_tracking_is_not_part_of_a_results_identity():
    """A run mirrored to W&B and the same run without tracking are one result: a rerun with the other setting skips
    it instead of refusing the folder."""
    plain = compose("model=tiny-llama", "ratio=0.2", "tracking=none")
    mirrored = compose("model=tiny-llama", "ratio=0.2", "tracking=wandb")
    assert plain.run_name == mirrored.run_name
    assert results.identity(settings.job_config(plain)) == results.identity(settings.job_config(mirrored))
    assert results.identity(settings.job_config(plain)) != results.identity(
        settings.job_config(compose("model=tiny-llama", "ratio=0.3", "tracking=none")))


def test_elitekv_value_path_is_named_when_it_is_not_the_default():
    """auto, the default, keeps the run name of before; fold or up is said in the run name and the report label. A
    result from before the option (no value_path, or NaN beside newer ones) ran fold: it is labelled so, and it is not
    the same result as auto's."""
    from analysis.collect import untrained_recipe

    names = {vp: compose("method=elitekv", "ratio=0.2", f"method.value_path={vp}").run_name
             for vp in ("auto", "fold", "up")}
    assert "_elitekv-greedy-e0-svd_r0.2_" in names["auto"]
    assert "_elitekv-greedy-e0-svd-vfold_r0.2_" in names["fold"] and "_elitekv-greedy-e0-svd-vup_r0.2_" in names["up"]
    row = {"method": "elitekv", "cfg.method.selection": "greedy", "cfg.method.elite_pairs": 0}
    assert untrained_recipe({**row, "cfg.method.value_path": "auto"}) == "EliteKV (greedy, r searched)"
    # auto is named by what it resolved to, where metrics.json records it
    assert untrained_recipe({**row, "cfg.method.value_path": "auto", "value_path": "up"}) == (
        "EliteKV (greedy, r searched, V up-projection)")
    assert untrained_recipe({**row, "cfg.method.value_path": "up"}) == "EliteKV (greedy, r searched, V up-projection)"
    assert untrained_recipe(row) == untrained_recipe({**row, "cfg.method.value_path": float("nan")}) == \
        "EliteKV (greedy, r searched, W_o folded)"
    old = {"method": {"name": "elitekv", "selection": "greedy"}, "ratio": 0.2}
    assert results.identity(old) != results.identity({**old, "method": {**old["method"], "value_path": "auto"}})


def test_budget_is_checked_before_anything_is_loaded_or_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(job_module, "load_model", lambda *a, **k: pytest.fail("model loaded before the budget check"))
    for method, message in (("rap", "leaves no RoPE pair"), ("palu", "leaves no RoPE pair"),
                            ("elitekv", "leaves no RoPE pair")):
        with pytest.raises(ConfigError, match=message):
            run_job(tiny_cfg(tmp_path, f"method={method}", "ratio=0.97"), tmp_path / method)
        assert not (tmp_path / method / "config.yaml").exists()
    with pytest.raises(ConfigError, match="Unknown criterion|Unknown allocation"):
        run_job(tiny_cfg(tmp_path, "ratio=0.2", "method.allocation=wrong"), tmp_path / "alloc")


def test_threads_per_job_never_oversubscribes():
    from rap.harness.settings import threads_per_job

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert threads_per_job("auto", None, cores=8) is None
    assert threads_per_job(3, {"_target_": joblib, "n_jobs": 4}, cores=8) == 3
    for n_jobs, expected in ((2, 4), (4, 2), (-1, 1), (-2, 1), (16, 1), (3, 2)):
        got = threads_per_job("auto", {"_target_": joblib, "n_jobs": n_jobs}, cores=8)
        assert got == expected and got * min(8 + 1 + n_jobs if n_jobs < 0 else n_jobs, 8) <= 8
    assert threads_per_job("auto", {"_target_": "x.submitit_launcher.LocalLauncher", "cpus_per_task": 2}, cores=8) == 2


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_two_job_multirun_through_a_launcher(tmp_path, data_dir, launcher):
    extra = (["hydra.launcher.n_jobs=2"] if launcher == "joblib"
             else ["hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"])
    cmd = [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", *extra, "model=tiny-llama", "eval=smoke",
           "eval.zeroshot.tasks=[]", "tracking=none", f"out_dir={tmp_path}", "sweep=s", "calibration.n_samples=2",
           "calibration.seqlen=32", "ratio=0,0.25"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = sorted((tmp_path / "s").glob("*/metrics.json"))
    assert len(done) == 2
    runs = [json.loads(p.read_text()) for p in done]
    assert sorted(m["ratio"] for m in runs) == [0.0, 0.25]
    threads = max(1, (os.cpu_count() or 1) // 2) if launcher == "joblib" else 1  # joblib: 2 jobs share the cores
    assert all(m["env_threads"] == threads for m in runs)
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # rerun: both skipped
    assert r2.returncode == 0 and [p.stat().st_mtime for p in done] == [
        p.stat().st_mtime for p in sorted((tmp_path / "s").glob("*/metrics.json"))]


@pytest.mark.slow
def test_main_table_preset_runs_its_grid(tmp_path):
    """+experiment=main_table on a tiny model: a baseline, computed once for the 7 methods, and 7 variants at ratio
    0.25, in the sweep folder."""
    cmd = [sys.executable, "run.py", "-m", "+experiment=main_table", "model=tiny-llama", "eval=smoke",
           "eval.zeroshot.tasks=[]", "tracking=none", f"out_dir={tmp_path}", "calibration.n_samples=5",
           "calibration.seqlen=32", "eval.measure.baseline_latency=false", "ratio=0,0.25"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "main_table").glob("*/metrics.json")]
    assert len(runs) == 8 and sum(m["method"] == "none" for m in runs) == 1
    assert r.stdout.count("[rap] skipping") == 6  # the baseline is computed once: 6 methods found it done
    base = next(m for m in runs if m["method"] == "none")
    assert base["ratio"] == 0.0 and "kv_bytes_per_token_ratio" not in base
    tags = sorted(p.parent.name for p in (tmp_path / "main_table").glob("*/metrics.json"))
    # Every variant's run name says its decomposition, grouping and allocation.
    for part in ("vlowrank", "palu-whiten-head-fisher_uniform", "palu-whiten-joint-fisher_uniform",
                 "elitekv-greedy-e0-svd", "elitekv-greedy-e0-whiten", "kvlatent_r0.25"):
        assert any(part in t for t in tags), (part, tags)
    from analysis.collect import collect_local

    variants = set(collect_local(tmp_path / "main_table")[0]["variant"])
    # EliteKV's value_path=auto is named by what it resolved to (up on this model, as metrics.json records).
    assert {"Palu (whiten, per head, fisher_uniform)", "Palu (whiten, joint, fisher_uniform)",
            "EliteKV (greedy, r searched, V up-projection)",
            "EliteKV + whitening (greedy, r searched, V up-projection)",
            "RAP (key_energy)", "RAP (key_energy, low-rank V)", "KV-Latent (strided dims, frequency-aware RoPE)",
            "baseline"} == variants


@pytest.mark.parametrize("preset, method", [("main_table", "rap"), ("criteria_ablation", "rap"),
                                            ("allocation_ablation", "rap"), ("baseline_options", "palu"),
                                            ("elitekv_options", "elitekv"), ("kv_quant", "rap")])
def test_every_preset_composes_with_its_method_and_sweep(preset, method):
    cfg = compose(f"+experiment={preset}", "ratio=0.2")
    assert cfg.method.name == method and cfg.sweep == preset.replace("elitekv_options", "baseline_options")
    assert method in cfg.run_name or method == "rap"


@pytest.mark.parametrize("preset", ["kvlatent_ablation", "rap_value_path", "rap_v_refit"])
def test_a_rerun_of_a_perplexity_only_preset_finds_its_committed_runs(preset):
    """Each job of the preset's sweep has the name and the identity of its committed run in results/, so a rerun
    skips it: the shared perplexity-only scope (conf/eval/scope) changes no result's identity or folder."""
    import itertools

    from omegaconf import OmegaConf

    params = OmegaConf.load(REPO / "conf" / "experiment" / f"{preset}.yaml").hydra.sweeper.params
    grid = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    for overrides in itertools.product(*grid):
        cfg = compose(f"+experiment={preset}", *overrides)
        assert list(cfg.eval.zeroshot.tasks) == [] and cfg.eval.name == "quick"
        folder = REPO / "results" / cfg.sweep / cfg.run_name
        assert results.finished(folder, settings.job_config(cfg)), (folder, overrides)


@pytest.mark.slow
def test_memory_savers_change_no_plan_and_no_identity(tmp_path, data_dir):
    """gradient_checkpointing and loss_chunk change how the Fisher pass runs, not what it finds: the same pairs are
    kept, and a result computed with them counts as finished for a config without them (and the reverse)."""
    base = ("method=rap", "ratio=0.25", "criterion=fisher", "eval.zeroshot.tasks=[]", "calibration.n_samples=2",
            "calibration.seqlen=32")
    run_job(tiny_cfg(tmp_path, *base), tmp_path / "plain")
    run_job(tiny_cfg(tmp_path, *base, "gradient_checkpointing=true", "loss_chunk=7"), tmp_path / "saver")
    plain, saver = (json.loads((tmp_path / d / "plan.json").read_text())["layers"] for d in ("plain", "saver"))
    assert plain == saver
    assert results.finished(tmp_path / "saver", settings.job_config(tiny_cfg(tmp_path, *base)))


def test_a_run_calibrated_on_other_text_gets_its_own_folder_and_finds_its_committed_result():
    """The c4-calibrated, c4-healed run is not the wiki run's folder; its committed result (named before the -cal-c4
    part existed) is still this config's."""
    from omegaconf import OmegaConf

    from rap.harness.results import identity
    from rap.harness.settings import job_config

    overrides = ["+experiment=heal", "method=rap", "ratio=0.2", "eval=standard"]
    c4 = compose(*overrides, "calibration.source=c4", "sweep=heal_c4")
    assert c4.run_name != compose(*overrides).run_name and c4.run_name.endswith("-cal-c4_standard")
    committed = OmegaConf.to_container(OmegaConf.load(REPO / "results" / "heal_c4" / c4.run_name / "config.yaml"))
    assert identity(committed) == identity(job_config(c4))


def test_every_committed_result_keeps_the_metrics_schema():
    """rap.harness.schema documents every key of every committed run, with its kind; a key it does not know fails."""
    import json

    from rap.harness.results import RunFolder
    from rap.harness.schema import check_metrics

    runs = RunFolder.find(REPO / "results", finished=True)
    assert len(runs) > 90
    for run in runs:
        check_metrics(run.metrics())
    with pytest.raises(ValueError, match="undocumented_key is not in rap.harness.schema.METRICS"):
        check_metrics({**runs[0].metrics(), "undocumented_key": 1})
    with pytest.raises(ValueError, match=r"ppl_wikitext2='high' is not number"):
        check_metrics(json.loads(json.dumps({"ppl_wikitext2": "high"})))
