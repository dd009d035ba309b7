"""The one architecture gate: what the compression methods can reproduce faithfully, checked before any model is
changed (``rap.compress``, ``apply_plan`` and the job all run it). Anything else stops with one sentence naming
what is missing.

Supported: decoder layers whose attention projects q, k and v separately, applies HF rotate_half RoPE to the whole
head (optionally after a per-head RMS norm, ``q_norm``/``k_norm``: Qwen3, Gemma 3), scores with its own softmax
scale, and may attend within a sliding window on some layers (Gemma 3's local layers, each with its own RoPE base).
"""
from __future__ import annotations

from .errors import ModelError
from .families import FAMILIES, NOPE_FAMILIES

# model_type -> the attention class the methods compress (``rap.families``).
ATTENTION_CLASSES = {t: f.attention for t, f in FAMILIES.items()}
ROPE_MODEL_TYPES = tuple(FAMILIES)
QK_NORM_TYPES = tuple(t for t, f in FAMILIES.items() if f.qk_norm)
# RoPE types whose tables are fixed by the config (inv_freq and one attention scaling): Palu recomputes them.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Multimodal wrappers around a supported text model: their decoder is not ``model.model.layers``.
TEXT_ONLY = {"gemma3": "gemma3_text (a text-only Gemma 3 checkpoint, e.g. model=gemma3-1b or model=gemma3-270m)"}


def check_even_head_dim(d: int) -> None:
    if d % 2:
        raise ModelError(f"head_dim={d} is odd, so keys cannot be split into RoPE pairs.")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def has_qk_norm(config) -> bool:
    """Whether the attention RMS-normalises each query and key head before RoPE (Qwen3, Gemma 3)."""
    return getattr(config, "model_type", None) in QK_NORM_TYPES


def rope_parameter_sets(config) -> list[dict]:
    """The config's RoPE parameters: one dict, or one per layer type when layers have their own (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or "rope_theta" in params:
        return [params]
    return [p for p in params.values() if isinstance(p, dict)]


def rope_types(config) -> set[str]:
    """Every RoPE type the config uses."""
    return {p.get("rope_type", "default") for p in rope_parameter_sets(config)} or {"default"}


def unsupported_layout(model_type: str) -> ModelError:
    return ModelError(f"Model type '{model_type}' does not use rotary position embeddings in the supported layout; "
                      f"supported model types: {', '.join(ROPE_MODEL_TYPES)}.")


def sliding_layers(config) -> list[bool]:
    """Per layer, whether it attends within ``config.sliding_window`` (and its cache holds at most that window)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not window:
        return [False] * config.num_hidden_layers
    if types is None:  # Mistral-style: one window for every layer
        return [True] * config.num_hidden_layers
    return [t == "sliding_attention" for t in types]


def layer_kinds(config) -> list[str]:
    """Per layer, ``local`` (sliding window) or ``global``: how per-layer tables and frequency maps tell them apart."""
    return ["local" if s else "global" for s in sliding_layers(config)]


def layer_rope_bases(config) -> list[float]:
    """Per layer, the RoPE base (theta) its rotary tables use: Gemma 3's local and global layers have their own."""
    params = getattr(config, "rope_parameters", None) or {}
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if "rope_theta" in params:
        return [float(params["rope_theta"])] * config.num_hidden_layers
    return [float((params.get(t) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))) for t in types]


def check_config(config) -> None:
    """The checks that need the config alone (the job runs them before loading any weights)."""
    mt = getattr(config, "model_type", "?")
    if getattr(config, "kv_lora_rank", None):
        raise ModelError(f"{mt} caches a shared low-rank KV latent (MLA, kv_lora_rank={config.kv_lora_rank}), not "
                         "per-head RoPE keys, so there are no RoPE pairs to prune.")
    if mt in TEXT_ONLY:
        raise ModelError(f"Model type '{mt}' is a multimodal wrapper; compress its text model as {TEXT_ONLY[mt]}.")
    no_rope = getattr(config, "no_rope_layers", None)
    if mt in NOPE_FAMILIES or (no_rope and not all(no_rope)):
        raise ModelError(f"{NOPE_FAMILIES.get(mt, mt)} has layers that attend without RoPE (NoPE), whose key dims have "
                         "no frequency to keep, so rap compresses only models whose every layer uses RoPE.")
    if mt not in ROPE_MODEL_TYPES:
        raise unsupported_layout(mt)
    check_even_head_dim(head_dim(config))
    partial = [p.get("partial_rotary_factor", 1.0) for p in rope_parameter_sets(config)]
    partial.append(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    if min(partial) < 1.0:
        raise ModelError(f"{mt} rotates only part of each head (partial_rotary_factor={min(partial)}); RoPE pairs of "
                         "the "
                         "unrotated dims have no frequency, which the methods need.")
    if getattr(config, "attn_logit_softcapping", None):
        raise ModelError(f"{mt} soft-caps attention logits (attn_logit_softcapping), which the compressed attention "
                         "does not apply.")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{mt} is configured with bidirectional attention; the compressed attention is causal.")


def check_model(model) -> None:
    """Refuse, with one sentence, any model whose attention the methods cannot compress faithfully."""
    cfg = model.config
    check_config(cfg)
    mt = cfg.model_type
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "rotary_emb"):
        raise unsupported_layout(mt)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        name = type(attn).__name__
        if getattr(model, "rap_plan", None) is None and name != ATTENTION_CLASSES[mt]:
            if any(hasattr(attn, p) for p in ("qkv_proj", "Wqkv", "c_attn")):
                fix = ("; rap.families.adapt(model) splits them without changing what the model computes (rap's "
                       "loaders do it)") if FAMILIES[mt].adapter else ""
                raise ModelError(f"Layer {i} of this {mt} model projects q, k and v fused ({name}); the methods need "
                                 f"separate q/k/v projections{fix}.")
            raise ModelError(f"Layer {i} of this {mt} model has the attention class {name}, not transformers' "
                             f"{ATTENTION_CLASSES[mt]}, so rap cannot tell what it computes.")
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ModelError(f"Model type '{mt}' has no separate q/k/v/o projections, which compression needs.")
        if hasattr(attn, "sinks"):
            raise ModelError(f"Layer {i} of this {mt} model has attention sinks, which the compressed attention does "
                             "not apply.")
        check_even_head_dim(attn.head_dim)
        if has_qk_norm(cfg) != (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            raise ModelError(f"Layer {i} of this {mt} model {'lacks' if has_qk_norm(cfg) else 'has'} the q_norm/k_norm "
                             f"that {mt} models {'have' if has_qk_norm(cfg) else 'lack'}.")
