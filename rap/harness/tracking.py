"""W&B tracking, offline by default, with all of its files inside the job's output dir.

``metrics.json`` is the source of truth; W&B mirrors it. Upload offline runs later with
``wandb sync <out_dir>/wandb/offline-run-*``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import costs
from ..architecture import layer_kinds, layer_rope_bases
from ..errors import ConfigError, RapError


class Tracker:
    """No-op tracker (``tracking=none``)."""

    def log_summary(self, metrics: dict) -> None:
        pass

    def log_tables(self, tables: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_api_key() -> bool:
    """A key in ``WANDB_API_KEY`` or in the netrc entry for the W&B host, where ``wandb login`` puts it."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(urlparse(_base_url()).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def online_or_offline(mode: str) -> str:
    """``online`` only when it can work: without a key, one sentence before any compute; with a key but no route to
    the server, offline with a one-line warning (else wandb retries for minutes). The local result is written either
    way."""
    if mode != "online":
        return mode
    if not has_api_key():
        raise RapError("W&B online mode needs an API key and none is set; run `wandb login` or set WANDB_API_KEY, "
                       "or use tracking.mode=offline (or WANDB_MODE=offline), or tracking=none.")
    if not reachable(_base_url()):
        print(f"[rap] warning: W&B server {_base_url()} is not reachable; this run is logged offline "
              "(upload it later with `wandb sync`).", flush=True)
        return "offline"
    return mode


def init_wandb_run(out_dir, project: str, name: str, group: str | None = None, config: dict | None = None,
                   mode: str | None = None, entity: str | None = None, tags: list[str] | None = None,
                   job_type: str | None = None):
    """``wandb.init`` with every file under ``<out_dir>/wandb`` and a one-sentence error when it cannot start.
    A user's ``WANDB_MODE`` wins over ``mode``; offline is the default."""
    import wandb

    wdir = Path(out_dir) / "wandb"
    wdir.mkdir(parents=True, exist_ok=True)
    # Runs go to <out_dir>/wandb; staging, cache and settings too, not the home dir.
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):
        os.environ[var] = str(wdir / sub)
    mode = online_or_offline(os.environ.get("WANDB_MODE") or mode or "offline")
    try:
        return wandb.init(project=project, entity=entity, group=group, name=name, config=config, tags=tags,
                          job_type=job_type, dir=str(out_dir), mode=mode, reinit="finish_previous")
    except wandb.errors.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RapError(f"W&B could not start a {mode} run ({first}); run `wandb login`, or set "
                       "tracking.mode=offline (or WANDB_MODE=offline), or tracking=none.") from None


class WandbTracker(Tracker):
    """One W&B run per job: group = the experiment (sweep), tags = method, criterion and model, config = the
    full flattened job config; the summary mirrors metrics.json and tables hold per-task and per-layer results."""

    def __init__(self, out_dir: Path, project: str, group: str, name: str, config: dict,
                 mode: str | None = None, entity: str | None = None, tags: list[str] | None = None):
        self.run = init_wandb_run(out_dir, project=project, name=name, group=group, config=config, mode=mode,
                                  entity=entity, tags=tags, job_type="job")

    def log_summary(self, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self.run.summary.update(scalars)

    def log_tables(self, tables: dict) -> None:
        """``{name: pandas.DataFrame}`` as ``wandb.Table``s."""
        import wandb

        self.run.log({name: wandb.Table(dataframe=df) for name, df in tables.items() if df is not None and len(df)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(backend: str, **kwargs) -> Tracker:
    if backend == "none":
        return Tracker()
    if backend == "wandb":
        return WandbTracker(**kwargs)
    raise ConfigError(f"Unknown tracking backend '{backend}'; use tracking=wandb or tracking=none.")


def _log_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version),
    then LevelDB log framing in 32 KiB blocks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)."""
    import struct

    data, block, pos = Path(path).read_bytes(), 32768, 7
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    records, partial = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    return records


def read_offline_run(run_dir: str | Path) -> dict:
    """``{"config", "summary", "history_keys", "exit_code"}`` of an offline run folder (``offline-run-*``), decoded
    with wandb's own record schema: what ``wandb sync`` would upload. ``exit_code`` is None when the run log has no
    exit record (its process was killed: W&B shows such a run as crashed, never finished)."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    config, summary, history_keys, exit_code = {}, {}, set(), None
    for raw in _log_records(log):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
        elif kind == "exit":
            exit_code = rec.exit.exit_code
        elif kind == "history":
            keys = (i.key or (i.nested_key[0] if i.nested_key else "") for i in rec.history.item)
            history_keys.update(k for k in keys if k and not k.startswith("_"))
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items() if not k.startswith("_")}
    return {"config": config, "summary": {k: v for k, v in summary.items() if not k.startswith("_")},
            "history_keys": history_keys, "exit_code": exit_code}


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
