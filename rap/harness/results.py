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

from ..errors import ConfigError, RapError
from ..files import write_atomic

CONFIG_FILE, METRICS_FILE, PER_SAMPLE_FILE, PLAN_FILE = "config.yaml", "metrics.json", "per_sample.json", "plan.json"
FAILURE_FILE = "failure.json"  # written instead of metrics.json when a started job fails or is interrupted


BASELINE_METHOD = {"name": "none", "tag": "none"}
# Where a result is written and mirrored (W&B or none; the run name is derived from the rest, and a name that gained
# a part, like -cal-c4, still finds the result), and how it was computed (threads, recorded as env_threads;
# memory savers that change no value), not what it is: a moved result, or one rerun with other such settings, still
# counts as finished.
LOCATION_KEYS = ("out_dir", "sweep", "run_name", "tracking", "threads", "gradient_checkpointing", "loss_chunk")
# Settings that cannot change an uncompressed result.
UNUSED_BY_BASELINE = ("method", "criterion", "calibration", "heal")
# Config groups added later, at their off setting.
GROUP_DEFAULTS = {"cache": "dynamic", "heal": "none", "press": "none"}
# Options added later whose absence meant one value: results from before them read that value.
IMPLIED = {("eval", "ppl", "windows"): "first"}


class RunFolder:
    """One job's result folder, the only reader of its files: analysis and the experiments open nothing by name.

    ``finished`` once ``metrics.json`` exists (the commit point); ``metrics``, ``per_sample``, ``config``, ``plan`` and
    ``failure`` read the files (None where absent)."""

    FILES = (CONFIG_FILE, METRICS_FILE, PER_SAMPLE_FILE, PLAN_FILE)  # what a result is rebuilt from (results/)

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return (self.path / METRICS_FILE).exists()

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    def _json(self, name: str) -> dict | None:
        f = self.path / name
        return json.loads(f.read_text()) if f.exists() else None

    def metrics(self) -> dict | None:
        return self._json(METRICS_FILE)

    def per_sample(self) -> dict | None:
        return self._json(PER_SAMPLE_FILE)

    def plan(self) -> dict | None:
        return self._json(PLAN_FILE)

    def failure(self) -> dict | None:
        return self._json(FAILURE_FILE)

    def config(self) -> dict | None:
        f = self.path / CONFIG_FILE
        return OmegaConf.to_container(OmegaConf.load(f)) if f.exists() else None

    @staticmethod
    def find(*roots, finished: bool = False) -> list[RunFolder]:
        """Every job folder under ``roots`` (any depth; Hydra's own folders left out): those holding a config or
        metrics, or only the finished ones."""
        names = (METRICS_FILE,) if finished else (METRICS_FILE, CONFIG_FILE)
        found = {p.parent for root in roots for name in names for p in Path(root).rglob(name)
                 if ".hydra" not in p.parts}
        return [RunFolder(p) for p in sorted(found)]


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
