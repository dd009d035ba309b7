"""The transformers APIs that changed between the versions rap supports (5.23 to 5.25), in one place (5.25 changed
nothing rap uses).

5.24 renamed the cache argument of the model and attention forwards from ``past_key_values`` to ``cache``
(the old name is deprecated) and returns the cache as ``output.cache``. Everything in rap that hands a cache
to a model or reads one back goes through ``cache_kwargs`` and ``output_cache``, so no deprecated argument is
passed where the new one exists.
"""
from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaAttention

# Detected from the installed code rather than its version number (the decorators keep the signature).
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``model(ids, **cache_kwargs(cache))``: the cache under the installed transformers' argument name."""
    return {CACHE_ARG: cache}


def output_cache(output):
    """The cache a model forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    return getattr(output, CACHE_ARG)
