"""Base class of compression methods: ``make_plan`` chooses what to keep (the extension point);
``apply`` rebuilds the compressed model from a plan, so a saved plan reproduces the model exactly."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..architecture import check_config, check_method, head_dim
from ..shapes import AttentionShape
from .selection import kv_budget


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
        check_method(config, self.name)
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
