"""One experiment job: validate, skip if done, load, compress, measure, evaluate, write results, track.

``metrics.json`` keys (flat):

- run: ``model``, ``method`` (``none`` at ratio 0, whatever the configured method), ``ratio``, ``eval_profile``,
  ``seed``, ``run_name``, ``status`` ("complete"), ``wall_time_s`` and ``time_<phase>_s`` for
  load/baseline/compress/heal/measure/latency/ppl/zeroshot; ``model_devices``, the devices holding the model's
  weights, comma-separated (several with ``model.device_map``); ``round_to``, the plan's rounding as it ran
  (``auto`` resolved); ``value_path``, EliteKV's value path as it ran (``auto`` resolved); ``qk_norm``, RAP's QK-norm
  mode on a QK-norm model (Qwen3, Gemma 3) as it ran (null resolved).
- healing (``heal=layerwise`` or ``e2e``, ``rap.heal``): ``heal``, its budget ``heal_source``, ``heal_n_samples``,
  ``heal_seqlen``, ``heal_tokens``, ``heal_steps``, ``heal_batch_size``, ``heal_lr``, ``heal_params`` (trained
  parameters), ``heal_time_s``, and ``heal_loss_before`` / ``heal_loss_after`` (layerwise: relative MSE of the
  attention outputs, mean over layers; e2e: KL divergence per token from the uncompressed model); each step's loss in ``per_sample.json`` (``heal``) and the W&B table ``heal_loss``.
- environment (``rap.environment``): ``env_rap_version``, ``env_git_commit``, ``env_git_dirty``, ``env_python``,
  ``env_torch``, ``env_transformers``, ``env_lm_eval``, ``env_datasets``, ``env_hydra_core``, ``env_device``,
  ``env_device_name``, ``env_dtype``, ``env_threads``, ``env_platform``.
- perplexity: ``ppl_wikitext2`` with ``ppl_nll``, ``ppl_tokens`` (predicted tokens), ``ppl_windows``,
  ``ppl_seqlen``, ``ppl_dataset``, ``ppl_split``, ``ppl_mode`` (``forward``, or ``cached`` with ``ppl_chunk``),
  ``ppl_bos`` (true when each window starts with the tokenizer's BOS, as Gemma's texts do: ``rap.evaluation.window_bos``).
- long context (``eval=long``, ``rap.long``): ``ruler_<task>_<length>``, ``n_ruler_<task>_<length>``,
  ``ruler_avg_<length>``, ``ruler_limit``, ``ruler_lengths``; per-document scores in ``per_sample.json`` (``long``).
- zero-shot: ``acc_<task>``, ``acc_norm_<task>``, ``acc_stderr_<task>``, ``n_<task>``, ``acc_avg``,
  ``acc_norm_avg``, ``zs_limit``, ``zs_seed``.
- ``per_sample.json`` beside it: ``{"ppl": {"window_nll": [...], "seqlen": n}, "zeroshot": {task: {"doc_id": [...],
  "acc": [...], "acc_norm": [...]}}}``, each window's mean NLL and each document's 0/1 scores, for paired
  comparisons between runs on the same documents (``rap.stats``, ``analysis.report``).
- costs at ``context_len``: ``kv_bytes``, ``kv_bytes_per_token``, its parts ``kv_bytes_full`` / ``_packed`` /
  ``_scales`` and ``kv_cache`` (``fp`` or the quantized cache's label), ``params_total``, ``params_attention``,
  ``flops_decode``, ``flops_decode_attention`` (FLOPs of one decode step), each count also as ``<key>_formula``
  from the config alone; ``sdpa_kernel`` and ``sdpa_kernel_prefill``, the attention kernels of that decode step
  and of the prefill before it (SDPA kernel names, or ``matmul`` for rap's own decode path).
- compressed runs: ``base_<key>`` (the uncompressed model, measured in the same job) and ``<key>_ratio``
  for KV bytes, params, FLOPs and latencies; the plan is saved as ``plan.json`` (``plan=<file>`` applies a saved one).

Faults: ``metrics.json`` is written last, by one atomic rename (the commit point); a job that fails writes
``failure.json`` instead, and one that is killed leaves neither. The job holds ``<out_dir>/.rap.lock`` while it
computes (``rap.files.job_lock``). ``RAP_KILL_AT`` injects kills for the tests (``rap.faults``).
- latency (ms, medians): ``latency_prefill_ms``, ``latency_prefill_attention_ms``, ``latency_decode_ms``,
  ``latency_decode_attention_ms`` with ``latency_device`` (every device the model uses), ``latency_dtype``,
  ``latency_threads``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import analytic, metrics
from .cache import cache_spec, cached_widths, check_group_size, make_cache, measured_split, quantized_cache_bytes
from .calibration import STATISTICS, gradient_settings
from .config import is_baseline_ratio
from .data import (WIKITEXT_TEST, calibration_batches, calibration_documents, check_wikitext2_test, check_window,
                   resolve_data_dir, wikitext2_test_text, window_bos)
from .environment import describe_environment
from .errors import ConfigError, RapError
from .evaluation import perplexity
from .faults import kill_point, set_current_run
from .files import job_lock, remove_temp_files, writable_dir, write_atomic
from .models import ModelSpec, check_rope_config, load_config, load_model, resolve_device, resolve_dtype
from .tracking import make_tracker


FAILURE_FILE = "failure.json"  # written instead of metrics.json when a started job fails or is interrupted
RATIO_KEYS = ("kv_bytes_per_token", "params_total", "params_attention", "flops_decode", "flops_decode_attention",
              "latency_prefill_ms", "latency_prefill_attention_ms", "latency_decode_ms", "latency_decode_attention_ms")


def validate(cfg: DictConfig) -> None:
    """The checks that need nothing loaded."""
    try:
        ratio = float(cfg.ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio={cfg.ratio!r} is not a number; it is the fraction of KV-cache dimensions removed, in [0, 1).") from None
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio={ratio} is outside [0, 1); it is the fraction of KV-cache dimensions removed.")
    chunk = cfg.get("loss_chunk", 1024)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"loss_chunk={chunk!r} is not a positive number of positions.")
    if cfg.method.name == "none" and ratio != 0.0:
        raise ConfigError(f"method=none keeps the model uncompressed, so ratio must be 0 (got ratio={ratio}); pick a method or set ratio=0.")


def is_baseline(cfg: DictConfig) -> bool:
    """Ratio 0 is the uncompressed model whatever the method: one result, shared by every method's sweep."""
    return cfg.method.name == "none" or is_baseline_ratio(cfg.ratio)


