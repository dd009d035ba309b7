"""Base class of compression methods and their registry. A method is one file: ``make_plan`` chooses what to keep
(the extension point), ``apply`` rebuilds the compressed model from a plan (so a saved plan reproduces the model
exactly), and the class carries the rest of what the harness and analysis know of it: the models it refuses, its
benchmark options, its report label and order, its kept-frequency map, and the option sets the contract tests run
(``tests/test_methods.py``). ``@register`` enters it in ``METHODS`` where it is defined."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..architecture import check_config, head_dim
from ..errors import ModelError
from ..shapes import AttentionShape
from .selection import kv_budget

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Enter ``cls`` in ``METHODS`` under its ``name`` (a class decorator); the registry lists methods by ``order``."""
    METHODS[cls.name] = cls
    for name in sorted(METHODS, key=lambda n: METHODS[n].order):
        METHODS[name] = METHODS.pop(name)
    return cls


@dataclass
class Method:
    """A KV-cache compression method.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache dimensions removed, in [0, 1).
    """

    ratio: float = 0.0
    name = "base"
    recorded = ()  # plan keys that say how an option resolved as it ran (``auto``): results record them
    order = 9  # its place in reports (the baseline is 0)
    exact_at_zero = True  # ratio 0 reproduces the original logits (the contract tests hold it to that)
    # Small option sets the contract tests run, each on every tiny architecture the method takes; calibration is
    # passed to all of them.
    examples: tuple[dict, ...] = ({},)

    @classmethod
    def refusal(cls, config) -> str | None:
        """Why this method cannot compress a model with ``config`` faithfully, in one sentence; None if it can.
        ``check_config`` has passed already: this is what the method needs beyond it."""
        return None

    @classmethod
    def check_supported(cls, config) -> None:
        """Raise ``ModelError`` with ``refusal``'s sentence."""
        reason = cls.refusal(config)
        if reason:
            raise ModelError(reason)

    @classmethod
    def bench_options(cls, head_dim: int, round_to: int) -> dict | None:
        """Data-free options with the method's real shapes, for timing (``rap.harness.bench``): which pairs or ranks
        are kept does not change the timing. None: the method cannot run with widths rounded to ``round_to``."""
        return {} if round_to == 1 else None

    @classmethod
    def label(cls, row) -> str:
        """The variant as a reader names it (e.g. "Palu (whiten, per head, fisher_uniform)"), from a flat result row:
        its config as ``cfg.<key>`` and its metrics (``rap.naming`` reads them)."""
        return str(row.get("cfg.method.tag", cls.name))

    @staticmethod
    def panel_label(plan: dict) -> str:
        """A short title for the method's panel of the kept-frequency figure."""
        return plan.get("method", "?")

    @staticmethod
    def kept_frequencies(plan: dict) -> np.ndarray | None:
        """(layers, d/2): per layer, how much of each original RoPE frequency (pair index) the plan keeps, as a
        fraction of KV heads; None for a method that keeps no RoPE frequency as such (low-rank keys)."""
        return None

    @classmethod
    def from_options(cls, ratio: float, options: dict, **shared) -> Method:
        """The method at ``ratio`` with ``options`` (its own config group) and those of the ``shared`` settings
        (a run's ``criterion``, ``seed``) that it takes."""
        taken = {f.name for f in fields(cls)}
        return cls(ratio=ratio, **options, **{k: v for k, v in shared.items() if k in taken})

    @classmethod
    def resolve_options(cls, options: dict, device) -> dict:
        """``options`` as they will run on ``device``: what decides a result, so what its config records."""
        return options

    def run_tags(self) -> list[str]:
        """Labels for the tracker (W&B tags) beyond the method and the model."""
        return []

    @classmethod
    def plan_record(cls, plan: dict) -> dict:
        """The ``recorded`` choices of ``plan``, for the run's results."""
        return {k: plan[k] for k in cls.recorded if k in plan}

    def validate(self, config) -> None:
        """Cheap checks from the model config alone (options, the KV budget at ``ratio``), so a bad setting fails
        before any model is loaded or timed. ``make_plan`` runs it first; methods with options extend it."""
        check_config(config)
        self.check_supported(config)
        kv_budget(self.ratio, head_dim(config))

    def needs_calibration(self, config=None) -> bool:
        """Whether ``make_plan`` reads calibration data for a model with ``config`` (None: any model); the job loads
        it only then."""
        return True

    def make_plan(self, model, calibration=None) -> dict:
        """Return a JSON-serialisable plan (``method``, ``ratio`` and per-layer choices)."""
        raise NotImplementedError

    @staticmethod
    def apply(model, plan: dict):
        """Replace the attention modules of ``model`` (in place) as ``plan`` says; returns ``model``."""
        raise NotImplementedError

    @staticmethod
    def check_plan(config, plan: dict) -> dict[str, tuple]:
        """Check every per-layer field ``apply`` reads against ``config`` (raise ``PlanError``: plans are untrusted
        input, ``rap.methods.validation``); return the tensors the plan must hold, name -> shape."""
        raise NotImplementedError

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        """Closed-form shapes of each layer's compressed attention (for the closed-form costs, ``rap.costs``)."""
        raise NotImplementedError
