"""What one layer's attention holds and computes, from the model config: the dense shape and the bias and norm
parameters every method's own shapes build on (``Method.attention_shapes``)."""
from __future__ import annotations

from dataclasses import dataclass

from .architecture import has_qk_norm, head_dim


@dataclass(frozen=True)
class AttentionShape:
    """What one layer's attention holds and computes.

    Parameters
    ----------
    n_heads : query heads (each scores every cached token).
    qk_dim, v_dim : per-query-head widths of the decode attention (score dot product, attended values).
    cache_elements : elements the layer caches per token (all heads, keys and values or latents).
    linear_weights : weight elements applied once per new token (2 FLOPs each).
    params : all attention parameters (weights, biases, factors).
    rebuild_weights : weight elements applied to every cached token at every step (Palu's key rebuild).
    """

    n_heads: int
    qk_dim: int
    v_dim: int
    cache_elements: int
    linear_weights: int
    params: int
    rebuild_weights: int = 0


def qk_norm_params(config) -> int:
    """Weights of a QK-norm model's q_norm and k_norm (one gain per channel of a head each)."""
    return 2 * head_dim(config) if has_qk_norm(config) else 0


def has_qkv_bias(config) -> bool:
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def has_o_bias(config) -> bool:
    return config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))


def has_latent_o_bias(config) -> bool:
    """W_o with a value up-projection absorbed has a bias if it had one or V had one (it moves into W_o's)."""
    return has_o_bias(config) or has_qkv_bias(config)


def dense_attention_shape(config) -> AttentionShape:
    """The uncompressed attention of the Llama/Mistral/Qwen2 family."""
    h, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    weights = 2 * h * nh * d + 2 * h * nkv * d
    bias = (nh * d + 2 * nkv * d) * has_qkv_bias(config) + h * has_o_bias(config)
    return AttentionShape(nh, d, d, 2 * nkv * d, weights, weights + bias + qk_norm_params(config))
