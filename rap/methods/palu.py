"""Palu-style low-rank KV cache: W_k and W_v are factored per group of KV heads into a down-projection (the
cached latent) and an up-projection. RoPE sits between the key up-projection and the scores, so K must be
rebuilt from its latent for every cached token at every step, then rotated: the overhead RAP removes. V's
up-projection is absorbed into W_o (attention weights multiply the latent)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..analytic import AttentionShape, has_latent_o_bias, has_qkv_bias
from ..calibration import attention_input_gram, weight_gradients
from ..errors import ConfigError
from .attention import CompressedAttention, _linear, latent_o_proj
from .base import Method
from .lowrank import group_factors, group_size_for, proportional_counts
from .selection import kv_budget


class LowRankAttention(CompressedAttention):
    """The cache holds a K latent (G_k groups of rank r_k) and a V latent (G_v groups of rank r_v), nothing else.

    Parameters
    ----------
    attn : the original attention module (weights are copied).
    k_latent, v_latent : ``(down, up)`` with down (G·r, hidden) and up (G, g·d, r) (``lowrank.group_factors``).
    rotary : the model's rotary embedding (its ``inv_freq`` and ``attention_scaling`` are copied).
    """

    def __init__(self, attn: nn.Module, k_latent, v_latent, rotary: nn.Module):
        super().__init__(attn)
        self.q_proj = _linear(attn.q_proj.weight, attn.q_proj.bias)
        k_down, k_up = k_latent
        self.k_heads, self.r_k = k_up.shape[0], k_up.shape[2]
        self.k_proj = _linear(k_down.to(attn.k_proj.weight), None)
        self.k_up = nn.Parameter(k_up.transpose(1, 2).contiguous().to(attn.k_proj.weight))  # (G, r, g·d)
        self.k_bias = nn.Parameter(attn.k_proj.bias.detach().clone()) if attn.k_proj.bias is not None else None
        v_down, v_up = v_latent
        self.v_heads, self.r_v = v_up.shape[0], v_up.shape[2]
        self.v_proj = _linear(v_down.to(attn.v_proj.weight), None)
        self.o_proj = latent_o_proj(attn, v_up)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self._table = None  # cos/sin for cache positions 0..n-1, grown by doubling

    def _cos_sin(self, n: int, dtype):
        if self._table is None or self._table[0].shape[0] < n:
            size = max(n, 2 * (0 if self._table is None else self._table[0].shape[0]))
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None]
            emb = torch.cat((freqs, freqs), -1)
            self._table = (emb.cos() * self.rope_scale, emb.sin() * self.rope_scale)
        return self._table[0][:n].to(dtype), self._table[1][:n].to(dtype)

    def project(self, x, position_embeddings):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, -1, self.head_dim).transpose(1, 2)
        c_k = self.k_proj(x).view(*shape, self.k_heads, self.r_k).transpose(1, 2)
        c_v = self.v_proj(x).view(*shape, self.v_heads, self.r_v).transpose(1, 2)
        return q, c_k, c_v  # RoPE waits for the rebuilt keys (expand)

    def expand(self, q, c_k, c_v):
        b, _, n, _ = c_k.shape
        d = self.head_dim
        k = c_k @ self.k_up  # the rebuild: (b, G, n, g·d), every cached token, every step
        k = k.view(b, self.k_heads, n, -1, d).transpose(2, 3).reshape(b, self.n_kv, n, d)
        if self.k_bias is not None:
            k = k + self.k_bias.view(1, self.n_kv, 1, d)
        # RoPE at positions counted within the cache: scores depend only on query-key offsets, which this keeps
        # (also under left padding, where every row's positions are shifted alike).
        cos, sin = self._cos_sin(n, q.dtype)
        qc, qs = cos[n - q.shape[2]:], sin[n - q.shape[2]:]
        return q * qc + rotate_half(q) * qs, k * cos + rotate_half(k) * sin, c_v


@dataclass
class Palu(Method):
    """Palu-style low-rank K and V at the same KV-cache budget as RAP.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache bytes removed, as for RAP: the K latents hold g · 2P and the V latents g · n_v
        dims per group of g KV heads, with P and n_v RAP's kept pairs and V channels.
    decomposition : str
        ``svd`` of the weights, or ``whiten`` (SVD-LLM: SVD of W·S with S the Cholesky factor of the
        calibration XᵀX; diagonal jitter if not positive-definite).
    group_size : int
        KV heads per latent: 1 is per head, 4 the default (capped at the head count), 0 joint over all heads.
    rank_allocation : str
        ``uniform`` or ``fisher``: ranks per layer in proportion to the Fisher information of each k_proj
        (v_proj), same total for K and for V separately, at least ``floor``.
    floor : int
        Minimum rank per layer with ``fisher``.
    """

    decomposition: str = "whiten"
    group_size: int = 4
    rank_allocation: str = "uniform"
    floor: int = 8
    name = "palu"

    def needs_calibration(self) -> bool:
        return self.decomposition == "whiten" or self.rank_allocation == "fisher"

    def validate(self, config) -> None:
        if self.decomposition not in ("svd", "whiten"):
            raise ConfigError(f"Unknown decomposition '{self.decomposition}'; use svd or whiten.")
        if self.rank_allocation not in ("uniform", "fisher"):
            raise ConfigError(f"Unknown rank_allocation '{self.rank_allocation}'; use uniform or fisher.")
        group_size_for(config.num_key_value_heads, self.group_size)
        super().validate(config)

    def make_plan(self, model, calibration=None) -> dict:
        self.validate(model.config)
        if self.needs_calibration() and calibration is None:
            raise ConfigError("Palu with whiten or fisher needs calibration data; pass calibration=<token batch>.")
        cfg, layers = model.config, model.model.layers
        d, L = layers[0].self_attn.head_dim, len(layers)
        n_pairs, n_v = kv_budget(self.ratio, d)
        g = group_size_for(cfg.num_key_value_heads, self.group_size)
        cap = min(g * d, cfg.hidden_size)
        k_ranks, v_ranks = [min(g * 2 * n_pairs, cap)] * L, [min(g * n_v, cap)] * L
        if self.rank_allocation == "fisher":
            grads = weight_gradients(model, calibration)
            k_ranks = proportional_counts([f.sum().item() for f in grads["fisher_k"]], sum(k_ranks), self.floor, cap)
            v_ranks = proportional_counts([f.sum().item() for f in grads["fisher_v"]], sum(v_ranks), self.floor, cap)
        grams = attention_input_gram(model, calibration) if self.decomposition == "whiten" else [None] * L
        tensors = {}
        for i, layer in enumerate(layers):
            a = layer.self_attn
            for n, rank in (("k", k_ranks[i]), ("v", v_ranks[i])):
                down, up = group_factors(getattr(a, f"{n}_proj").weight, d, g, rank, grams[i])
                tensors.update({f"{n}_down.{i}": down, f"{n}_up.{i}": up})
        return {"method": "palu", "ratio": self.ratio, "decomposition": self.decomposition, "group_size": g,
                "rank_allocation": self.rank_allocation, "head_dim": d,
                "layers": [{"k_rank": k, "v_rank": v} for k, v in zip(k_ranks, v_ranks)], "tensors": tensors}

    @staticmethod
    def apply(model, plan: dict):
        t = plan["tensors"]
        for i, layer in enumerate(model.model.layers):
            layer.self_attn = LowRankAttention(layer.self_attn, (t[f"k_down.{i}"], t[f"k_up.{i}"]),
                                               (t[f"v_down.{i}"], t[f"v_up.{i}"]), model.model.rotary_emb)
        return model

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        h, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, plan["head_dim"]
        G = nkv // plan["group_size"]
        qkv_bias = has_qkv_bias(config)
        shapes = []
        for lp in plan["layers"]:
            rk, rv = lp["k_rank"], lp["v_rank"]
            weights = h * nh * d + h * G * rk + h * G * rv + nh * rv * h
            rebuild = nkv * d * rk  # up-projection of every cached token's K latent
            bias = (nh * d + nkv * d) * qkv_bias + h * has_latent_o_bias(config)
            shapes.append(AttentionShape(nh, d, rv, G * (rk + rv), weights, weights + rebuild + bias, rebuild))
        return shapes