BASELINE_METHOD = {"name": "none", "tag": "none"}
# Where a result is written and how it was computed (threads, recorded as env_threads; memory savers that change
# no value), not what it is: a moved result, or one rerun with other such settings, still counts as finished.
LOCATION_KEYS = ("out_dir", "sweep", "threads", "gradient_checkpointing", "loss_chunk")
UNUSED_BY_BASELINE = ("method", "criterion", "calibration", "heal")  # settings that cannot change an uncompressed result
GROUP_DEFAULTS = {"cache": "dynamic", "heal": "none"}  # config groups added later, at their off setting


def method_options(cfg: DictConfig) -> dict:
    """``cfg.method`` as plain values, with ``round_to: auto`` resolved for the job's device (8 on CUDA, else 1):
    the number is what decides the result, so it is what the config records."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    if options.get("round_to") == "auto":
        from .methods.rap import resolve_round_to

        options["round_to"] = resolve_round_to("auto", resolve_device(cfg.device))
    return options


def job_config(cfg: DictConfig) -> dict:
    """The resolved job config without Hydra's own settings: what identifies a result. A baseline (ratio 0)
    is recorded as ``method: none`` whichever method's sweep ran it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["ratio"] = float(config["ratio"])
    config["method"] = dict(BASELINE_METHOD) if is_baseline(cfg) else method_options(cfg)
    return config


def _set_only(x):
    """``x`` without null entries at any depth: an option added later with a null default (off) leaves the identity
    of results computed before it unchanged."""
    if isinstance(x, dict):
        return {k: _set_only(v) for k, v in x.items() if v is not None}
    return x


def identity(config: dict | None) -> dict | None:
    """The part of a config that decides a result: no location, and for the baseline no compression settings."""
    if config is None:
        return None
    drop = LOCATION_KEYS + (UNUSED_BY_BASELINE if config.get("method", {}).get("name") == "none" else ())
    # A group at its default is what every result before that group existed used (full-precision cache, no healing).
    drop += tuple(g for g, default in GROUP_DEFAULTS.items() if (config.get(g) or {}).get("name", default) == default)
    out = {k: _set_only(v) for k, v in config.items() if k not in drop}
    if "ratio" in out:
        out["ratio"] = float(out["ratio"])
    return out


