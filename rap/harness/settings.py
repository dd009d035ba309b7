"""A job's settings, read from the Hydra config once and checked before anything is loaded: the ratio, the method,
the healing budget, the cache, the evaluation modes, the model and where it runs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..cache import CacheSpec, cache_spec
from ..calibration import STATISTICS, GradientSettings
from ..data import calibration_documents, resolve_data_dir
from ..devices import resolve_device
from ..errors import ConfigError
from ..methods import Method, get_method, make_method
from ..methods.selection import check_ratio
from ..models import ModelSpec, check_rope_config, load_config
from ..plans import load_plan, validate_plan
from ..presses import Press, make_press
from .evaluators import EVALUATORS, eval_specs
from .resolvers import is_baseline_ratio
from .results import BASELINE_METHOD

HEAL_MODES = ("none", "layerwise", "e2e")
HEAL_BUDGET = (("n_samples", int), ("seqlen", int), ("steps", int), ("batch_size", int), ("lr", float))


@dataclass(frozen=True)
class Measure:
    """``eval.measure``: costs and latency at ``context_len`` tokens of context."""

    context_len: int
    latency_repeats: int
    latency_warmup: int
    baseline_latency: bool
    decode_steps: int


@dataclass(frozen=True)
class Tracking:
    """``tracking``: where the result is mirrored (``none`` or ``wandb``)."""

    backend: str
    project: str | None = None
    entity: str | None = None
    mode: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a job does, as plain values, each resolved and checked once (``read_settings``); no phase reads
    the raw config."""

    config: dict  # the resolved config that identifies the result (``job_config``)
    run_name: str
    sweep: str
    seed: int
    ratio: float
    method: Method | None  # None: the uncompressed baseline
    model: ModelSpec
    device: torch.device
    heal: dict | None
    cache: CacheSpec
    eval_name: str
    evals: dict  # evaluation key -> its spec, in order (``rap.harness.evaluators``)
    measure: Measure
    ppl_mode: str
    calibration_source: str
    calibration: dict  # statistic -> (n_samples, seqlen); "default" for the rest
    plan_path: str | None
    tracking: Tracking
    press: Press | None  # token eviction once the context is encoded (``rap.presses``); None: no press
    threads: int | None
    data_dir: Path | None  # None: nothing configured and no ../shared/data (the hub's copies are read)


def read_settings(cfg: DictConfig, launcher: dict | None = None) -> Settings:
    """Every setting of the job, checked; a bad one ends here in one sentence, before any model is loaded or an
    output folder is read. The checks run in the order a user's mistake shows: the ratio, the method and its plan,
    then the data dir."""
    ratio = check_ratio(cfg.ratio)
    chunk = cfg.get("loss_chunk", 1024)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"loss_chunk={chunk!r} is not a positive number of positions.")
    if cfg.method.name == "none" and ratio != 0.0:
        raise ConfigError(f"method=none keeps the model uncompressed, so ratio must be 0 (got ratio={ratio}); "
                          "pick a method or set ratio=0.")
    if cfg.get("plan") and is_baseline(cfg):
        plan = load_plan(cfg.plan)  # an unreadable file is named as such first
        raise ConfigError(f"plan={cfg.plan} is a {plan.get('method')} plan at ratio {plan.get('ratio')}, but the job "
                          f"is the uncompressed baseline (method={cfg.method.name}, ratio={ratio:g}); set method= and "
                          "ratio= to the plan's, or drop plan=.")
    device = resolve_device(cfg.device)
    config = job_config(cfg, device)
    spec = cache_spec(cfg.get("cache"))
    m, t = cfg.eval.measure, cfg.tracking
    return Settings(config=config, run_name=cfg.run_name, sweep=cfg.sweep, seed=cfg.seed, ratio=ratio,
                    method=build_method(cfg, config), model=model_spec(cfg), device=device, heal=heal_settings(cfg),
                    cache=spec, eval_name=cfg.eval.name, evals=eval_specs(cfg.eval),
                    measure=Measure(m.context_len, m.latency_repeats, m.latency_warmup, bool(m.baseline_latency),
                                    m.decode_steps),
                    ppl_mode=ppl_mode(cfg, spec), calibration_source=cfg.calibration.source,
                    calibration=calibration_sizes(cfg.calibration),
                    plan_path=cfg.get("plan") or None,
                    tracking=Tracking(t.backend, t.get("project"), t.get("entity"), t.get("mode")),
                    press=press_settings(cfg, spec),
                    threads=threads_per_job(cfg.get("threads", "auto"), launcher),
                    data_dir=resolve_data_dir(cfg.data.dir))


