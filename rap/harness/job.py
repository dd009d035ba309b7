"""One experiment job, as phases: settings (checked before anything loads) -> skip if done -> load -> compress
(-> heal) -> costs -> latency -> evaluate -> commit -> mirror to the tracker.

``metrics.json`` holds flat keys, each documented in ``rap.harness.schema.METRICS`` and checked against it before the
commit; ``per_sample.json`` beside it holds each window's NLL and each document's scores, for paired comparisons
(``rap.stats``, ``analysis.report``); the plan is saved as ``plan.json`` (``plan=<file>`` applies a saved one).

Faults: ``metrics.json`` is written last, by one atomic rename (the commit point); a job that fails writes
``failure.json`` instead, and one that is killed leaves neither. The job holds ``<out_dir>/.rap.lock`` while it
computes (``rap.harness.results.job_lock``). ``RAP_KILL_AT`` injects kills for the tests (``rap.faults``).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .. import costs, measure
from ..cache import cached_widths, check_group_size, measured_split, quantized_cache_bytes
from ..data import calibration_batches
from ..devices import model_devices, resolve_dtype
from ..faults import kill_point, set_current_run
from ..files import remove_temp_files, writable_dir, write_atomic
from ..heal import HEALERS, healed_tensors
from ..models import load_model
from ..plans import apply_plan, save_plan
from .environment import describe_environment
from .evaluators import EVALUATORS, Context
from .results import (
    CONFIG_FILE,
    METRICS_FILE,
    PLAN_FILE,
    commit,
    finished,
    flat_config,
    job_lock,
    read_metrics,
    record_failure,
)
from .schema import check_metrics
from .settings import Settings, check_before_loading, read_settings
from .tracking import make_tracker, result_tables

RATIO_KEYS = ("kv_bytes_per_token", "params_total", "params_attention", "flops_decode", "flops_decode_attention",
              "latency_prefill_ms", "latency_prefill_attention_ms", "latency_decode_ms", "latency_decode_attention_ms")


@dataclass
class Run:
    """What a job has produced so far, as its phases add to it."""

    s: Settings
    out_dir: Path
    data_dir: Path | None
    results: dict
    per_sample: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # the uncompressed model's costs and latency, for the *_ratio keys
    heal_curves: dict | None = None
    t0: float = field(default_factory=time.time)

    @contextmanager
    def phase(self, name: str):
        """Time the block as ``time_<name>_s``; ``RAP_KILL_AT=<name>`` kills the job as it starts (``rap.faults``)."""
        t = time.time()
        kill_point(name)
        yield
        self.times[name] = time.time() - t


def run_job(cfg, out_dir: Path, launcher: dict | None = None) -> dict:
    """Run one job into ``out_dir``; returns the metrics. Writes ``metrics.json`` only when everything succeeded.
    ``launcher`` is Hydra's launcher config (it bounds the torch threads of parallel jobs). The job holds the folder's
    lock while it computes (``job_lock``), so a cell is computed once however many sweeps reach it."""
    out_dir = Path(out_dir)
    s = read_settings(cfg, launcher)
    writable_dir(out_dir)
    if finished(out_dir, s.config):
        return skip(s, out_dir)
    with job_lock(out_dir, s.run_name):
        if finished(out_dir, s.config):  # another process computed it while this one waited
            return skip(s, out_dir)
        remove_temp_files(out_dir)  # a killed writer's leftovers
        set_current_run(s.run_name)
        try:
            return compute_job(s, out_dir)
        finally:
            set_current_run(None)


def skip(s: Settings, out_dir: Path) -> dict:
    print(f"[rap] skipping {s.run_name}: {out_dir / METRICS_FILE} exists for this config", flush=True)
    return read_metrics(out_dir)


def compute_job(s: Settings, out_dir: Path) -> dict:
    data_dir = s.data_dir
    if data_dir is not None and s.model.source != "hub":
        # Everything is local: keep transformers/datasets from reaching the hub (must precede `import datasets`).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    given_plan, documents = check_before_loading(s, data_dir)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    run = start(s, out_dir, data_dir)
    tracker = open_tracker(run)
    write_atomic(out_dir / CONFIG_FILE, OmegaConf.to_yaml(s.config))
    try:
        model, tok = load(run)
        model, plan = compress_and_heal(run, model, tok, given_plan, documents)
        record_costs(run, model, plan)
        measure_latency(run, model)
        evaluate(run, model, tok)
        run.results.update({f"time_{k}_s": v for k, v in run.times.items()})
        run.results["wall_time_s"] = time.time() - run.t0
        run.results["status"] = "complete"
        check_metrics(run.results)  # a key the schema does not document never reaches a result file
        commit(out_dir, run.results, run.per_sample)  # the commit point
    except BaseException as e:
        record_failure(out_dir, e)  # no metrics.json: the folder never looks complete
        tracker.finish(exit_code=1)  # W&B shows the run as failed
        raise
    mirror(run, tracker, model.config, plan)
    return run.results


def start(s: Settings, out_dir: Path, data_dir: Path | None) -> Run:
    """The run's first keys: what it is and where it runs."""
    device = s.device
    print(f"[rap] computing {s.run_name} in {out_dir}", flush=True)
    results = {"model": s.model.name, "method": s.config["method"]["name"], "ratio": s.ratio,
               "eval_profile": s.eval_name, "seed": s.seed, "run_name": s.run_name,
               **describe_environment(device, resolve_dtype(s.model.dtype, device))}
    return Run(s=s, out_dir=out_dir, data_dir=data_dir, results=results)