def finished(out_dir: Path, config: dict) -> bool:
    """True when ``out_dir`` holds metrics for this exact config. Metrics for another config are never overwritten."""
    metrics_path, config_path = out_dir / "metrics.json", out_dir / "config.yaml"
    if not metrics_path.exists():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.exists() else None
    if identity(saved) != identity(config):
        raise ConfigError(f"{out_dir} already holds results of a different config; set out_dir=... or sweep=... to write elsewhere.")
    return True


def model_spec(cfg: DictConfig) -> ModelSpec:
    m = OmegaConf.to_container(cfg.model, resolve=True)  # plain dicts for device_map / max_memory
    return ModelSpec(name=m["name"], source=m["source"], path=m["path"], gguf_file=m.get("gguf_file"),
                     dtype=m.get("dtype", "auto"), device=cfg.device, seed=cfg.seed,
                     trust_remote_code=m.get("trust_remote_code") is True, device_map=m.get("device_map"),
                     max_memory=m.get("max_memory"))


def calibration_size(c: DictConfig, statistic: str) -> tuple[int, int]:
    """``calibration.<statistic>`` as (n_samples, seqlen); a clear error for anything else."""
    size = c.get(statistic)
    try:
        n, seqlen = (int(x) for x in size)
        assert n > 0 and seqlen > 1
    except (TypeError, ValueError, AssertionError):
        raise ConfigError(f"calibration.{statistic}={size} is not [n_samples, seqlen] with positive sizes; e.g. calibration.{statistic}=[256,2048].") from None
    return n, seqlen


def build_method(cfg: DictConfig):
    """The configured method at ``cfg.ratio`` (None for the baseline); a bad option fails here, before loading."""
    if is_baseline(cfg):
        return None
    from dataclasses import fields

    from .methods import get_method, make_method

    options = {k: v for k, v in method_options(cfg).items() if k not in ("name", "tag")}
    names = {f.name for f in fields(get_method(cfg.method.name))}
    options.update({k: v for k, v in (("criterion", cfg.criterion.name), ("seed", cfg.seed)) if k in names})
    return make_method(cfg.method.name, float(cfg.ratio), **options)


HEAL_MODES = ("none", "layerwise", "e2e")


def heal_settings(cfg: DictConfig) -> dict | None:
    """The healing budget (``conf/heal``) as plain values, or None when nothing is healed (also at ratio 0)."""
    h = cfg.get("heal")
    if h is None or h.name == "none" or is_baseline(cfg):
        return None
    if h.name not in HEAL_MODES:
        raise ConfigError(f"heal={h.name} is not one of {', '.join(HEAL_MODES)}.")
    out = {"mode": h.name, "source": str(h.source)}
    for key, kind in (("n_samples", int), ("seqlen", int), ("steps", int), ("batch_size", int), ("lr", float)):
        try:
            out[key] = kind(h[key])
            assert out[key] > 0 and (kind is float or out[key] == h[key])
        except (TypeError, ValueError, AssertionError):
            raise ConfigError(f"heal.{key}={h.get(key)!r} is not a positive {kind.__name__}.") from None
    if out["seqlen"] < 2:
        raise ConfigError(f"heal.seqlen={out['seqlen']} is too short; use at least 2 tokens.")
    return out


def heal_compressed(model, tokenizer, originals: list, plan: dict, settings: dict, data_dir, seed: int) -> tuple[dict, dict]:
    """Heal the compressed ``model`` in place (``rap.heal``) and record the healed weights and the settings in
    ``plan``; returns the ``heal_*`` metrics and the per-step losses (``per_sample.json``, W&B)."""
    from .heal import HEALERS, healed_tensors

    s = settings
    batch = calibration_batches(tokenizer, data_dir, s["source"], {"heal": (s["n_samples"], s["seqlen"])}, seed=seed)["heal"]
    out = HEALERS[s["mode"]](model, originals, batch, s["steps"], s["lr"], s["batch_size"], seed=seed)
    plan["tensors"] = {**(plan.get("tensors") or {}), **healed_tensors(model)}
    plan["heal"] = dict(s)
    metrics = {f"heal_{k}": v for k, v in s.items()}
    metrics.update(heal=s["mode"], heal_tokens=s["n_samples"] * s["seqlen"], heal_params=out["params"],
                   heal_time_s=out["time_s"], heal_loss_before=sum(out["before"]) / len(out["before"]),
                   heal_loss_after=sum(out["after"]) / len(out["after"]))
    metrics.pop("heal_mode")
    return metrics, {k: out[k] for k in ("loss", "before", "after")}


