"""W&B tracking, offline by default, with all of its files inside the job's output dir.

``metrics.json`` is the source of truth; W&B mirrors it. Upload offline runs later with
``wandb sync <out_dir>/wandb/offline-run-*``.
"""
from __future__ import annotations

import os
from pathlib import Path


class Tracker:
    """No-op tracker (``tracking=none``)."""

    def log_summary(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run per job: flattened config, summary metrics, ``finish()`` at the end."""

    def __init__(self, out_dir: Path, project: str, group: str, name: str, config: dict,
                 mode: str | None = None, entity: str | None = None):
        import wandb

        wdir = Path(out_dir) / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        # Runs go to <out_dir>/wandb; staging, cache and settings too, not the home dir.
        # A user's WANDB_MODE wins over the configured mode.
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data")):
            os.environ[var] = str(wdir / sub)
        mode = os.environ.get("WANDB_MODE") or mode or "offline"
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, config=config,
                              dir=str(out_dir), mode=mode, reinit="finish_previous")

    def log_summary(self, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self.run.summary.update(scalars)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(backend: str, **kwargs) -> Tracker:
    if backend == "none":
        return Tracker()
    if backend == "wandb":
        return WandbTracker(**kwargs)
    from .errors import ConfigError

    raise ConfigError(f"Unknown tracking backend '{backend}'; use tracking=wandb or tracking=none.")
