"""Scoring criteria: which RoPE pairs (K) and channels (V) matter. Higher score = keep.

Each criterion returns ``{"k": [per layer (n_kv, d/2)], "v": [per layer (n_kv, d)]}``; pair i of a head
is channels (i, i + d/2). ``rope_blind`` also returns ``"k_channels"`` (n_kv, d), scored one channel at a time.
"""
from __future__ import annotations

import torch

from . import calibration
from .errors import ConfigError


def _per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.float().reshape(n_heads, -1)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(heads, d) channel scores -> (heads, d/2) pair scores."""
    half = x.shape[-1] // 2
    return x[..., :half] + x[..., half:]


def _shape(model):
    a = model.model.layers[0].self_attn
    return model.config.num_key_value_heads, a.head_dim, a.num_key_value_groups


def _energy(model, batch) -> dict:
    """``calibration.channel_energy`` with q and k as RoPE sees them: after q_norm/k_norm on QK-norm models."""
    e = calibration.channel_energy(model, batch)
    return {"q": e.get("q_post", e["q"]), "k": e.get("k_post", e["k"]), "v": e["v"]}


def key_energy(model, batch, seed=0):
    """E[k_i² + k_{i+d/2}²] per pair (after k_norm, if any); E[v_c²] per value channel."""
    nkv, _, _ = _shape(model)
    e = _energy(model, batch)
    return {"k": [_pairs(_per_head(k, nkv)) for k in e["k"]], "v": [_per_head(v, nkv) for v in e["v"]]}


def qk_energy(model, batch, seed=0):
    """Query-aware: E‖q_pair‖² summed over the group's query heads times E‖k_pair‖². Output-aware V:
    E[v_c²] times the squared norm of the W_o columns channel c feeds, over the group's heads."""
    nkv, d, rep = _shape(model)
    e = _energy(model, batch)
    k, v = [], []
    for i, layer in enumerate(model.model.layers):
        q = _pairs(_per_head(e["q"][i], nkv * rep)).view(nkv, rep, -1).sum(1)
        k.append(q * _pairs(_per_head(e["k"][i], nkv)))
        w_o = layer.self_attn.o_proj.weight.float().pow(2).sum(0).view(nkv, rep, d).sum(1)
        v.append(_per_head(e["v"][i], nkv) * w_o)
    return {"k": k, "v": v}


def weight_norm(model, batch=None, seed=0):
    """Frobenius norm of the pair's rows of W_k; row norms of W_v. Needs no data."""
    nkv, d, _ = _shape(model)
    k, v = [], []
    for layer in model.model.layers:
        a = layer.self_attn
        k.append(_pairs(a.k_proj.weight.float().pow(2).sum(1).view(nkv, d)).sqrt())
        v.append(a.v_proj.weight.float().norm(dim=1).view(nkv, d))
    return {"k": k, "v": v}


def _gradient_scores(model, batch, kind, gradients=None):
    nkv, d, _ = _shape(model)
    g = calibration.weight_gradients(model, batch, kinds=(kind,), rows=True, settings=gradients)
    return {"k": [_pairs(x.view(nkv, d)) for x in g[f"{kind}_k"]], "v": [x.view(nkv, d) for x in g[f"{kind}_v"]]}


def fisher(model, batch, seed=0, gradients=None):
    """Mean squared gradient of the LM loss, summed over the pair's (channel's) weight rows."""
    return _gradient_scores(model, batch, "fisher", gradients)


def gradient(model, batch, seed=0, gradients=None):
    """First-order Taylor: mean |w·g| summed over the pair's (channel's) weight rows."""
    return _gradient_scores(model, batch, "taylor", gradients)


def attn_error(model, batch, seed=0):
    """Mean |pre-softmax logit change| when the pair is dropped; V: mean |attention output| x W_o column norm."""
    return calibration.attention_errors(model, batch)


def random_scores(model, batch=None, seed=0):
    """Seeded uniform scores (the floor any criterion must beat)."""
    nkv, d, _ = _shape(model)
    g = torch.Generator().manual_seed(seed)
    L = len(model.model.layers)
    return {"k": [torch.rand(nkv, d // 2, generator=g) for _ in range(L)],
            "v": [torch.rand(nkv, d, generator=g) for _ in range(L)]}


def rope_blind(model, batch, seed=0):
    """The control: key energy of single channels, blind to RoPE pairs (V as ``key_energy``)."""
    nkv, _, _ = _shape(model)
    e = _energy(model, batch)
    return {"k_channels": [_per_head(k, nkv) for k in e["k"]], "k": [_pairs(_per_head(k, nkv)) for k in e["k"]],
            "v": [_per_head(v, nkv) for v in e["v"]]}


CRITERIA = {"key_energy": key_energy, "qk_energy": qk_energy, "weight_norm": weight_norm, "fisher": fisher,
            "gradient": gradient, "attn_error": attn_error, "random": random_scores, "rope_blind": rope_blind}
NEEDS_DATA = {"key_energy", "qk_energy", "fisher", "gradient", "attn_error", "rope_blind"}


GRADIENT_CRITERIA = {"fisher", "gradient"}  # read LM-loss gradients (``calibration.weight_gradients``)


def score(name: str, model, batch, seed: int = 0, gradients=None) -> dict:
    """The criterion's per-layer scores; ``gradients`` (``calibration.GradientSettings``) is how a gradient
    criterion's backward runs."""
    if name not in CRITERIA:
        raise ConfigError(f"Unknown criterion '{name}'; choose one of {', '.join(CRITERIA)}.")
    if name in NEEDS_DATA and batch is None:
        raise ConfigError(f"Criterion '{name}' needs calibration data; pass calibration=<token batch>.")
    extra = {"gradients": gradients} if name in GRADIENT_CRITERIA else {}
    return CRITERIA[name](model, batch, seed=seed, **extra)
