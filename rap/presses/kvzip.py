"""KVzip (Kim et al., 2025): the model is asked to repeat its context, and each context token is scored by the most
attention any query of the repetition, in any query head of its KV head, pays it. It costs a second pass as long as
the context (plus the instruction), and it is the quality reference KVzap learns to predict. As kvpress's
``KVzipPress`` in its plain form (one chunk, the softmax weights, not KVzip+'s output-norm weighting), with its
instruction. The repetition pass reads the cache and is cut off it again before the eviction."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..compat import cache_kwargs
from ..errors import ConfigError
from .base import Press, register
from .snapkv import window_queries

INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"


def repetition_attention(attn, keys: torch.Tensor, captured, n: int) -> torch.Tensor:
    """(batch, heads, m, n): the attention weights the m repetition queries (``captured``: the layer's inputs for
    them) give the n context tokens, each a softmax over every key the query sees (context, instruction, earlier
    repetition)."""
    hidden, position_embeddings = captured
    q = window_queries(attn, hidden, position_embeddings).float()
    heads, m, total = q.shape[1], q.shape[2], keys.shape[-2]
    k = keys.float().repeat_interleave(heads // keys.shape[1], dim=1)
    positions = torch.arange(total, device=keys.device)
    later = positions[None, :] > positions[total - m:, None]
    return (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(later, float("-inf")).softmax(-1)[..., :n]


def group_max(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(batch, heads, m, n) -> (batch, n_kv, n): the largest over the m queries and each KV head's query heads."""
    b, heads, _, n = x.shape
    return x.amax(2).view(b, n_kv, heads // n_kv, n).amax(2)


@register
@dataclass
class KVzip(Press):
    """Context-reconstruction scores; ``instruction`` is what precedes the repeated context (kvpress's wording), and
    ``ratio`` is as ``Press``."""

    instruction: str = INSTRUCTION
    name = "kvzip"
    reads_keys = True
    needs_queries = True

    def bind(self, tokenizer) -> KVzip:
        """Tokenize the instruction with the model's tokenizer (no special tokens); returns the press."""
        self._instruction_ids = tokenizer(self.instruction, add_special_tokens=False, return_tensors="pt").input_ids
        return self

    @contextmanager
    def capture(self, model, last: int = 0):
        yield  # nothing to keep while the context is encoded: ``prepare`` runs its own pass

    def prepare(self, model, cache, ids) -> None:
        if ids is None or not hasattr(self, "_instruction_ids"):
            raise ConfigError("press=kvzip repeats the context: pass its token ids to compress, and bind the press to "
                              "the model's tokenizer (press.bind(tokenizer)).")
        n, b = ids.shape[1], ids.shape[0]
        repeat = torch.cat([self._instruction_ids.to(ids.device).expand(b, -1), ids], 1)
        m = repeat.shape[1]
        positions = torch.arange(n, n + m, device=ids.device).expand(b, -1)
        with super().capture(model, last=m), torch.no_grad():
            model(repeat, use_cache=True, position_ids=positions, **cache_kwargs(cache))
        inputs, self._captured = self._captured, {}
        for i, layer in enumerate(cache.layers):
            self._captured[i] = self.reconstruction_scores(model.model.layers[i].self_attn, layer.keys, inputs[i], n)
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    @staticmethod
    def reconstruction_scores(attn, keys: torch.Tensor, captured, n: int) -> torch.Tensor:
        """(batch, KV heads, n): per context token, the largest attention weight a repetition query of any query head
        of the KV head gives it (softmax over every key the query sees)."""
        return group_max(repetition_attention(attn, keys, captured, n), keys.shape[1])

    def layer_scores(self, attn, keys: torch.Tensor, captured) -> torch.Tensor:
        return captured  # ``prepare`` left each layer's scores