def check_before_loading(cfg: DictConfig, method, data_dir) -> dict | None:
    """Everything that can be checked from the model config and the data files alone: RoPE layout, the method's
    options and budget, the cache options, the data files the job will read, and a given plan file (returned,
    loaded and validated, so it is read once)."""
    ppl_mode(cfg, cache_spec(cfg.get("cache")))
    if cfg.eval.get("long") is not None:
        from .long import check_tasks

        check_tasks(cfg.eval.long.tasks)
    for stat in STATISTICS:
        if cfg.calibration.get(stat) is not None:
            calibration_size(cfg.calibration, stat)
    config = load_config(model_spec(cfg))
    check_rope_config(config)
    if method is not None:
        method.validate(config)
    check_data(cfg, method, data_dir, config)
    if method is None or not cfg.get("plan"):
        return None
    from .methods import load_plan, validate_plan

    plan = load_plan(cfg.plan)
    if plan.get("method") != method.name or plan.get("ratio") != float(cfg.ratio):
        raise ConfigError(f"plan={cfg.plan} is a {plan.get('method')} plan at ratio {plan.get('ratio')}, but the job asks "
                          f"for method={method.name} at ratio={cfg.ratio}; set method= and ratio= to match it.")
    validate_plan(config, plan)
    return plan


def check_data(cfg: DictConfig, method, data_dir, config=None) -> None:
    """Read the local data files the job will use (before any model is loaded): a bad file fails at once."""
    if data_dir is None:
        return
    check_wikitext2_test(data_dir, cfg.eval.ppl.seqlen)
    if cfg.eval.zeroshot.tasks:
        from .zeroshot import check_task_files

        check_task_files(data_dir, list(cfg.eval.zeroshot.tasks))
    if method is not None and not cfg.get("plan") and method.needs_calibration(config):
        calibration_documents(data_dir, cfg.calibration.source)
    heal = heal_settings(cfg)
    if heal is not None:
        calibration_documents(data_dir, heal["source"])


def compress_model(model, tokenizer, method, cfg: DictConfig, data_dir, plan: dict | None = None):
    """Apply ``method`` (from ``build_method``), or the given ``plan`` (``cfg.plan``, loaded by
    ``check_before_loading``); returns ``(model, plan)``. ``plan`` is None for the baseline."""
    if method is None:
        return model, None
    from .methods import apply_plan

    if plan is not None:
        return apply_plan(model, plan), plan
    calib = None
    if method.needs_calibration(model.config):
        c = cfg.calibration
        sizes = {"default": (c.n_samples, c.seqlen)}
        sizes.update({stat: calibration_size(c, stat) for stat in STATISTICS if c.get(stat) is not None})
        calib = calibration_batches(tokenizer, data_dir, c.source, sizes, seed=cfg.seed)
    with gradient_settings(checkpointing=bool(cfg.get("gradient_checkpointing")), loss_chunk=cfg.get("loss_chunk", 1024)):
        plan = method.make_plan(model, calib)
    return apply_plan(model, plan), plan


def ppl_mode(cfg: DictConfig, spec) -> str:
    """``forward`` or ``cached``; unset, ``cached`` with a quantized cache ``spec`` (a one-forward perplexity never
    reads it)."""
    mode = cfg.eval.ppl.get("mode")
    if mode is None:
        return "cached" if spec.kind == "quantized" else "forward"
    if mode not in ("forward", "cached"):
        raise ConfigError(f"eval.ppl.mode={mode!r} is not forward or cached.")
    return mode


def formula_costs(config, plan, context_len: int, bytes_per_element: int) -> dict:
    return {
        "kv_bytes_formula": analytic.kv_bytes(config, context_len, plan, bytes_per_element),
        "kv_bytes_per_token_formula": analytic.kv_bytes(config, context_len, plan, bytes_per_element) / context_len,
        "params_total_formula": analytic.total_params(config, plan),
        "params_attention_formula": analytic.attention_params(config, plan),
        "flops_decode_formula": analytic.decode_flops(config, context_len, plan),
        "flops_decode_attention_formula": analytic.attention_decode_flops(config, context_len, plan),
    }