def open_tracker(run: Run):
    s, t = run.s, run.s.tracking
    if t.backend == "none":
        return make_tracker("none")
    return make_tracker(t.backend, out_dir=run.out_dir, project=t.project, entity=t.entity, mode=t.mode,
                        group=s.sweep, name=s.run_name, config={**flat_config(s.config), **run.results},
                        tags=[f"method:{run.results['method']}", f"model:{s.model.name}"]
                        + (s.method.run_tags() if s.method is not None else []))


def load(run: Run):
    """Load the model; with a method and ``eval.measure.baseline_latency``, time it uncompressed in the same process
    and conditions, for the latency ``*_ratio`` keys."""
    with run.phase("load"):
        model, tok = load_model(run.s.model)
    if hasattr(run.s.press, "bind"):  # a press that tokenizes text of its own (KVzip's instruction)
        run.s.press.bind(tok)
    run.results["model_devices"] = ",".join(str(d) for d in model_devices(model))  # a scalar, as W&B summaries take
    m = run.s.measure
    if run.s.method is not None and m.baseline_latency:
        with run.phase("baseline"):
            run.base.update(measure.measure_latency(model, m.context_len, repeats=m.latency_repeats,
                                                    warmup=m.latency_warmup, decode_steps=m.decode_steps))
    return model, tok


def compress_and_heal(run: Run, model, tok, given_plan: dict | None, documents: dict):
    """Apply the method (or the given plan), heal it when asked, and save the plan; ``(model, None)`` for the
    baseline."""
    s = run.s
    with run.phase("compress"):  # timed for the baseline too (0 s): every run records the same phases
        if s.method is None:
            return model, None
        originals = [layer.self_attn for layer in model.model.layers] if s.heal is not None else None
        if given_plan is not None:
            plan = given_plan
        else:
            calib = None
            if s.method.needs_calibration(model.config):
                calib = calibration_batches(tok, run.data_dir, s.calibration_source, s.calibration, seed=s.seed,
                                            documents=documents.get(s.calibration_source))
            plan = s.method.make_plan(model, calib)
        model = apply_plan(model, plan)
    run.results.update(s.method.plan_record(plan))  # options that resolve by device or model (``auto``) as they ran
    if s.heal is not None and plan.get("heal"):  # a given healed plan brought its healed weights (same settings)
        run.results.update(heal_record(s.heal))
        if plan.get("heal_outcome"):  # what training the plan cost and achieved, recorded by the run that healed it
            run.results.update(heal_record(s.heal, plan["heal_outcome"]), heal_replayed=True)
    elif s.heal is not None:
        with run.phase("heal"):
            heal(run, model, tok, originals, plan, documents)
    save_plan(model, run.out_dir / PLAN_FILE)
    return model, plan


def heal_record(h: dict, outcome: dict | None = None) -> dict:
    """The healing settings as results: ``heal`` (the mode), ``heal_<budget>`` and ``heal_tokens``, and the plan's
    ``heal_outcome`` as ``heal_<outcome>`` when given."""
    return {"heal": h["mode"], **{f"heal_{k}": v for k, v in {**h, **(outcome or {})}.items() if k != "mode"},
            "heal_tokens": h["n_samples"] * h["seqlen"]}


def heal(run: Run, model, tok, originals: list, plan: dict, documents: dict) -> None:
    """Heal the compressed ``model`` in place (``rap.heal``) and record the healed weights and the settings in
    ``plan``; the ``heal_*`` metrics go to the results, the per-step losses to ``per_sample.json`` and W&B."""
    h, seed = run.s.heal, run.s.seed
    batch = calibration_batches(tok, run.data_dir, h["source"], {"heal": (h["n_samples"], h["seqlen"])}, seed=seed,
                                documents=documents.get(h["source"]))["heal"]
    out = HEALERS[h["mode"]](model, originals, batch, h["steps"], h["lr"], h["batch_size"], seed=seed)
    plan["tensors"] = {**(plan.get("tensors") or {}), **healed_tensors(model)}
    plan["heal"] = dict(h)
    plan["heal_outcome"] = {"params": out["params"], "time_s": out["time_s"],
                            "loss_before": sum(out["before"]) / len(out["before"]),
                            "loss_after": sum(out["after"]) / len(out["after"]),
                            **({"lr_chosen": out["lr"]} if h["lr"] == "auto" else {})}
    run.results.update(heal_record(h, plan["heal_outcome"]))
    run.heal_curves = {k: out[k] for k in ("loss", "before", "after")}