def is_baseline(cfg: DictConfig) -> bool:
    """Ratio 0 is the uncompressed model whatever the method: one result, shared by every method's sweep."""
    return cfg.method.name == "none" or is_baseline_ratio(cfg.ratio)


def resolved_method_options(cfg: DictConfig, device: torch.device) -> dict:
    """``cfg.method`` as plain values, resolved as they will run on ``device`` (``Method.resolve_options``): the
    resolved value decides the result, so it is what the config records."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    return get_method(cfg.method.name).resolve_options(options, device)


def job_config(cfg: DictConfig, device: torch.device | None = None) -> dict:
    """The resolved job config without Hydra's own settings: what identifies a result. A baseline (ratio 0)
    is recorded as ``method: none`` whichever method's sweep ran it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["ratio"] = float(config["ratio"])
    if is_baseline(cfg):
        config["method"] = dict(BASELINE_METHOD)
    else:
        config["method"] = resolved_method_options(cfg, device if device is not None else resolve_device(cfg.device))
    return config


def model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True), cfg.device, cfg.seed)


def build_method(cfg: DictConfig, config: dict) -> Method | None:
    """The configured method at the job's ratio (None for the baseline); a bad option fails here."""
    if config["method"]["name"] == "none":
        return None
    options = {k: v for k, v in config["method"].items() if k not in ("name", "tag")}
    gradients = GradientSettings(checkpointing=bool(cfg.get("gradient_checkpointing")),
                                 loss_chunk=cfg.get("loss_chunk", 1024))
    return make_method(cfg.method.name, config["ratio"],
                       shared={"criterion": cfg.criterion.name, "seed": cfg.seed, "gradients": gradients},
                       **options)


def calibration_sizes(c: DictConfig) -> dict:
    """``calibration`` as statistic -> (n_samples, seqlen): ``default`` and each statistic given its own size."""
    sizes = {"default": (c.n_samples, c.seqlen)}
    for statistic in STATISTICS:
        size = c.get(statistic)
        if size is None:
            continue
        try:
            n, seqlen = (int(x) for x in size)
            assert n > 0 and seqlen > 1
        except (TypeError, ValueError, AssertionError):
            raise ConfigError(f"calibration.{statistic}={size} is not [n_samples, seqlen] with positive sizes; "
                              f"e.g. calibration.{statistic}=[256,2048].") from None
        sizes[statistic] = (n, seqlen)
    return sizes


def heal_settings(cfg: DictConfig) -> dict | None:
    """The healing budget (``conf/heal``) as plain values, or None when nothing is healed (also at ratio 0)."""
    h = cfg.get("heal")
    if h is None or h.name == "none" or is_baseline(cfg):
        return None
    if h.name not in HEAL_MODES:
        raise ConfigError(f"heal={h.name} is not one of {', '.join(HEAL_MODES)}.")
    out = {"mode": h.name, "source": str(h.source)}
    for key, kind in HEAL_BUDGET:
        if key == "lr" and h.get("lr") == "auto":
            if h.name != "layerwise":
                raise ConfigError(f"heal.lr=auto picks each layer's learning rate by held-out loss, which "
                                  f"heal={h.name} (every layer at once) cannot; give heal.lr a number.")
            out["lr"] = "auto"
            continue
        try:
            out[key] = kind(h[key])
            assert out[key] > 0 and (kind is float or out[key] == h[key])
        except (TypeError, ValueError, AssertionError):
            raise ConfigError(f"heal.{key}={h.get(key)!r} is not a positive {kind.__name__}.") from None
    if out["seqlen"] < 2:
        raise ConfigError(f"heal.seqlen={out['seqlen']} is too short; use at least 2 tokens.")
    return out


