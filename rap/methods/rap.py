"""RAP: RoPE-aligned pruning. Whole RoPE pairs are removed from W_k and the same rows of W_q (every query
head of the GQA group); V channels from W_v with the matching input columns of W_o. The attention then runs
with a smaller head dim and the cache holds 2P key and n_v value channels per KV head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import criteria
from ..architecture import check_config, has_qk_norm, head_dim, layer_kinds, layer_rope_bases, sliding_layers
from ..calibration import (
    GradientSettings,
    attention_output_gram,
    calibration_for,
    channel_energy,
    whitening_grams,
)
from ..devices import model_device
from ..errors import ConfigError, PlanError
from ..naming import low_rank_v_words, option, qk_norm_words
from ..shapes import AttentionShape, has_latent_o_bias, has_o_bias, has_qkv_bias
from .attention import CompressedAttention, KeptHeadNorm, PairRope, full_width_qk, latent_o_proj, linear, linear_rows
from .base import Method, register
from .lowrank import check_decomposition, group_factors, group_size_for
from .selection import allocate, kv_budget, least_squares_map, top_per_head
from .validation import entry, per_head_indices, positive_int

QK_NORMS = ("exact", "kept")
DEFAULT_QK_NORM = "exact"  # measured against ``kept`` on Gemma 3 270M: docs/architectures.md


def resolve_qk_norm(qk_norm, config) -> str | None:
    """The QK-norm mode a plan runs with: None on models without q_norm/k_norm, else ``qk_norm`` or the default."""
    if qk_norm is not None and qk_norm not in QK_NORMS:
        raise ConfigError(f"qk_norm={qk_norm!r} is not one of {', '.join(QK_NORMS)} (or null for {DEFAULT_QK_NORM}).")
    if not has_qk_norm(config):
        return None
    return qk_norm or DEFAULT_QK_NORM


def qk_rho(energy: torch.Tensor, channels: list[list[int]]) -> torch.Tensor:
    """Per head, E[mean over the head of x²] / E[mean over its kept channels of x²], from the mean squared
    pre-norm projection per channel (heads·d,): the factor that rescales the kept channels' RMS to the full head's."""
    e = energy.float().view(len(channels), -1)
    kept = torch.stack([e[h, c].mean() for h, c in enumerate(channels)])
    return e.mean(1) / kept.clamp_min(1e-30)


def resolve_round_to(round_to, device) -> int:
    """``round_to`` as a number: ``auto`` is 8 on CUDA (cuDNN's attention takes widths that are multiples of 8; at
    other widths RAP ran slower than full width on an H100, docs/bench/gpu_h100.md) and 1 elsewhere."""
    if round_to == "auto":
        return 8 if torch.device(device).type == "cuda" else 1
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to={round_to!r} is not auto or a positive integer.")
    return round_to


@register
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
    round_to : int or "auto"
        Round kept K and V dims to a multiple of this; 1 keeps the exact count. ``auto`` (the default): 8 when the
        model is on CUDA, whose fused attention kernels want widths that are multiples of 8, else 1. The plan
        records the resolved value.
    prune_k, prune_v : bool
        Prune keys / values (both by default).
    v_path : str
        ``channels`` (prune V channels, the paper's RAP) or ``lowrank``: cache a rank-r V latent per group of
        ``group_size`` KV heads (the same cache budget: r = g · kept V channels), its up-projection absorbed
        into W_o, so nothing is rebuilt (V has no RoPE). Factors as Palu's (``decomposition``).
    group_size, decomposition :
        With ``v_path=lowrank``: KV heads per latent (capped at the head count) and ``svd`` or ``whiten``.
        Per head (1, the default) costs exactly what channel pruning costs; a joint latent of g heads makes each
        query head's block of W_o (and its attention-weighted sum) g times wider.
    v_refit : bool
        With ``v_path=channels``: refit W_o by least squares on calibration attention outputs so the kept V channels
        also carry what the dropped ones did (exact linear compensation; needs calibration data). The maps are saved
        with the plan (``plan.safetensors``).
    qk_norm : str or None
        Models with q_norm/k_norm (Qwen3, Gemma 3), whose RMS runs over the whole head: ``exact`` projects q and k at
        full width, normalises them as the original and keeps the chosen channels (the cache and the attention
        shrink, the q/k projections do not); ``kept`` projects only the kept rows and normalises over them, the
        statistic rescaled per head by a factor calibrated on the ``scores`` batch (everything shrinks; the norm is
        approximate). None: ``DEFAULT_QK_NORM``. Ignored on models without QK-norm.
    seed : int
        For the ``random`` criterion.
    gradients : GradientSettings or None
        How the gradient criteria's backward runs (activation checkpointing, the loss chunk): memory savers that
        change no score. The job passes its ``gradient_checkpointing`` and ``loss_chunk``.
    """

    criterion: str = "key_energy"
    allocation: str = "uniform"
    floor: int = 1
    round_to: int | str = "auto"
    prune_k: bool = True
    prune_v: bool = True
    v_path: str = "channels"
    group_size: int = 1
    decomposition: str = "whiten"
    v_refit: bool = False
    qk_norm: str | None = None
    seed: int = 0
    gradients: GradientSettings | None = None
    name = "rap"
    recorded = ("round_to", "qk_norm")
    order = 1
    examples = ({"criterion": "key_energy"}, {"criterion": "rope_blind"},
                {"criterion": "weight_norm", "v_path": "lowrank"}, {"criterion": "weight_norm", "qk_norm": "kept"})

    @classmethod
    def bench_options(cls, head_dim: int, round_to: int) -> dict:
        return {"criterion": "weight_norm", "round_to": round_to}

    @classmethod
    def label(cls, row) -> str:
        extra = [x for x in (option(row, "allocation") if option(row, "allocation") != "uniform" else None,
                             low_rank_v_words(option(row, "group_size", 1)) if option(row, "v_path") == "lowrank"
                             else None,
                             "W_o refit" if option(row, "v_refit") else None, qk_norm_words(row)) if x]
        return f"RAP ({', '.join([str(row.get('cfg.criterion.name', '?')), *extra])})"

    @staticmethod
    def panel_label(plan: dict) -> str:
        return str(plan.get("criterion")) + (f", QK-norm {plan['qk_norm']}" if plan.get("qk_norm") else "")

    @staticmethod
    def kept_frequencies(plan: dict) -> np.ndarray:
        """The kept pairs; a RoPE-blind channel counts half a pair."""
        half = plan["head_dim"] // 2
        out = np.zeros((len(plan["layers"]), half))
        for i, lp in enumerate(plan["layers"]):
            for channels in lp["k_channels"]:
                for c in channels:
                    out[i, c % half] += 0.5 / len(lp["k_channels"])
        return out

    @classmethod
    def resolve_options(cls, options: dict, device) -> dict:
        if options.get("round_to") == "auto":
            options = {**options, "round_to": resolve_round_to("auto", device)}
        return options

    def run_tags(self) -> list[str]:
        return [f"criterion:{self.criterion}"]

    def needs_calibration(self, config=None) -> bool:
        lowrank_data = self.v_path == "lowrank" and self.decomposition == "whiten"
        kept_norm = (config is None or has_qk_norm(config)) and (self.qk_norm or DEFAULT_QK_NORM) == "kept"
        return self.criterion in criteria.NEEDS_DATA or self.v_refit or lowrank_data or kept_norm

    def validate(self, config) -> None:
        check_config(config)
        if self.criterion not in criteria.CRITERIA:
            raise ConfigError(f"Unknown criterion '{self.criterion}'; choose one of "
                              f"{', '.join(sorted(criteria.CRITERIA))}.")
        if self.allocation not in ("uniform", "global"):
            raise ConfigError(f"Unknown allocation '{self.allocation}'; use uniform or global.")
        if self.v_path not in ("channels", "lowrank"):
            raise ConfigError(f"Unknown v_path '{self.v_path}'; use channels or lowrank.")
        check_decomposition(self.decomposition)
        if self.v_path == "lowrank" and self.v_refit:
            raise ConfigError("v_refit refits pruned V channels; it does not apply to v_path=lowrank.")
        if self.v_path == "lowrank":
            group_size_for(config.num_key_value_heads, self.group_size)
        resolve_qk_norm(self.qk_norm, config)
        # auto is checked as 1: a larger multiple keeps at least that many dims, so it never empties the budget
        kv_budget(self.ratio, head_dim(config), resolve_round_to(self.round_to, "cpu"), self.prune_k, self.prune_v)

    def make_plan(self, model, calibration=None) -> dict:
        self.validate(model.config)
        attn = model.model.layers[0].self_attn
        d = attn.head_dim
        round_to = resolve_round_to(self.round_to, model_device(model))
        n_pairs, n_v = kv_budget(self.ratio, d, round_to, self.prune_k, self.prune_v)
        s = criteria.score(self.criterion, model, calibration_for(calibration, "scores"), seed=self.seed,
                           gradients=self.gradients)
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
            layers.append({"k_pairs": k_pairs, "k_channels": k_channels,
                           "v_channels": top_per_head(s["v"][i], v_counts[i])})
        plan = {"method": "rap", "ratio": self.ratio, "criterion": self.criterion, "allocation": self.allocation,
                "round_to": round_to, "v_refit": self.v_refit, "v_path": self.v_path, "head_dim": d, "layers": layers}
        if any(sliding_layers(model.config)):  # frequency maps show local and global layers apart
            plan["layer_kinds"], plan["rope_bases"] = layer_kinds(model.config), layer_rope_bases(model.config)
        qk_norm = resolve_qk_norm(self.qk_norm, model.config)
        if qk_norm is not None:
            plan["qk_norm"] = qk_norm
        if qk_norm == "kept":
            batch = calibration_for(calibration, "scores")
            if batch is None:
                raise ConfigError("qk_norm=kept calibrates its norm correction; pass calibration=<token batch> or use "
                                  "exact.")
            e = channel_energy(model, batch)
            rep = attn.num_key_value_groups
            plan["tensors"] = {}
            for i, lp in enumerate(layers):
                per_query_head = [lp["k_channels"][h // rep] for h in range(len(lp["k_channels"]) * rep)]
                plan["tensors"][f"q_rho.{i}"] = qk_rho(e["q"][i], per_query_head)
                plan["tensors"][f"k_rho.{i}"] = qk_rho(e["k"][i], lp["k_channels"])
        if self.v_path == "lowrank":
            g = group_size_for(model.config.num_key_value_heads, self.group_size)
            if self.decomposition == "whiten" and calibration is None:
                raise ConfigError("decomposition=whiten needs calibration data; pass calibration=<token batch> or use "
                                  "svd.")
            whiten = calibration_for(calibration, "whiten")
            plan.update(group_size=g, decomposition=self.decomposition)
            plan.setdefault("tensors", {})
            for i, gram in whitening_grams(model, whiten, self.decomposition == "whiten"):
                w, lp = model.model.layers[i].self_attn.v_proj.weight, layers[i]
                rank = min(g * len(lp["v_channels"][0]), w.shape[1])  # RAP's V budget
                down, up = group_factors(w, d, g, rank, gram)
                del gram  # this layer's Gram is freed before the next layer's is computed
                plan["tensors"].update({f"v_down.{i}": down, f"v_up.{i}": up})
                lp["v_rank"], lp["v_channels"] = rank, None
        if self.v_refit:
            if calibration is None:
                raise ConfigError("v_refit needs calibration data; pass calibration=<token batch>.")
            rep = model.model.layers[0].self_attn.num_key_value_groups
            grams = attention_output_gram(model, calibration_for(calibration, "default"))
            maps = {f"o_maps.{i}": torch.stack([least_squares_map(g, lp["v_channels"][h // rep])
                                                for h, g in enumerate(grams[i])])
                    for i, lp in enumerate(layers)}
            plan.setdefault("tensors", {}).update(maps)
        return plan

    @staticmethod
    def apply(model, plan: dict):
        tensors = plan.get("tensors", {})
        for i, (layer, lp) in enumerate(zip(model.model.layers, plan["layers"], strict=True)):
            v_latent = (tensors[f"v_down.{i}"], tensors[f"v_up.{i}"]) if lp.get("v_rank") else None
            rho = (tensors[f"q_rho.{i}"], tensors[f"k_rho.{i}"]) if plan.get("qk_norm") == "kept" else None
            layer.self_attn = PrunedAttention(layer.self_attn, lp["k_channels"], lp["v_channels"],
                                              tensors.get(f"o_maps.{i}"), v_latent, plan.get("qk_norm"), rho)
        return model

    @staticmethod
    def check_plan(config, plan: dict) -> dict[str, tuple]:
        d, nkv, nh, h = plan["head_dim"], config.num_key_value_heads, config.num_attention_heads, config.hidden_size
        pairs = plan.get("criterion") != "rope_blind"
        qk_norm = plan.get("qk_norm")
        if qk_norm not in (None, *QK_NORMS) or (qk_norm is None) == has_qk_norm(config):
            raise PlanError(f"its qk_norm={qk_norm!r} does not fit a {config.model_type} model (QK-norm: "
                            f"{'one of ' + ', '.join(QK_NORMS) if has_qk_norm(config) else 'none'})")
        tensors = {}
        for i, lp in enumerate(plan["layers"]):
            where = f"layer {i}"
            if qk_norm == "kept":
                tensors.update({f"q_rho.{i}": (nh,), f"k_rho.{i}": (nkv,)})
            per_head_indices(entry(lp, "k_channels", where), nkv, d, f"{where} k_channels")
            for g, ch in enumerate(lp["k_channels"] if pairs else []):
                first = ch[: len(ch) // 2]
                paired = ch[len(ch) // 2:] == [c + d // 2 for c in first]
                if len(ch) % 2 or first != sorted(first) or first[-1] >= d // 2 or not paired:
                    raise PlanError(f"{where} k_channels of KV head {g} are not whole RoPE pairs (sorted i < "
                                    f"{d // 2}, then each i + {d // 2})")
            if lp.get("v_rank") is not None:
                g = positive_int(entry(plan, "group_size", "the plan"), "group_size", nkv)
                if nkv % g:
                    raise PlanError(f"group_size={g} does not divide the {nkv} KV heads")
                r = positive_int(lp["v_rank"], f"{where} v_rank", min(g * d, h))
                tensors.update({f"v_down.{i}": (nkv // g * r, h), f"v_up.{i}": (nkv // g, g * d, r)})
            else:
                n_v = per_head_indices(entry(lp, "v_channels", where), nkv, d, f"{where} v_channels")
                if plan.get("v_refit"):
                    tensors[f"o_maps.{i}"] = (nh, d, n_v)
        return tensors

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        h, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        shapes = []
        qkv_bias, o_bias = has_qkv_bias(config), has_o_bias(config)
        qk_norm, d = plan.get("qk_norm"), plan["head_dim"]
        for lp in plan["layers"]:
            nk = len(lp["k_channels"][0])
            # exact QK-norm: q and k projected at full width (and normalised there) before the kept channels are taken
            nqk = d if qk_norm == "exact" else nk
            norms = {"exact": 2 * d, "kept": (nh + nkv) * nk}.get(qk_norm, 0)
            if lp.get("v_rank"):  # a latent per group; the value bias moves into W_o's bias
                nv, v_rows = lp["v_rank"], nkv // plan["group_size"] * lp["v_rank"]
                bias = (nh * nqk + nkv * nqk) * qkv_bias + h * has_latent_o_bias(config)
            else:
                nv, v_rows = len(lp["v_channels"][0]), nkv * len(lp["v_channels"][0])
                bias = (nh * nqk + nkv * nqk + v_rows) * qkv_bias + h * o_bias
            weights = h * nh * nqk + h * nkv * nqk + h * v_rows + nh * nv * h
            shapes.append(AttentionShape(nh, nk, nv, nkv * nk + v_rows, weights, weights + bias + norms))
        return shapes


class PrunedAttention(CompressedAttention):
    """RAP's attention: kept RoPE pairs of the keys (and the same rows of W_q for each query head of the group);
    values either pruned to kept channels or cached as a low-rank latent.

    Parameters
    ----------
    attn : the original attention module (weights are copied, not shared).
    k_channels : per KV head, the kept key channels (original indices in [0, head_dim)); equal counts.
    v_channels : per KV head, the kept value channels; equal counts. Ignored with ``v_latent``.
    o_maps : optional (n_heads, d, n_v) least-squares maps from each query head's kept value channels to its
        full attention output; W_o of head h becomes W_o[:, head h] @ o_maps[h].
    v_latent : optional ``(down, up)``: down (G·r, hidden) computes a rank-r latent per group of g KV heads (the
        cache holds it), up (G, g·d, r) is absorbed into W_o (``latent_o_proj``), so nothing is rebuilt.
    qk_norm : with a QK-norm model, ``exact`` (q and k projected at full width, normalised as the original, then the
        kept channels taken: exact, but the q/k projections do not shrink) or ``kept`` (only the kept rows projected,
        normalised over the kept channels with the statistic rescaled by ``qk_rho``: everything shrinks).
    qk_rho : with ``kept``, ``(q_rho (n_heads,), k_rho (n_kv,))``, ``KeptHeadNorm``'s corrections.
    """

    def __init__(self, attn: nn.Module, k_channels: list[list[int]], v_channels: list[list[int]] | None = None,
                 o_maps: torch.Tensor | None = None, v_latent: tuple[torch.Tensor, torch.Tensor] | None = None,
                 qk_norm: str | None = None, qk_rho: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(attn)
        d, rep, n_kv = self.head_dim, self.num_key_value_groups, len(k_channels)
        self.n_k = len(k_channels[0])
        if any(len(c) != self.n_k for c in k_channels):
            raise ValueError("kept key channel counts must be equal across the KV heads of a layer")
        q_channels = [k_channels[h // rep] for h in range(n_kv * rep)]
        self.qk_norm = qk_norm if hasattr(attn, "k_norm") else None
        if self.qk_norm == "exact":
            full_width_qk(self, attn)
            dev = attn.q_proj.weight.device
            self.register_buffer("q_index", torch.tensor(q_channels, device=dev), persistent=False)
            self.register_buffer("k_index", torch.tensor(k_channels, device=dev), persistent=False)
        else:
            self.q_proj = linear_rows(attn.q_proj, [h * d + c for h in range(n_kv * rep) for c in q_channels[h]])
            self.k_proj = linear_rows(attn.k_proj, [g * d + c for g in range(n_kv) for c in k_channels[g]])
            if self.qk_norm == "kept":
                self.q_norm = KeptHeadNorm(attn.q_norm, q_channels, qk_rho[0])
                self.k_norm = KeptHeadNorm(attn.k_norm, k_channels, qk_rho[1])
            elif self.qk_norm is not None:
                raise ValueError(f"qk_norm={qk_norm!r} is not exact or kept")
        if v_latent is not None:
            down, up = v_latent
            self.v_heads, self.n_v = up.shape[0], up.shape[2]
            self.v_proj = linear(down.to(attn.v_proj.weight), None)
            self.o_proj = latent_o_proj(attn, up)
        else:
            self.v_heads, self.n_v = n_kv, len(v_channels[0])
            if any(len(c) != self.n_v for c in v_channels):
                raise ValueError("kept value channel counts must be equal across the KV heads of a layer")
            self.v_proj = linear_rows(attn.v_proj, [g * d + c for g in range(n_kv) for c in v_channels[g]])
            o_cols = [h * d + c for h in range(n_kv * rep) for c in v_channels[h // rep]]
            if o_maps is None:
                w_o = attn.o_proj.weight[:, o_cols]
            else:
                w = attn.o_proj.weight
                heads = w.view(w.shape[0], -1, d).transpose(0, 1)  # (n_heads, hidden, d)
                w_o = (heads.float() @ o_maps.to(w.device).float()).transpose(0, 1).reshape(w.shape[0], -1).to(w.dtype)
            self.o_proj = linear(w_o, attn.o_proj.bias)
        self.rope = PairRope(k_channels, d, attn.q_proj.weight.device)

    def queries_keys(self, x):
        """Queries and keys (b, heads, s, n_k) before RoPE, normalised as ``qk_norm`` says."""
        shape = x.shape[:-1]
        if self.qk_norm == "exact":
            q = self.q_norm(self.q_proj(x).view(*shape, -1, self.head_dim))
            k = self.k_norm(self.k_proj(x).view(*shape, -1, self.head_dim))
            q = q.gather(-1, self.q_index.expand(*shape, -1, -1))
            k = k.gather(-1, self.k_index.expand(*shape, -1, -1))
        else:
            q = self.q_proj(x).view(*shape, -1, self.n_k)
            k = self.k_proj(x).view(*shape, -1, self.n_k)
            if self.qk_norm == "kept":
                q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2)

    def project(self, x, position_embeddings, position_ids=None):
        shape = x.shape[:-1]
        q, k = self.queries_keys(x)
        v = self.v_proj(x).view(*shape, self.v_heads, self.n_v).transpose(1, 2)
        tables = self.rope.tables(*position_embeddings)
        return self.rope(q, tables), self.rope(k, tables), v
