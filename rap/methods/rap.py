"""RAP: RoPE-aligned pruning. Whole RoPE pairs are removed from W_k and the same rows of W_q (every query
head of the GQA group); V channels from W_v with the matching input columns of W_o. The attention then runs
with a smaller head dim and the cache holds 2P key and n_v value channels per KV head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import criteria
from ..calibration import attention_output_gram
from ..analytic import AttentionShape, has_o_bias, has_qkv_bias, head_dim
from ..errors import ConfigError
from .attention import PrunedAttention
from .base import Method
from .selection import allocate, kept_count, least_squares_map, top_per_head


@dataclass
class RAP(Method):
    """RoPE-aligned pruning.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache dims removed: K keeps P = round((1-ratio)·d/2) pairs, V round((1-ratio)·d) channels.
    criterion : str
        Scoring criterion (``rap.criteria``); ``rope_blind`` is the pair-blind control.
    allocation : str
        ``uniform`` (same counts in every layer) or ``global`` (ranked across layers, same total).
    floor : int
        With ``global``: minimum pairs (and V channels) per layer.
    round_to : int
        Round kept K and V dims to a multiple of this (8 helps GPU kernels); 1 keeps the exact count.
    prune_k, prune_v : bool
        Prune keys / values (both by default).
    v_refit : bool
        Refit W_o by least squares on calibration attention outputs so the kept V channels also carry
        what the dropped ones did (exact linear compensation; needs calibration data). The maps are saved
        with the plan (``plan.safetensors``).
    seed : int
        For the ``random`` criterion.
    """

    criterion: str = "key_energy"
    allocation: str = "uniform"
    floor: int = 1
    round_to: int = 1
    prune_k: bool = True
    prune_v: bool = True
    v_refit: bool = False
    seed: int = 0
    name = "rap"

    def make_plan(self, model, calibration=None) -> dict:
        d = model.model.layers[0].self_attn.head_dim
        if d % 2:
            raise ConfigError(f"head_dim={d} is odd, so keys cannot be split into RoPE pairs.")
        n_pairs = kept_count(self.ratio, d // 2, self.round_to, unit_width=2) if self.prune_k else d // 2
        n_v = kept_count(self.ratio, d, self.round_to) if self.prune_v else d
        if n_pairs < 1 or n_v < 1:
            raise ConfigError(f"ratio={self.ratio} leaves no RoPE pair or V channel of head_dim={d}; lower the ratio.")
        s = criteria.score(self.criterion, model, calibration, seed=self.seed)
        k_counts = allocate(s["k"], n_pairs, self.allocation, self.floor)
        v_counts = allocate(s["v"], n_v, self.allocation, self.floor)
        layers = []
        for i in range(len(model.model.layers)):
            if self.criterion == "rope_blind":
                # Single channels by key energy, partners ignored: 2P channels per KV head.
                k_channels = top_per_head(s["k_channels"][i], 2 * k_counts[i])
                k_pairs = None
            else:
                k_pairs = top_per_head(s["k"][i], k_counts[i])
                k_channels = [p + [c + d // 2 for c in p] for p in k_pairs]
            layers.append({"k_pairs": k_pairs, "k_channels": k_channels, "v_channels": top_per_head(s["v"][i], v_counts[i])})
        plan = {"method": "rap", "ratio": self.ratio, "criterion": self.criterion, "allocation": self.allocation,
                "round_to": self.round_to, "v_refit": self.v_refit, "head_dim": d, "layers": layers}
        if self.v_refit:
            if calibration is None:
                raise ConfigError("v_refit needs calibration data; pass calibration=<token batch>.")
            rep = model.model.layers[0].self_attn.num_key_value_groups
            grams = attention_output_gram(model, calibration)
            plan["tensors"] = {f"o_maps.{i}": torch.stack([least_squares_map(g, lp["v_channels"][h // rep])
                                                           for h, g in enumerate(grams[i])])
                               for i, lp in enumerate(layers)}
        return plan

    @staticmethod
    def apply(model, plan: dict):
        tensors = plan.get("tensors", {})
        for i, (layer, lp) in enumerate(zip(model.model.layers, plan["layers"], strict=True)):
            layer.self_attn = PrunedAttention(layer.self_attn, lp["k_channels"], lp["v_channels"], tensors.get(f"o_maps.{i}"))
        return model

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        h, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        shapes = []
        for lp in plan["layers"]:
            nk, nv = len(lp["k_channels"][0]), len(lp["v_channels"][0])
            weights = h * nh * nk + h * nkv * nk + h * nkv * nv + nh * nv * h
            bias = (nh * nk + nkv * nk + nkv * nv) * has_qkv_bias(config) + h * has_o_bias(config)
            width = max(nk, nv)  # the kernel runs on zero-padded equal widths (PrunedAttention.forward)
            shapes.append(AttentionShape(nh, nkv, width, width, nk + nv, weights, weights + bias))
        return shapes