def ppl_mode(cfg: DictConfig, spec: CacheSpec) -> str:
    """``forward`` or ``cached``; unset, ``cached`` with a quantized cache ``spec`` or a press (a one-forward
    perplexity never reads a cache)."""
    mode = cfg.eval.ppl.get("mode")
    pressed = (cfg.get("press") or {}).get("name", "none") != "none"
    if mode is None:
        return "cached" if spec.kind == "quantized" or pressed else "forward"
    if mode not in ("forward", "cached"):
        raise ConfigError(f"eval.ppl.mode={mode!r} is not forward or cached.")
    if mode == "forward" and pressed:
        raise ConfigError("eval.ppl.mode=forward reads no cache, so a press would change nothing; use "
                          "eval.ppl.mode=cached (or leave it unset).")
    return mode


def press_settings(cfg: DictConfig, spec: CacheSpec) -> Press | None:
    """The configured press (``conf/press``), or None for ``press=none``; checked against the cache."""
    p = cfg.get("press")
    if p is None or p.name == "none":
        return None
    press = make_press(p.name, **{k: v for k, v in OmegaConf.to_container(p, resolve=True).items()
                                  if k not in ("name", "tag")})
    if spec.kind == "quantized":
        raise ConfigError(f"press={p.name} compacts full-precision cache tensors; with cache=quantized, evicting "
                          "before quantizing is not supported yet.")
    if (cfg.eval.get("long") or {}).get("tasks"):
        raise ConfigError(f"press={p.name} with eval.long: compressing a RULER context before its question is not "
                          "built yet; use eval.long.tasks=[] (cached perplexity reads the press).")
    return press


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


def check_before_loading(s: Settings, data_dir: Path | None) -> tuple[dict | None, dict]:
    """Everything that can be checked from the model config and the data files alone: RoPE layout, the method's
    options and budget, the data files the job will read, and a given plan file. Returns the plan (loaded and
    validated) and the calibration documents by source, so that each is read once."""
    config = load_config(s.model)
    check_rope_config(config)
    if s.method is not None:
        s.method.validate(config)
    if s.press is not None:
        s.press.check_config(config)
    documents = check_data(s, data_dir, config)
    if s.method is None or not s.plan_path:
        return None, documents
    plan = load_plan(s.plan_path)
    if plan.get("method") != s.method.name or plan.get("ratio") != s.ratio:
        raise ConfigError(f"plan={s.plan_path} is a {plan.get('method')} plan at ratio {plan.get('ratio')}, but the "
                          f"job asks for method={s.method.name} at ratio={s.ratio:g}; set method= and ratio= to match "
                          "it.")
    if plan.get("heal") and plan["heal"] != s.heal:  # its weights are healed: the run must be labelled so
        raise ConfigError(f"plan={s.plan_path} was healed with {healing_words(plan['heal'])}, but the job asks for "
                          f"{healing_words(s.heal)}; set heal= and its budget to match the plan.")
    validate_plan(config, plan)
    return plan, documents


def healing_words(h: dict | None) -> str:
    """A heal record in words: "heal=layerwise (source=wiki, steps=200, ...)", or "heal=none"."""
    if not h:
        return "heal=none"
    return f"heal={h['mode']} ({', '.join(f'{k}={v}' for k, v in h.items() if k != 'mode')})"


def check_data(s: Settings, data_dir: Path | None, config) -> dict:
    """Read the local data files the job will use (before any model is loaded): a bad file fails at once. Returns
    the calibration documents by source."""
    if data_dir is None:
        return {}
    for key, spec in s.evals.items():
        EVALUATORS[key].check(spec, data_dir)
    sources = []
    if s.method is not None and not s.plan_path and s.method.needs_calibration(config):
        sources.append(s.calibration_source)
    if s.heal is not None:
        sources.append(s.heal["source"])
    return {source: calibration_documents(data_dir, source) for source in dict.fromkeys(sources)}
