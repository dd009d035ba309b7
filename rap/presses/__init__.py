"""Token-eviction presses, one per file, each entered in ``PRESSES`` where it is defined (``@register``), in
kvpress's shape (a ``score`` per press, one base that applies it) without depending on kvpress. ``none`` is no press."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import PRESSES, Press, advance, kept_fraction, next_positions

for _module in pkgutil.iter_modules(__path__):  # each press module registers its press as it is imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PRESSES", "Press", "advance", "kept_fraction", "make_press", "next_positions"]


def make_press(name: str, **options) -> Press | None:
    """The press ``name`` with ``options`` (None for ``none``); one sentence for an unknown name or option."""
    if name == "none":
        return None
    if name not in PRESSES:
        raise ConfigError(f"Unknown press '{name}'; choose one of none, {', '.join(PRESSES)}.")
    try:
        press = PRESSES[name](**options)
    except TypeError as e:
        raise ConfigError(f"Bad option for press '{name}': {e}.") from None
    press.validate()
    return press
