"""A job's result folder: its file names, what identifies a result (so a finished one is skipped), the lock a
job holds while it computes, the commit of a finished result, and the flat form analysis and W&B read.

Files: ``config.yaml`` (the resolved job config), ``metrics.json`` (flat keys, ``rap.harness.job``; written last,
by one atomic rename: the commit point), ``per_sample.json`` (per-window NLL, per-document scores, heal curves),
``plan.json`` (and ``plan.safetensors``) for compressed runs, ``failure.json`` instead of ``metrics.json`` when a
started job failed, and ``.rap.lock`` / ``.rap.owner`` while a job computes.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from .. import costs
from ..architecture import layer_kinds, layer_rope_bases
from ..errors import ConfigError, RapError
from ..files import write_atomic

CONFIG_FILE, METRICS_FILE, PER_SAMPLE_FILE, PLAN_FILE = "config.yaml", "metrics.json", "per_sample.json", "plan.json"
FAILURE_FILE = "failure.json"  # written instead of metrics.json when a started job fails or is interrupted


BASELINE_METHOD = {"name": "none", "tag": "none"}
# Where a result is written and mirrored (W&B or none), and how it was computed (threads, recorded as env_threads;
# memory savers that change no value), not what it is: a moved result, or one rerun with other such settings, still
# counts as finished.
LOCATION_KEYS = ("out_dir", "sweep", "tracking", "threads", "gradient_checkpointing", "loss_chunk")
# Settings that cannot change an uncompressed result.
UNUSED_BY_BASELINE = ("method", "criterion", "calibration", "heal")
GROUP_DEFAULTS = {"cache": "dynamic", "heal": "none"}  # config groups added later, at their off setting
# Options added later whose absence meant one value: results from before them read that value.
IMPLIED = {("eval", "ppl", "windows"): "first"}


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
    for path, value in IMPLIED.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(path[-1], value)
    if "ratio" in out:
        out["ratio"] = float(out["ratio"])
    return out


def finished(out_dir: Path, config: dict) -> bool:
    """True when ``out_dir`` holds metrics for this exact config. Metrics for another config are never overwritten."""
    metrics_path, config_path = out_dir / METRICS_FILE, out_dir / CONFIG_FILE
    if not metrics_path.exists():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.exists() else None
    if identity(saved) != identity(config):
        raise ConfigError(f"{out_dir} already holds results of a different config; set out_dir=... or sweep=... to "
                          "write elsewhere.")
    return True


def read_metrics(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / METRICS_FILE).read_text())


def commit(out_dir: Path, results: dict, per_sample: dict) -> None:
    """Write the finished result; ``metrics.json`` last, so the folder looks complete only once it is."""
    write_atomic(out_dir / PER_SAMPLE_FILE, json.dumps(per_sample, separators=(",", ":")))
    write_atomic(out_dir / METRICS_FILE, json.dumps(results, indent=1, sort_keys=True))
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's record


def record_failure(out_dir: Path, error: BaseException) -> None:
    """Say why a started job stopped (for ``analysis.collect``); a failing write (full disk) is passed over, so the
    error reported is the one that stopped the job."""
    try:
        write_atomic(out_dir / FAILURE_FILE, json.dumps({"error": type(error).__name__, "message": str(error)[:2000],
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    except RapError:
        pass


def _holder(owner: Path) -> str:
    try:
        return owner.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextmanager
def job_lock(folder, label: str):
    """Hold ``<folder>/.rap.lock`` (an OS file lock, ``filelock``) while a job computes, so that two sweeps over the
    same folder, or parallel launcher workers, never compute one cell at once; the second waits, then finds the
    result. The kernel drops the lock when its holder dies, so a killed job never blocks the rerun; the owner file
    it leaves behind tells the rerun that it is taking over."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock, owner = FileLock(str(folder / ".rap.lock")), folder / ".rap.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[rap] {label}: waiting for {_holder(owner)}, which is computing this job", flush=True)
        lock.acquire()
    try:
        if owner.exists():
            print(f"[rap] {label}: taking over from {_holder(owner)}, which was killed before it finished", flush=True)
        write_atomic(owner, f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def lock_state(folder) -> str | None:
    """``running`` while a process holds the job's lock, ``killed`` when its holder died without releasing it (the
    owner file is left), None otherwise. Never blocks."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not (folder / ".rap.owner").exists():
        return None
    lock = FileLock(str(folder / ".rap.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "running"
    lock.release()
    return "killed"


def result_tables(results: dict, model_config, plan: dict | None, heal_curves: dict | None = None,
                  per_sample: dict | None = None) -> dict:
    """Per-task zero-shot results, per-layer kept widths (what the cache holds; each layer's kind, local or global,
    and RoPE base), when healed the training loss of every layer and step, and ``per_sample.json`` as tables
    (``ppl_windows``: each window's mean NLL; ``zeroshot_docs``: each document's scores), so that paired
    comparisons can be rebuilt from W&B as from the files; as DataFrames."""
    import pandas as pd

    tasks = sorted(k[len("n_"):] for k in results if k.startswith("n_"))
    per_task = pd.DataFrame([{"task": t, "acc": results.get(f"acc_{t}"), "acc_norm": results.get(f"acc_norm_{t}"),
                              "acc_stderr": results.get(f"acc_stderr_{t}"), "n": results[f"n_{t}"]} for t in tasks])
    shapes = costs.attention_shapes(model_config, plan)
    per_layer = pd.DataFrame([{"layer": i, "kind": kind, "rope_base": base, "qk_dim": s.qk_dim, "v_dim": s.v_dim,
                               "cache_elements_per_token": s.cache_elements}
                              for i, (s, kind, base) in enumerate(zip(shapes, layer_kinds(model_config),
                                                                      layer_rope_bases(model_config), strict=True))])
    tables = {"per_task": per_task, "per_layer": per_layer}
    if heal_curves is not None:
        tables["heal_loss"] = pd.DataFrame([{"layer": i, "step": j, "loss": v}
                                            for i, curve in enumerate(heal_curves["loss"])
                                            for j, v in enumerate(curve)])
    return {**tables, **per_sample_tables(per_sample or {})}


def per_sample_tables(per_sample: dict) -> dict:
    import pandas as pd

    out = {}
    if per_sample.get("ppl"):
        out["ppl_windows"] = pd.DataFrame({"window": range(len(per_sample["ppl"]["window_nll"])),
                                           "nll": per_sample["ppl"]["window_nll"]})
    docs = [{"task": task, "doc_id": d, **{m: s[m][j] for m in ("acc", "acc_norm") if m in s}}
            for task, s in (per_sample.get("zeroshot") or {}).items() for j, d in enumerate(s["doc_id"])]
    if docs:
        out["zeroshot_docs"] = pd.DataFrame(docs)
    return out


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
