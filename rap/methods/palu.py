"""Palu-style low-rank KV cache: W_k and W_v are factored per group of KV heads into a down-projection (the
cached latent) and an up-projection. RoPE sits between the key up-projection and the scores, so K must be
rebuilt from its latent for every cached token at every step, then rotated: the overhead RAP removes. V's
up-projection is absorbed into W_o (attention weights multiply the latent)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..architecture import STATIC_ROPE_TYPES, rope_types
from ..calibration import GradientSettings, calibration_for, weight_gradients, whitening_grams
from ..errors import ConfigError, PlanError
from ..naming import default_size, grouping_words, option, whiten_size
from ..shapes import AttentionShape, has_latent_o_bias, has_qkv_bias, qk_norm_params
from .attention import CompressedAttention, latent_o_proj, layer_rope, linear
from .base import Method, register
from .lowrank import check_decomposition, fisher_uniform_ranks, group_factors, group_size_for
from .selection import kv_budget
from .validation import entry, positive_int


class LowRankAttention(CompressedAttention):
    """The cache holds a K latent (G_k groups of rank r_k) and a V latent (G_v groups of rank r_v), nothing else.

    Parameters
    ----------
    attn : the original attention module (weights are copied).
    k_latent, v_latent : ``(down, up)`` with down (G·r, hidden) and up (G, g·d, r) (``lowrank.group_factors``).
    rotary : the model's rotary embedding (this layer's ``inv_freq`` and ``attention_scaling`` are copied).

    A QK-norm model's q_norm is applied to the queries and its k_norm to every rebuilt key (over the full head, as
    the original does), before RoPE.

    Every tensor lives on the original attention's device, as a parameter or a (non-persistent) buffer, so the
    module runs where its layer was placed and moves with ``.to()``.
    """

    def __init__(self, attn: nn.Module, k_latent, v_latent, rotary: nn.Module):
        super().__init__(attn)
        self.q_proj = linear(attn.q_proj.weight, attn.q_proj.bias)
        k_down, k_up = k_latent
        self.k_heads, self.r_k = k_up.shape[0], k_up.shape[2]
        self.k_proj = linear(k_down.to(attn.k_proj.weight), None)
        self.k_up = nn.Parameter(k_up.transpose(1, 2).contiguous().to(attn.k_proj.weight))  # (G, r, g·d)
        self.k_bias = nn.Parameter(attn.k_proj.bias.detach().clone()) if attn.k_proj.bias is not None else None
        v_down, v_up = v_latent
        self.v_heads, self.r_v = v_up.shape[0], v_up.shape[2]
        self.v_proj = linear(v_down.to(attn.v_proj.weight), None)
        self.o_proj = latent_o_proj(attn, v_up)
        self.q_norm = copy.deepcopy(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = copy.deepcopy(attn.k_norm) if hasattr(attn, "k_norm") else None
        dev = attn.q_proj.weight.device  # the rotary module may sit on another device than this layer
        inv_freq, self.rope_scale = layer_rope(rotary, attn)
        self.register_buffer("inv_freq", inv_freq.detach().float().to(dev, copy=True), persistent=False)
        # cos/sin for cache positions 0..n-1, grown by doubling
        self.register_buffer("cos_table", torch.empty(0, 2 * self.inv_freq.shape[0], device=dev), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, 2 * self.inv_freq.shape[0], device=dev), persistent=False)

    def _cos_sin(self, n: int, dtype):
        if self.cos_table.shape[0] < n:
            size = max(n, 2 * self.cos_table.shape[0])
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq.float()[None]
            emb = torch.cat((freqs, freqs), -1)
            self.cos_table, self.sin_table = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return self.cos_table[:n].to(dtype), self.sin_table[:n].to(dtype)

    def project(self, x, position_embeddings, position_ids=None):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, -1, self.head_dim)
        q = (self.q_norm(q) if self.q_norm is not None else q).transpose(1, 2)
        c_k = self.k_proj(x).view(*shape, self.k_heads, self.r_k).transpose(1, 2)
        c_v = self.v_proj(x).view(*shape, self.v_heads, self.r_v).transpose(1, 2)
        return q, c_k, c_v  # RoPE waits for the rebuilt keys (expand)

    uses_cache_slots = True  # RoPE at cache slots: the queries' slots start at ``past``

    def expand(self, q, c_k, c_v, past: int = 0):
        b, _, n, _ = c_k.shape
        d = self.head_dim
        k = c_k @ self.k_up  # the rebuild: (b, G, n, g·d), every cached token, every step
        k = k.view(b, self.k_heads, n, -1, d).transpose(2, 3).reshape(b, self.n_kv, n, d)
        if self.k_bias is not None:
            k = k + self.k_bias.view(1, self.n_kv, 1, d)
        if self.k_norm is not None:
            k = self.k_norm(k)
        # RoPE at cache slots (slot i holds the i-th cached token; a static cache has unfilled, masked slots after
        # them): scores depend only on query-key offsets, which this keeps, also under left padding. A sliding-window
        # layer returns at most window - 1 earlier tokens before the new ones, so the queries sit in its last slots.
        s = q.shape[2]
        first = min(past, n - s)
        cos, sin = self._cos_sin(max(n, first + s), q.dtype)
        qc, qs = cos[first:first + s], sin[first:first + s]
        cos, sin = cos[:n], sin[:n]
        return q * qc + rotate_half(q) * qs, k * cos + rotate_half(k) * sin, c_v


@register
@dataclass
class Palu(Method):
    """Palu-style low-rank K and V at the same KV-cache budget as RAP.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache bytes removed, as for RAP: the K and V latents of a layer hold as many elements per
        token as RAP's n_kv · (2P + n_v), with P and n_v RAP's kept pairs and V channels.
    decomposition : str
        ``whiten`` (Palu's default, SVD-LLM: SVD of W·S with S the Cholesky factor of the calibration XᵀX, computed
        as the eigendecomposition of W·XᵀX·Wᵀ, ``lowrank.factorize``), or ``svd`` of the weights.
    group_size : int
        KV heads per latent: 1 is per head (Palu's M-LRD), 4 the default (G-LRD; capped at the head count, so
        joint on models with at most 4 KV heads), 0 joint over all heads (J-LRD).
    rank_allocation : str
        ``fisher_uniform`` (Palu's default): each k_proj and v_proj module is scored by the mean over its weights of
        sqrt(E[g²]), and one budget shared by all K and V modules is split in proportion to the scores, each
        rank capped at the group's full width. ``uniform``: RAP's budget in every module.
    round_to : int
        Round every rank to a multiple of this (Palu rounds to 32). 1 (the default) keeps the KV bytes exactly
        equal to RAP's; larger values change the total by up to round_to/2 per module.
    floor : int
        Minimum rank per module.
    gradients : GradientSettings or None
        How the Fisher pass's backward runs (memory savers that change no value; the job passes its settings).
    """

    decomposition: str = "whiten"
    group_size: int = 4
    rank_allocation: str = "fisher_uniform"
    round_to: int = 1
    floor: int = 1
    gradients: GradientSettings | None = None
    name = "palu"
    order = 2
    examples = ({}, {"group_size": 1, "decomposition": "svd"}, {"rank_allocation": "uniform", "decomposition": "svd"})

    @classmethod
    def refusal(cls, config) -> str | None:
        if not rope_types(config) <= set(STATIC_ROPE_TYPES):
            return (f"Palu recomputes RoPE tables for its rebuilt keys, which needs a static RoPE type "
                    f"({', '.join(STATIC_ROPE_TYPES)}); this model uses {', '.join(sorted(rope_types(config)))}.")
        return None

    @classmethod
    def bench_options(cls, head_dim: int, round_to: int) -> dict:
        return {"decomposition": "svd", "rank_allocation": "uniform", "round_to": round_to}

    @classmethod
    def label(cls, row) -> str:
        size = whiten_size(row)
        decomposition = str(option(row, "decomposition")) + (f" on {size}" if size != default_size(row) else "")
        return (f"Palu ({decomposition}, {grouping_words(option(row, 'group_size', 4))}, "
                f"{option(row, 'rank_allocation')})")

    def needs_calibration(self, config=None) -> bool:
        return self.decomposition == "whiten" or self.rank_allocation == "fisher_uniform"

    def validate(self, config) -> None:
        check_decomposition(self.decomposition)
        if self.rank_allocation == "fisher":
            raise ConfigError("rank_allocation=fisher (separate K and V budgets, no square root) was replaced by "
                              "Palu's own rule; use fisher_uniform.")
        if self.rank_allocation not in ("uniform", "fisher_uniform"):
            raise ConfigError(f"Unknown rank_allocation '{self.rank_allocation}'; use fisher_uniform or uniform.")
        if self.round_to < 1 or self.floor < 1:
            raise ConfigError(f"round_to={self.round_to} and floor={self.floor} must be at least 1.")
        group_size_for(config.num_key_value_heads, self.group_size)
        super().validate(config)

    def make_plan(self, model, calibration=None) -> dict:
        self.validate(model.config)
        if self.needs_calibration() and calibration is None:
            raise ConfigError("Palu with whiten or fisher_uniform needs calibration data; pass calibration=<token "
                              "batch>.")
        cfg, layers = model.config, model.model.layers
        d, L = layers[0].self_attn.head_dim, len(layers)
        n_pairs, n_v = kv_budget(self.ratio, d)
        g = group_size_for(cfg.num_key_value_heads, self.group_size)
        cap = min(g * d, cfg.hidden_size)
        k_ranks, v_ranks = [min(g * 2 * n_pairs, cap)] * L, [min(g * n_v, cap)] * L
        if self.rank_allocation == "fisher_uniform":
            grads = weight_gradients(model, calibration_for(calibration, "fisher"), kinds=("fisher",), rows=False,
                                     settings=self.gradients)
            scores = [f.sqrt().mean().item() for i in range(L) for f in (grads["fisher_k"][i], grads["fisher_v"][i])]
            ranks = fisher_uniform_ranks(scores, sum(k_ranks) + sum(v_ranks), cap, self.floor)
            k_ranks, v_ranks = ranks[0::2], ranks[1::2]
        if self.round_to > 1:
            k_ranks, v_ranks = ([min(cap, max(self.round_to, round(r / self.round_to) * self.round_to)) for r in rs]
                                for rs in (k_ranks, v_ranks))
        whiten = calibration_for(calibration, "whiten")
        tensors = {}
        for i, gram in whitening_grams(model, whiten, self.decomposition == "whiten"):
            a = layers[i].self_attn
            for n, rank in (("k", k_ranks[i]), ("v", v_ranks[i])):
                down, up = group_factors(getattr(a, f"{n}_proj").weight, d, g, rank, gram)
                tensors.update({f"{n}_down.{i}": down, f"{n}_up.{i}": up})
            del gram  # this layer's Gram is freed before the next layer's is computed
        return {"method": "palu", "ratio": self.ratio, "decomposition": self.decomposition, "group_size": g,
                "rank_allocation": self.rank_allocation, "round_to": self.round_to, "head_dim": d,
                "layers": [{"k_rank": k, "v_rank": v} for k, v in zip(k_ranks, v_ranks)], "tensors": tensors}

    @staticmethod
    def apply(model, plan: dict):
        t = plan["tensors"]
        for i, layer in enumerate(model.model.layers):
            layer.self_attn = LowRankAttention(layer.self_attn, (t[f"k_down.{i}"], t[f"k_up.{i}"]),
                                               (t[f"v_down.{i}"], t[f"v_up.{i}"]), model.model.rotary_emb)
        return model

    @staticmethod
    def check_plan(config, plan: dict) -> dict[str, tuple]:
        d, nkv, h = plan["head_dim"], config.num_key_value_heads, config.hidden_size
        g = positive_int(entry(plan, "group_size", "the plan"), "group_size", nkv)
        if nkv % g:
            raise PlanError(f"group_size={g} does not divide the {nkv} KV heads")
        tensors = {}
        for i, lp in enumerate(plan["layers"]):
            for n in ("k", "v"):
                r = positive_int(entry(lp, f"{n}_rank", f"layer {i}"), f"layer {i} {n}_rank", min(g * d, h))
                tensors.update({f"{n}_down.{i}": (nkv // g * r, h), f"{n}_up.{i}": (nkv // g, g * d, r)})
        return tensors

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
            params = weights + rebuild + bias + qk_norm_params(config)  # k_norm runs over every rebuilt key too
            shapes.append(AttentionShape(nh, d, rv, G * (rk + rv), weights, params, rebuild))
        return shapes
