"""Base class of token-eviction presses and their registry. A press scores every context token of every KV head once
the context is encoded (kvpress's leaderboard setting: before the question is read) and keeps each head's
highest-scoring ``1 - ratio`` of them; the evicted entries leave the cache tensors, so the memory is really freed.

Each layer's cached keys and values (whatever the layer caches: RAP's narrower keys, a latent) are gathered along the
token axis. Every KV head keeps the same count, so the tensors stay dense: the bytes the cache holds are the bytes of
the entries kept. The kept entries keep the RoPE rotation of their original positions, so the tokens that follow
must be given their own positions (``next_positions``), not the compacted length.

A press applies to caches whose every layer holds all the tokens it has seen (``DynamicCache``'s full-attention
layers): sliding-window layers and quantized caches are refused, in one sentence, for now.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConfigError

PRESSES: dict[str, type[Press]] = {}


def register(cls: type[Press]) -> type[Press]:
    """Enter ``cls`` in ``PRESSES`` under its ``name`` (a class decorator)."""
    PRESSES[cls.name] = cls
    return cls


@dataclass
class Press:
    """Token eviction after the context is encoded.

    Parameters
    ----------
    ratio : float
        Fraction of the context's tokens each KV head evicts, in [0, 1).
    """

    ratio: float = 0.0
    name = "base"
    reads_keys = False  # scores the cached keys themselves (meaningless on a latent cache)
    needs_queries = False  # scores with queries of the context, captured while it is encoded (``capture``)

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens) scores of one layer's cached entries; higher is kept."""
        raise NotImplementedError

    def layer_scores(self, attn, keys: torch.Tensor, captured) -> torch.Tensor:
        """``score`` for layer ``attn``; ``captured`` is what ``capture`` kept of its inputs (None if nothing)."""
        return self.score(keys, None)

    @contextmanager
    def capture(self, model, last: int = 64):
        """Encode the context inside this block: each attention layer's inputs for the last ``last`` tokens (the
        hidden states and RoPE tables) are kept for ``layer_scores``. Nothing is kept for presses that need no
        queries."""
        self._captured = {}
        if not self.needs_queries:
            yield
            return
        with self.capture_all(model, last):
            yield

    @contextmanager
    def capture_all(self, model, last: int | None):
        """Keep each attention layer's inputs (normed hidden states, RoPE tables) for the last ``last`` tokens of the
        forwards inside the block (every token when None) in ``self._captured``."""
        self._captured = {}
        part = slice(None) if last is None else slice(-last, None)

        def keep(i):
            def hook(module, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                cos, sin = kwargs["position_embeddings"]
                self._captured[i] = (hidden[:, part].detach(), (cos[:, part], sin[:, part]))
            return hook

        handles = [layer.self_attn.register_forward_pre_hook(keep(i), with_kwargs=True)
                   for i, layer in enumerate(model.model.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def keep_count(self, tokens: int) -> int:
        """Tokens each head keeps of ``tokens``: ``tokens - floor(ratio * tokens)``, at least one."""
        return max(1, tokens - math.floor(self.ratio * tokens))

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0 <= self.ratio < 1:
            raise ConfigError(f"press.ratio={self.ratio!r} is outside [0, 1).")

    def check_config(self, config) -> None:
        """What the model config alone refuses (before anything loads)."""
        from ..architecture import sliding_layers

        if any(sliding_layers(config)):
            raise ConfigError(f"press={self.name} evicts from caches that hold every token seen; this "
                              f"{config.model_type} model has sliding-window layers, whose caches keep a window of "
                              "their own, which rap's presses do not evict from yet.")

    def prepare(self, model, cache, ids) -> None:
        """Work a press does with the encoded context before scoring (KVzip's reconstruction pass); ``ids`` are the
        context's token ids."""

    def compress(self, model, cache, ids: torch.Tensor | None = None) -> None:
        """Evict in place: each layer of ``cache`` keeps, per KV head, its ``keep_count`` highest-scoring tokens, in
        their original order. Records the tokens seen (``cache.rap_seen_tokens``) for ``next_positions``. ``ids``:
        the context's token ids, for presses that read them (``prepare``)."""
        self.validate()
        check_pressable(model, cache, self)
        if hasattr(cache, "rap_seen_tokens"):
            raise ConfigError("This cache was pressed already; a press compresses a context once, after it is encoded.")
        self.prepare(model, cache, ids)
        captured = getattr(self, "_captured", {})
        if self.needs_queries and not captured:
            raise ConfigError(f"press={self.name} scores tokens with the context's last queries; encode the context "
                              "inside press.capture(model).")
        seen = cache.layers[0].keys.shape[-2]
        keep = self.keep_count(seen)
        for i, layer in enumerate(cache.layers):
            if keep < layer.keys.shape[-2]:
                scores = self.layer_scores(model.model.layers[i].self_attn, layer.keys, captured.get(i))
                idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
                layer.keys, layer.values = gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx)
        cache.rap_seen_tokens = seen


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, heads, tokens, width) at ``idx`` (batch, heads, kept) along the token axis: new dense storage,
    so the evicted entries' memory is released."""
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1])).contiguous()


def check_pressable(model, cache, press: Press) -> None:
    """Refuse, in one sentence, a cache the press cannot compact faithfully."""
    press.check_config(model.config)
    for layer in cache.layers:
        if not isinstance(getattr(layer, "keys", None), torch.Tensor) or hasattr(layer, "_quantized_keys"):
            raise ConfigError(f"press={press.name} compacts full-precision cache tensors; evict before quantizing "
                              "(a quantized cache with a press is not supported yet).")
    method = (getattr(model, "rap_plan", None) or {}).get("method")
    if press.reads_keys and method in ("palu", "elitekv"):
        raise ConfigError(f"press={press.name} scores cached keys, but {method} caches a low-rank latent, whose norm "
                          "is not a key's; use a press that does not read the keys (streaming).")


def next_positions(cache, new_tokens: int, batch: int = 1) -> torch.Tensor:
    """(batch, new_tokens) RoPE positions of the tokens that follow a pressed cache: after every token seen, not
    after the entries kept."""
    start = getattr(cache, "rap_seen_tokens", None)
    if start is None:
        start = cache.get_seq_length()
    device = cache.layers[0].keys.device
    return torch.arange(start, start + new_tokens, device=device).expand(batch, -1)


def advance(cache, new_tokens: int) -> None:
    """Count ``new_tokens`` more tokens as seen, after a forward that appended them to a pressed cache."""
    if hasattr(cache, "rap_seen_tokens"):
        cache.rap_seen_tokens += new_tokens


def kept_fraction(cache) -> float:
    """Tokens kept over tokens seen, the mean over layers and heads, from the cache's tensors."""
    seen = getattr(cache, "rap_seen_tokens", None) or cache.layers[0].keys.shape[-2]
    return sum(layer.keys.shape[-2] for layer in cache.layers) / (len(cache.layers) * seen)