def formula_costs(config, plan, context_len: int, bytes_per_element: int, kept: int | None = None) -> dict:
    """Closed-form costs at ``context_len`` tokens of context, of which a press kept ``kept`` (all when None): the
    cache holds, and the decode step attends over, the kept ones; per-token bytes are per context token seen."""
    held = context_len if kept is None else kept
    kv = costs.kv_bytes(config, held, plan, bytes_per_element)
    return {
        "kv_bytes_formula": kv,
        "kv_bytes_per_token_formula": kv / context_len,
        "params_total_formula": costs.total_params(config, plan),
        "params_attention_formula": costs.attention_params(config, plan),
        "flops_decode_formula": costs.decode_flops(config, held, plan),
        "flops_decode_attention_formula": costs.attention_decode_flops(config, held, plan),
    }


def record_costs(run: Run, model, plan: dict | None) -> None:
    """KV bytes, parameters and FLOPs, measured on the model and in closed form."""
    spec, n = run.s.cache, run.s.measure.context_len
    with run.phase("measure"):
        shapes = cached_widths(model)
        widths = sorted({w[3] for kv in shapes for w in kv})
        if model.device.type == "cuda" and any(w % 8 for w in widths):
            # docs/bench/gpu_h100.md: unaligned widths reach no cuDNN kernel and run slower than full width
            print(f"[rap] warning: cached widths {widths} are not all multiples of 8; on a GPU set method.round_to=8, "
                  "else the compressed attention can be slower than the original")
        check_group_size(spec, model, shapes)
        press = run.s.press
        run.results.update(measure.measure_costs(model, n, spec, press))
        bytes_per_element = next(model.parameters()).element_size()
        kept = press.keep_count(n) if press is not None else None
        run.results.update(formula_costs(model.config, plan, n, bytes_per_element, kept))
        if spec.kind == "quantized":
            held = quantized_cache_bytes(shapes, spec, *measured_split(spec, n), bytes_per_element)
            run.results["kv_bytes_per_token_formula"] = held["total"] / n
            run.results.update({f"kv_bytes_{k}_formula": held[k] for k in ("full", "packed", "scales")})
        if plan is not None or spec.kind == "quantized" or press is not None:
            # Cost baselines (uncompressed, full-precision cache) are exact in closed form (tests assert measured ==
            # formula); latency must be measured.
            dense = formula_costs(model.config, None, n, bytes_per_element)
            run.base.update({k: dense[f"{k}_formula"] for k in RATIO_KEYS if f"{k}_formula" in dense})


def measure_latency(run: Run, model) -> None:
    """Prefill and decode latency, then every ``*_ratio`` key against the uncompressed model."""
    m = run.s.measure
    with run.phase("latency"):
        run.results.update(measure.measure_latency(model, m.context_len, repeats=m.latency_repeats,
                                                   warmup=m.latency_warmup, decode_steps=m.decode_steps))
    for k in RATIO_KEYS:
        if run.base.get(k) is not None:
            run.results[f"base_{k}"] = run.base[k]
            run.results[f"{k}_ratio"] = run.results[k] / run.base[k]


def evaluate(run: Run, model, tok) -> None:
    """Every configured evaluation in turn (``rap.harness.evaluators``), each timed as ``time_<key>_s``."""
    s = run.s
    ctx = Context(data_dir=run.data_dir, cache=s.cache, seed=s.seed, ppl_mode=s.ppl_mode, press=s.press)
    run.per_sample["zeroshot"] = {}  # every per_sample.json has the key, as analysis reads it
    for key, spec in s.evals.items():
        with run.phase(key):
            metrics, per_sample = EVALUATORS[key].run(model, tok, spec, ctx)
        run.results.update(metrics)
        run.per_sample[key] = per_sample
    if run.heal_curves is not None:
        run.per_sample["heal"] = run.heal_curves


def mirror(run: Run, tracker, model_config, plan: dict | None) -> None:
    """The result is complete; the W&B mirror follows. Its failure loses no result (``wandb sync`` can redo it)."""
    kill_point("finish")
    try:
        tracker.log_summary(run.results)
        tracker.log_tables(result_tables(run.results, model_config, plan, run.heal_curves, run.per_sample))
        tracker.finish()
    except Exception as e:
        print(f"[rap] warning: the W&B mirror of {run.s.run_name} failed ({type(e).__name__}: {e}); "
              f"{run.out_dir / METRICS_FILE} is complete.", flush=True)
