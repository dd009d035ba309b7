"""Compression methods, one per file, each entered in the registry ``METHODS`` where it is defined (``@register``);
plans are built, saved and applied in ``rap.plans``. A new method is its module (found here by itself), its
``conf/method`` file and its section in docs/methods.md."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import METHODS, Method
from .selection import check_ratio

for _module in pkgutil.iter_modules(__path__):  # each method module registers its method as it is imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "get_method", "make_method"]


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
