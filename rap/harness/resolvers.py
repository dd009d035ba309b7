"""OmegaConf resolvers the Hydra configs use (registered on import: run.py and the tests import this module)."""
from __future__ import annotations

import sys

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ..naming import grouping


def is_baseline_ratio(ratio) -> bool:
    """Ratio 0 removes nothing: the job is the uncompressed baseline, whatever the method."""
    try:
        return float(ratio) == 0.0
    except (TypeError, ValueError):
        return False


def run_tag(method_tag: str, ratio) -> str:
    """``<method tag>_r<ratio>`` with the ratio as a float (``0`` and ``0.0`` name one folder), and ``none`` as
    the method at ratio 0, so a sweep over methods computes the baseline once. A ratio that is not a number is
    kept as written; the job then rejects it with its own message."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        return f"{method_tag}_r{ratio}"
    return f"{'none' if r == 0.0 else method_tag}_r{r}"


def heal_tag(tag: str, ratio) -> str:
    """The heal group's run-name tag, except at ratio 0: there is nothing to heal, so the baseline keeps one folder."""
    return "" if is_baseline_ratio(ratio) else tag


def calibration_tag(source, ratio) -> str:
    """``-cal-<source>`` for a compressed run calibrated (and so healed) on other text than ``wiki``: its folder is
    not the wiki run's. Nothing at ratio 0, which reads no calibration text, or for wiki, so older names stay."""
    return "" if is_baseline_ratio(ratio) or str(source) == "wiki" else f"-cal-{source}"


def tag_option(value, default, prefix: str = "-") -> str:
    """A run-name tag's part for an option added after runs with that tag existed: ``<prefix><value>``, or nothing
    at the option's default, so that the names of runs at the default stay as they were."""
    return "" if str(value) == str(default) else f"{prefix}{value}"


def flag_tag(value, tag: str) -> str:
    """A run-name tag's part for a boolean option added after runs existed: ``tag`` when it is on, else nothing."""
    return tag if str(value).lower() == "true" else ""


def hub_name(path) -> str:
    """A hub checkpoint's short name for result folders: the last part of its id or directory, lower-cased
    (``Qwen/Qwen3-8B`` -> ``qwen3-8b``); ``hub`` while no path is set (the job then asks for one)."""
    if path is None or not str(path).strip("/"):
        return "hub"
    return str(path).rstrip("/").split("/")[-1].lower()


def unknown_model_presets(argv: list[str], conf_dir) -> str | None:
    """One sentence for a ``model=<x>`` override that names no preset in ``conf/model`` (Hydra's own error says only
    that it could not find it), pointing a hub id or a directory at ``model=hub``; None when every choice exists."""
    from pathlib import Path

    presets = sorted(p.stem for p in (Path(conf_dir) / "model").glob("*.yaml"))
    for arg in argv:
        if not arg.startswith("model="):
            continue
        for choice in arg[len("model="):].split(","):
            if choice and choice not in presets:
                return (f"model={choice} is not a model preset ({', '.join(presets)}); for a hub id or a local "
                        f"directory use model=hub model.path={choice}.")
    return None


class CheckOutputDir(Callback):
    """Before Hydra creates a job's folder (which fails with a stack trace), check that the output folder can be
    written, and end with rap's one sentence if not."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder) -> None:
        from ..errors import RapError
        from ..files import writable_dir

        try:
            writable_dir(folder)
        except RapError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)
OmegaConf.register_new_resolver("grouping", grouping, replace=True)
OmegaConf.register_new_resolver("heal_tag", heal_tag, replace=True)
OmegaConf.register_new_resolver("tag_option", tag_option, replace=True)
OmegaConf.register_new_resolver("calibration_tag", calibration_tag, replace=True)
OmegaConf.register_new_resolver("flag_tag", flag_tag, replace=True)
OmegaConf.register_new_resolver("hub_name", hub_name, replace=True)
