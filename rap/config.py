"""OmegaConf resolvers the Hydra configs use (registered on import: run.py and the tests import this module)."""
from __future__ import annotations

import sys

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf


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


def tag_option(value, default, prefix: str = "-") -> str:
    """A run-name tag's part for an option added after runs with that tag existed: ``<prefix><value>``, or nothing
    at the option's default, so that the names of runs at the default stay as they were."""
    return "" if str(value) == str(default) else f"{prefix}{value}"


def grouping(group_size) -> str:
    """A Palu grouping as labels name it: ``joint`` for 0, ``head`` for 1, else ``g<size>`` (capped at the KV
    heads when the model has fewer; the plan and the report label record the grouping that ran)."""
    g = int(group_size)
    return "joint" if g <= 0 else "head" if g == 1 else f"g{g}"


class CheckOutputDir(Callback):
    """Before Hydra creates a job's folder (which fails with a stack trace), check that the output folder can be
    written, and end with rap's one sentence if not."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder) -> None:
        from .errors import RapError
        from .files import writable_dir

        try:
            writable_dir(folder)
        except RapError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)
OmegaConf.register_new_resolver("grouping", grouping, replace=True)
OmegaConf.register_new_resolver("heal_tag", heal_tag, replace=True)
OmegaConf.register_new_resolver("tag_option", tag_option, replace=True)
