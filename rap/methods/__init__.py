"""Compression methods: one per file, one registry, and the public API (compress, save_plan, apply_plan)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .base import Method
from .rap import RAP

METHODS: dict[str, type[Method]] = {"rap": RAP}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'; choose one of none, {', '.join(METHODS)}.")
    return METHODS[name]


def compress(model, method: str = "rap", ratio: float = 0.3, calibration=None, **options):
    """Compress ``model`` in place and return it; the plan is kept on ``model.config.rap_plan``.

    ``calibration`` is a (n, seqlen) LongTensor of token ids (see ``rap.data.calibration_batch``);
    ``options`` are the method's dataclass fields (e.g. ``criterion="qk_energy"``).
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio={ratio} is outside [0, 1); it is the fraction of KV-cache dimensions removed.")
    cls = get_method(method)
    try:
        m = cls(ratio=ratio, **options)
    except TypeError as e:
        raise ConfigError(f"Bad option for method '{method}': {e}.") from None
    return apply_plan(model, m.make_plan(model, calibration))


def apply_plan(model, plan: dict | str | Path):
    """Rebuild the compressed model from an uncompressed one and a plan (dict or JSON path)."""
    if not isinstance(plan, dict):
        plan = json.loads(Path(plan).read_text())
    if getattr(model.config, "rap_plan", None):
        raise ConfigError("This model is compressed already; apply a plan to an uncompressed model.")
    get_method(plan["method"]).apply(model, plan)
    model.config.rap_plan = plan
    return model


def get_plan(model) -> dict | None:
    return getattr(model.config, "rap_plan", None)


def save_plan(model, path: str | Path) -> None:
    plan = get_plan(model)
    if plan is None:
        raise ConfigError("The model carries no compression plan; compress it first.")
    Path(path).write_text(json.dumps(plan, indent=1))