def threads_per_job(threads, launcher: dict | None = None, cores: int | None = None) -> int | None:
    """Torch threads for one job: ``threads`` when it is a number; with ``auto``, the cores shared by the jobs that
    a parallel launcher runs at once (joblib's ``n_jobs``, submitit's ``cpus_per_task``), so that jobs x threads
    never exceeds the cores. None leaves torch's default (one job at a time)."""
    if threads not in (None, "auto"):
        return max(1, int(threads))
    target = (launcher or {}).get("_target_", "")
    cores = cores or os.cpu_count() or 1
    if "joblib" in target.lower():
        n = launcher.get("n_jobs") or -1
        n = cores + 1 + n if n < 0 else n  # joblib: -1 = all cores, -2 = all but one, ...
        return max(1, cores // max(1, min(n, cores)))
    if "submitit" in target.lower():
        return int(launcher.get("cpus_per_task") or 1)
    return None


def run_job(cfg: DictConfig, out_dir: Path, launcher: dict | None = None) -> dict:
    """Run one job into ``out_dir``; returns the metrics. Writes ``metrics.json`` only when everything succeeded.
    ``launcher`` is Hydra's launcher config (it bounds the torch threads of parallel jobs). The job holds the folder's
    lock while it computes (``rap.files.job_lock``), so a cell is computed once however many sweeps reach it."""
    out_dir = Path(out_dir)
    validate(cfg)
    config = job_config(cfg)
    writable_dir(out_dir)
    if finished(out_dir, config):
        return skip(cfg, out_dir)
    with job_lock(out_dir, cfg.run_name):
        if finished(out_dir, config):  # another process computed it while this one waited
            return skip(cfg, out_dir)
        remove_temp_files(out_dir)  # a killed writer's leftovers
        set_current_run(cfg.run_name)
        try:
            return compute_job(cfg, config, out_dir, launcher)
        finally:
            set_current_run(None)


def skip(cfg: DictConfig, out_dir: Path) -> dict:
    print(f"[rap] skipping {cfg.run_name}: {out_dir / 'metrics.json'} exists for this config", flush=True)
    return json.loads((out_dir / "metrics.json").read_text())


def compute_job(cfg: DictConfig, config: dict, out_dir: Path, launcher: dict | None) -> dict:
    data_dir = resolve_data_dir(cfg.data.dir)
    if data_dir is not None and cfg.model.source != "hub":
        # Everything is local: keep transformers/datasets from reaching the hub (must precede `import datasets`).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    method = build_method(cfg)
    given_plan = check_before_loading(cfg, method, data_dir)

    threads = threads_per_job(cfg.get("threads", "auto"), launcher)
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.time()
    times = {}
    spec = model_spec(cfg)
    device = resolve_device(spec.device)
    print(f"[rap] computing {cfg.run_name} in {out_dir}", flush=True)
    results = {"model": cfg.model.name, "method": config["method"]["name"], "ratio": config["ratio"],
               "eval_profile": cfg.eval.name, "seed": cfg.seed, "run_name": cfg.run_name,
               **describe_environment(device, resolve_dtype(spec.dtype, device))}
    tracker = make_tracker(cfg.tracking.backend, **({} if cfg.tracking.backend == "none" else dict(
        out_dir=out_dir, project=cfg.tracking.project, entity=cfg.tracking.get("entity"), mode=cfg.tracking.get("mode"),
        group=cfg.sweep, name=cfg.run_name, config={**flat_config(config), **results},
        tags=[f"method:{results['method']}", f"model:{cfg.model.name}"]
        + ([f"criterion:{cfg.criterion.name}"] if results["method"] == "rap" else []))))
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(config))
    try:
        t = time.time()
        kill_point("load")
        model, tok = load_model(spec)
        times["load"] = time.time() - t
        results["model_devices"] = ",".join(str(d) for d in metrics.model_devices(model))  # a scalar, as W&B summaries take

        m = cfg.eval.measure
        base = {}
        if method is not None and m.baseline_latency:
            # The uncompressed model timed in the same process and conditions, for the latency *_ratio keys.
            t = time.time()
            base.update(metrics.measure_latency(model, m.context_len, repeats=m.latency_repeats,
                                                warmup=m.latency_warmup, decode_steps=m.decode_steps))
            times["baseline"] = time.time() - t

        t = time.time()
        kill_point("compress")
        heal = heal_settings(cfg)
        originals = [layer.self_attn for layer in model.model.layers] if heal is not None else None
        model, plan = compress_model(model, tok, method, cfg, data_dir, given_plan)
        times["compress"] = time.time() - t
        for key in ("round_to", "value_path", "qk_norm"):  # options that resolve by device or model (``auto``) as they ran
            if plan is not None and key in plan:
                results[key] = plan[key]
        heal_curves = None
        if heal is not None and not plan.get("heal"):  # a given plan that was healed brought its healed weights
            t = time.time()
            kill_point("heal")
            heal_metrics, heal_curves = heal_compressed(model, tok, originals, plan, heal, data_dir, cfg.seed)
            results.update(heal_metrics)
            times["heal"] = time.time() - t
        originals = None
        if plan is not None:
            from .methods import save_plan

            save_plan(model, out_dir / "plan.json")

        t = time.time()
        spec = cache_spec(cfg.get("cache"))
        shapes = cached_widths(model)
        widths = sorted({w[3] for kv in shapes for w in kv})
        if model.device.type == "cuda" and any(w % 8 for w in widths):
            # docs/bench/gpu_h100.md: unaligned widths reach no cuDNN kernel and run slower than full width
            print(f"[rap] warning: cached widths {widths} are not all multiples of 8; on a GPU set method.round_to=8, "
                  "else the compressed attention can be slower than the original")
        check_group_size(spec, model, shapes)
        results.update(metrics.measure_costs(model, m.context_len, spec))
        bytes_per_element = next(model.parameters()).element_size()
        results.update(formula_costs(model.config, plan, m.context_len, bytes_per_element))
        if spec.kind == "quantized":
            held = quantized_cache_bytes(shapes, spec, *measured_split(spec, m.context_len), bytes_per_element)
            results["kv_bytes_per_token_formula"] = held["total"] / m.context_len
            results.update({f"kv_bytes_{k}_formula": held[k] for k in ("full", "packed", "scales")})
        times["measure"] = time.time() - t

        t = time.time()
        kill_point("latency")
        results.update(metrics.measure_latency(model, m.context_len, repeats=m.latency_repeats,
                                               warmup=m.latency_warmup, decode_steps=m.decode_steps))
        times["latency"] = time.time() - t
        if plan is not None or spec.kind == "quantized":
            # Cost baselines (uncompressed, full-precision cache) are exact in closed form (tests assert measured ==
            # formula); latency must be measured.
            dense = formula_costs(model.config, None, m.context_len, bytes_per_element)
            for k in RATIO_KEYS:
                base.setdefault(k, dense.get(f"{k}_formula"))
            base = {k: v for k, v in base.items() if v is not None}
        for k in RATIO_KEYS:
            if k in base:
                results[f"base_{k}"] = base[k]
                results[f"{k}_ratio"] = results[k] / base[k]

        t = time.time()
        kill_point("ppl")
        p = cfg.eval.ppl
        ids = tok(wikitext2_test_text(data_dir), return_tensors="pt").input_ids[0]
        check_window(ids.numel(), p.seqlen, "WikiText-2 test" if data_dir is None else data_dir / WIKITEXT_TEST)
        mode = ppl_mode(cfg, spec)
        chunk = (p.get("chunk") or 256) if mode == "cached" else None
        bos = window_bos(tok)
        ppl = perplexity(model, ids, seqlen=p.seqlen, max_windows=p.max_windows, chunk=chunk,
                         make_cache=lambda: make_cache(spec, model), bos_id=bos)
        results.update({"ppl_wikitext2": ppl["ppl"], "ppl_nll": ppl["nll"], "ppl_tokens": ppl["tokens"],
                        "ppl_windows": ppl["windows"], "ppl_seqlen": p.seqlen, "ppl_dataset": "wikitext-2-raw-v1",
                        "ppl_split": "test", "ppl_mode": mode, **({"ppl_chunk": chunk} if chunk else {}),
                        **({"ppl_bos": True} if bos is not None else {})})
        per_sample = {"ppl": {"window_nll": ppl["window_nll"], "seqlen": p.seqlen}, "zeroshot": {}}
        if heal_curves is not None:
            per_sample["heal"] = heal_curves
        times["ppl"] = time.time() - t

        z = cfg.eval.zeroshot
        if z.tasks:
            from .zeroshot import evaluate_zero_shot

            t = time.time()
            kill_point("zeroshot")
            with tempfile.TemporaryDirectory(prefix="rap_tasks_") as work:
                zs = evaluate_zero_shot(model, tok, list(z.tasks), data_dir, limit=z.limit, seed=cfg.seed,
                                        batch_size=z.batch_size, work_dir=work)
            per_sample["zeroshot"] = zs.pop("zs_per_doc")
            results.update(zs)
            results.update({"zs_limit": z.limit, "zs_seed": cfg.seed})
            times["zeroshot"] = time.time() - t

        lc = cfg.eval.get("long")
        if lc is not None and lc.tasks:
            from .long import evaluate_long, long_lengths

            t = time.time()
            lengths = long_lengths(lc.get("lengths"), model)
            lr = evaluate_long(model, tok, list(lc.tasks), lengths, lc.limit, seed=cfg.seed,
                               make_cache=lambda: make_cache(spec, model))
            per_sample["long"] = lr.pop("ruler_per_doc")
            results.update(lr)
            results.update({"ruler_limit": lc.limit, "ruler_lengths": lengths})
            times["long"] = time.time() - t

        results.update({f"time_{k}_s": v for k, v in times.items()})
        results["wall_time_s"] = time.time() - t0
        results["status"] = "complete"
        write_atomic(out_dir / "per_sample.json", json.dumps(per_sample, separators=(",", ":")))
        write_atomic(out_dir / "metrics.json", json.dumps(results, indent=1, sort_keys=True))  # the commit point
        (out_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's record
    except BaseException as e:
        # No metrics.json: the folder never looks complete. The record says why, for analysis.collect.
        try:
            write_atomic(out_dir / FAILURE_FILE, json.dumps({"error": type(e).__name__, "message": str(e)[:2000],
                                                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        except RapError:
            pass  # a full disk: the error to report is the one that stopped the job
        tracker.finish(exit_code=1)  # W&B shows the run as failed
        raise
    # The result is complete; the W&B mirror follows. Its failure loses no result (``wandb sync`` can redo it).
    kill_point("finish")
    try:
        tracker.log_summary(results)
        tracker.log_tables(result_tables(results, model.config, plan, heal_curves))
        tracker.finish()
    except Exception as e:
        print(f"[rap] warning: the W&B mirror of {cfg.run_name} failed ({type(e).__name__}: {e}); "
              f"{out_dir / 'metrics.json'} is complete.", flush=True)
    return results


def result_tables(results: dict, model_config, plan: dict | None, heal_curves: dict | None = None) -> dict:
    """Per-task zero-shot results, per-layer kept widths (what the cache holds; each layer's kind, local or global,
    and RoPE base) and, when healed, the training loss
    of every layer and step, as DataFrames."""
    import pandas as pd

    tasks = sorted(k[len("n_"):] for k in results if k.startswith("n_"))
    per_task = pd.DataFrame([{"task": t, "acc": results.get(f"acc_{t}"), "acc_norm": results.get(f"acc_norm_{t}"),
                              "acc_stderr": results.get(f"acc_stderr_{t}"), "n": results[f"n_{t}"]} for t in tasks])
    from .architecture import layer_kinds, layer_rope_bases

    shapes = analytic.attention_shapes(model_config, plan)
    per_layer = pd.DataFrame([{"layer": i, "kind": kind, "rope_base": base, "qk_dim": s.qk_dim, "v_dim": s.v_dim,
                               "cache_elements_per_token": s.cache_elements}
                              for i, (s, kind, base) in enumerate(zip(shapes, layer_kinds(model_config),
                                                                      layer_rope_bases(model_config), strict=True))])
    tables = {"per_task": per_task, "per_layer": per_layer}
    if heal_curves is not None:
        tables["heal_loss"] = pd.DataFrame([{"layer": i, "step": j, "loss": v} for i, curve in enumerate(heal_curves["loss"])
                                            for j, v in enumerate(curve)])
    return tables


def flat_config(config: dict, prefix: str = "") -> dict:
    """``{"model": {"name": x}}`` -> ``{"model.name": x}`` for W&B and pandas."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out
