"""Closed-form costs from the model config (and a compression plan): KV bytes, parameters, decode FLOPs.

The measured values in ``rap.measure`` must agree with these; tests assert it.
"""
from __future__ import annotations

from .architecture import sliding_layers
from .methods import get_method
from .shapes import AttentionShape, dense_attention_shape


def attention_shapes(config, plan: dict | None = None) -> list[AttentionShape]:
    """One ``AttentionShape`` per layer; a compression plan's method computes its own."""
    if plan is None or plan.get("method", "none") == "none":
        return [dense_attention_shape(config)] * config.num_hidden_layers
    return get_method(plan["method"]).attention_shapes(config, plan)


def mlp_weights(config) -> int:
    return 3 * config.hidden_size * config.intermediate_size


def kv_bytes_per_token(config, plan=None, bytes_per_element: int = 4) -> int:
    """Bytes one token adds to every layer's cache (before any sliding window drops old tokens)."""
    return sum(s.cache_elements for s in attention_shapes(config, plan)) * bytes_per_element


def tokens_held(config, context_len: int) -> list[int]:
    """Per layer, the tokens its cache holds after ``context_len`` tokens: all of them, or on a sliding-window layer
    at most ``sliding_window - 1`` (transformers' sliding cache keeps what the next token's window can see)."""
    window = getattr(config, "sliding_window", None)
    return [min(context_len, window - 1) if sliding else context_len for sliding in sliding_layers(config)]


def kv_bytes(config, context_len: int, plan=None, bytes_per_element: int = 4) -> int:
    """Bytes the whole cache holds after ``context_len`` tokens (sliding-window layers hold at most their window)."""
    return sum(s.cache_elements * n for s, n in zip(attention_shapes(config, plan), tokens_held(config, context_len),
                                                     strict=True)) * bytes_per_element


def attention_params(config, plan=None) -> int:
    return sum(s.params for s in attention_shapes(config, plan))


def total_params(config, plan=None) -> int:
    h, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    mlp_bias = (2 * config.intermediate_size + h) if getattr(config, "mlp_bias", False) else 0
    norms = 4 if config.model_type == "gemma3_text" else 2  # Gemma 3 also norms after attention and after the MLP
    per_layer_rest = mlp_weights(config) + mlp_bias + norms * h  # MLP + RMSNorms
    lm_head = 0 if config.tie_word_embeddings else v * h
    return v * h + lm_head + attention_params(config, plan) + L * per_layer_rest + h


def attention_decode_flops(config, context_len: int, plan=None) -> int:
    """FLOPs of all attention modules for one new token after ``context_len`` tokens (a sliding-window layer attends
    to what its cache holds)."""
    # the new token attends to itself too
    return sum(2 * s.linear_weights + 2 * (held + 1) * (s.rebuild_weights + s.n_heads * (s.qk_dim + s.v_dim))
               for s, held in zip(attention_shapes(config, plan), tokens_held(config, context_len), strict=True))


def decode_flops(config, context_len: int, plan=None) -> int:
    """FLOPs (2 per multiply-add of matmuls; elementwise ops not counted, as FlopCounterMode does) of one decode
    step."""
    L = config.num_hidden_layers
    head = 2 * config.vocab_size * config.hidden_size
    return attention_decode_flops(config, context_len, plan) + 2 * L * mlp_weights(config) + head
