"""Compression methods, one per file, and their registry (plans are built, saved and applied in ``rap.plans``)."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .elitekv import EliteKV
from .kvlatent import KVLatent
from .palu import Palu
from .rap import RAP
from .selection import check_ratio

METHODS: dict[str, type[Method]] = {"rap": RAP, "palu": Palu, "elitekv": EliteKV, "kvlatent": KVLatent}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'; choose one of none, {', '.join(METHODS)}.")
    return METHODS[name]


def make_method(method: str, ratio: float, shared: dict | None = None, **options) -> Method:
    """The method's dataclass at ``ratio`` with ``options`` and the ``shared`` run settings it takes
    (``Method.from_options``); a clear error for a bad ratio or option."""
    ratio = check_ratio(ratio)
    cls = get_method(method)
    try:
        return cls.from_options(ratio, options, **(shared or {}))
    except TypeError as e:
        raise ConfigError(f"Bad option for method '{method}': {e}.") from None
