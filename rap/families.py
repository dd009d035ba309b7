"""The model families rap compresses, one record each: the attention class transformers builds for it (after its load
adapter, if it has one), whether it normalises q and k per head before RoPE, and the config of its tiny test model.
A new standard family is one record here plus a ``conf/model`` preset; the architecture gate, the tiny models of the
tests and the loaders read this table.

An adapter rewrites a loaded model into the layout the methods read, computing the same function: Phi-3 fuses q, k and
v into one ``qkv_proj``, which ``split_fused_qkv`` splits into the separate projections of an attention class that
computes what Phi-3's does (``MistralAttention``: Phi-3's attention plus its sliding window).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def split_fused_qkv(model) -> None:
    """Replace each layer's fused-qkv attention (Phi-3) by ``MistralAttention`` holding the same weights as separate
    q/k/v projections: views of the fused matrix, so no weight is copied. Phi-3 rotates the whole head
    (``partial_rotary_factor`` 1; the gate refuses less) and attends within ``config.sliding_window`` where set, as
    Mistral's attention does."""
    from transformers.models.mistral.modeling_mistral import MistralAttention

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sizes = [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
    for layer in model.model.layers:
        fused = layer.self_attn
        if not hasattr(fused, "qkv_proj"):
            continue
        with torch.device("meta"):  # no memory: its weights are replaced by the model's own
            attn = MistralAttention(cfg, fused.layer_idx)
        for proj, weight in zip((attn.q_proj, attn.k_proj, attn.v_proj), fused.qkv_proj.weight.split(sizes)):
            proj.weight = nn.Parameter(weight, requires_grad=fused.qkv_proj.weight.requires_grad)
        attn.o_proj = fused.o_proj
        layer.self_attn = attn


@dataclass(frozen=True)
class Family:
    """One model family (a transformers ``model_type``)."""

    model_type: str
    attention: str  # the attention class the methods compress (after ``adapter``)
    qk_norm: bool = False  # q_norm / k_norm over each head before RoPE
    tiny: dict = field(default_factory=dict)  # config of its tiny test model, beyond the common one
    adapter: Callable | None = None  # rewrites a loaded model into the layout above, computing the same function


GEMMA3_TINY = {"num_hidden_layers": 3, "sliding_window": 8, "query_pre_attn_scalar": 24,
               "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}

FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaAttention"),
    Family("mistral", "MistralAttention", tiny={"sliding_window": None}),
    Family("qwen2", "Qwen2Attention"),  # q/k/v biases built in
    Family("qwen3", "Qwen3Attention", qk_norm=True),
    # QK-norm, a sliding window on most layers, RoPE bases 10k (local) and 1M (global), its own softmax scale
    # (query_pre_attn_scalar), scaled embeddings and four norms per layer. Tiny: local, local, global.
    Family("gemma3_text", "Gemma3Attention", qk_norm=True, tiny=GEMMA3_TINY),
    # fused qkv_proj, split at load; a sliding window of 4 on the tiny model so the window is exercised
    Family("phi3", "MistralAttention", tiny={"sliding_window": 4}, adapter=split_fused_qkv),
)}

# Families whose layers are not all RoPE layers: some attend without position embeddings (NoPE), so no RoPE pair
# there has a frequency to keep.
NOPE_FAMILIES = {"llama4": "Llama 4", "llama4_text": "Llama 4", "smollm3": "SmolLM3"}


def adapt(model):
    """Apply the model's family adapter, if any (in place); returns ``model``."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is not None and family.adapter is not None:
        family.adapter(model)
    return model
