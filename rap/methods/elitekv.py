"""EliteKV-style: per KV head, a few "elite" RoPE pairs keep their rotation and are cached as rotated keys; the
other key dims lose RoPE and, with V, are factored jointly (J-LRD) into one latent per token shared by all
heads. The key part of the up-projection is applied to the queries and the value part either absorbed into W_o or
applied per KV head after attention (``value_path``), so nothing is rebuilt. Training-free here: the paper's own
numbers need uptraining."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..architecture import check_config, has_qk_norm, head_dim
from ..calibration import attention_errors, calibration_for, hold_out, rope_elite_order, whitening_grams
from ..devices import model_device
from ..errors import ConfigError, PlanError
from ..memory import stage
from ..modules import swapped_attention
from ..naming import option
from ..shapes import AttentionShape, has_latent_o_bias, has_qkv_bias
from .attention import CompressedAttention, LatentUpOut, PairRope, decode_probs, latent_o_proj, linear, linear_rows
from .base import Method, register
from .lowrank import check_decomposition, factorize
from .selection import kv_budget
from .validation import entry, per_head_indices, positive_int


def plan_value_path(plan: dict) -> str:
    """The value path a plan was made with: plans from before ``value_path`` existed folded B_v into W_o."""
    return plan.get("value_path", "fold")


def pair_channels(pairs: list[int], head_dim: int) -> list[int]:
    """RoPE pairs -> their channels (i and i + d/2), in the order RAP keeps them."""
    pairs = sorted(pairs)
    return pairs + [p + head_dim // 2 for p in pairs]


class EliteAttention(CompressedAttention):
    """Cache per token: the joint latent c (kv_dim, in the cache's key slot) and the rotated elite keys of every KV
    head (n_kv · 2r, packed into one head in the value slot), nothing else.

    Score of query head h with a cached token: q_elite·k_elite (RoPE'd, own frequencies) + (B_kᵀ q_nope)·c,
    where B_k are the up-projection rows of h's KV head; the K-nope bias is dropped (it adds the same amount
    to every key's score, which softmax ignores). Values: attention weights times c, then W_o·B_v, with B_v the
    value rows of h's KV head, either folded into W_o (``fold``: W_o is hidden × n_heads·kv_dim) or applied per KV
    head before the original W_o (``up``).

    Parameters
    ----------
    attn : the original attention module.
    elite : per KV head, the elite RoPE pairs (equal counts).
    down : (kv_dim, hidden), the joint latent's projection.
    up : (n_kv·(d-2r) + n_kv·d, kv_dim): rows of the non-elite key channels per head, then all value rows.
    value_path : ``fold`` or ``up``, as ``EliteKV.value_path``.
    """

    def __init__(self, attn: nn.Module, elite: list[list[int]], down: torch.Tensor, up: torch.Tensor,
                 value_path: str = "fold"):
        super().__init__(attn)
        d, rep, nkv = self.head_dim, self.num_key_value_groups, self.n_kv
        elite_ch = [pair_channels(p, d) for p in elite]
        nope_ch = [[c for c in range(d) if c not in set(e)] for e in elite_ch]
        self.n_e, self.n_n, self.kv_dim = len(elite_ch[0]), d - len(elite_ch[0]), down.shape[0]
        q_rows = [h * d + c for h in range(nkv * rep) for c in elite_ch[h // rep] + nope_ch[h // rep]]
        self.q_proj = linear_rows(attn.q_proj, q_rows)
        self.k_proj = linear_rows(attn.k_proj, [g * d + c for g in range(nkv) for c in elite_ch[g]])
        w = attn.k_proj.weight
        self.kv_proj = linear(down.to(w), None)
        up = up.to(w)
        self.q_absorb = nn.Parameter(up[: nkv * self.n_n].reshape(nkv, self.n_n, self.kv_dim).clone())
        v_up = up[nkv * self.n_n:][None]  # (1, n_kv·d, kv_dim): one latent for all KV heads
        self.o_proj = latent_o_proj(attn, v_up) if value_path == "fold" else LatentUpOut(attn, v_up)
        self.rope = PairRope(elite_ch, d, w.device)

    def project(self, x, position_embeddings, position_ids=None):
        shape, b, s = x.shape[:-1], x.shape[0], x.shape[1]
        rep = self.num_key_value_groups
        q = self.q_proj(x).view(*shape, -1, self.n_e + self.n_n).transpose(1, 2)
        q_e, q_n = q.split([self.n_e, self.n_n], -1)
        tables = self.rope.tables(*position_embeddings)
        q_e = self.rope(q_e, tables)
        # One batched matmul per KV head over its query heads and tokens: q_absorb is not repeated per query head.
        q_lat = torch.einsum("bgjsn,gnc->bgjsc", q_n.reshape(b, self.n_kv, rep, s, self.n_n), self.q_absorb)
        q_lat = q_lat.reshape(b, -1, s, self.kv_dim)
        k_e = self.rope(self.k_proj(x).view(*shape, self.n_kv, self.n_e).transpose(1, 2), tables)
        c = self.kv_proj(x).view(*shape, 1, self.kv_dim).transpose(1, 2)
        # Cached as two single-head tensors, the latent in the key slot and every KV head's elite keys side by side
        # in the value slot: a StaticCache gives values as many heads as keys, which (n_kv, 1) would break.
        packed = k_e.transpose(1, 2).reshape(b, s, 1, self.n_kv * self.n_e).transpose(1, 2)
        return torch.cat([q_e, q_lat], -1), c, packed

    def expand(self, q, c, packed, past: int = 0):
        b, _, t, _ = packed.shape
        k_e = packed.reshape(b, t, self.n_kv, self.n_e).transpose(1, 2)  # a view of the cache
        return q, torch.cat([k_e, c.expand(-1, self.n_kv, -1, -1)], -1), c

    def decode(self, q, c, packed, mask, past: int = 0):
        """As ``CompressedAttention.decode``, over views of the cache: each score is its elite part (per KV head,
        against the packed elite keys) plus its latent part (all query heads against the one latent), where
        ``expand`` would copy the latent per KV head at every step."""
        b, nh, _, _ = q.shape
        t = c.shape[2]
        q_e, q_lat = q[:, :, 0].split([self.n_e, self.kv_dim], -1)  # (b, nh, ·)
        k_e = packed.reshape(b, t, self.n_kv, self.n_e).transpose(1, 2)  # (b, n_kv, T, n_e)
        c = c[:, 0]  # (b, T, kv_dim)
        elite = q_e.reshape(b, self.n_kv, -1, self.n_e) @ k_e.transpose(-1, -2)  # (b, n_kv, rep, T)
        scores = (elite.reshape(b, nh, t) + q_lat @ c.transpose(-1, -2)) * self.scaling
        probs = decode_probs(scores, mask, c.dtype)
        return (probs @ c).view(b, 1, nh, self.kv_dim)


@register
@dataclass
class EliteKV(Method):
    """EliteKV-style elite RoPE pairs plus a joint low-rank K/V latent, at RAP's KV-cache budget.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache bytes removed, as for RAP. Per layer the cache holds n_kv·2r + kv_dim elements,
        equal to RAP's n_kv·(2P + n_v); kv_dim follows from r.
    elite_pairs : int
        Elite RoPE pairs r per KV head. 0 searches ``search_fractions`` of d/2 and keeps the r with the lowest
        calibration perplexity (EliteKV's allocation step).
    selection : str
        ``greedy`` (RoPElite: the pair whose rotation most reduces the mean |logit error| against full RoPE,
        round by round), ``uniform`` (evenly spaced frequencies, positions truncated as in the official code) or
        ``contribution`` (largest signed sum of the rotated pair's q·k term over the group's query heads and
        sampled (query, key) pairs, as the official code; it samples keys at or after the query, rap causal ones).
    decomposition : str
        J-LRD factors: ``svd`` of the stacked [W_k non-elite; W_v] (EliteKV's recipe, the default), or
        ``whiten`` (as Palu; a different method, labelled "EliteKV + whitening").
    search_fractions : list
        Candidate r as fractions of d/2 when ``elite_pairs`` is 0.
    search_sequences : int
        Calibration sequences that score each candidate, held out: the last ones of the calibration batch,
        which no statistic is fitted on.
    seed : int
        Sampling of the (query, key) pairs for ``greedy``.
    value_path : str
        Where the value part of the up-projection goes: ``fold`` absorbs it into W_o (hidden × n_heads·kv_dim, no
        extra step), ``up`` applies it per KV head after attention (d × kv_dim each) before the original W_o
        (hidden × n_heads·d), ``auto`` whichever holds fewer parameters at the plan's kv_dim (``up`` at Llama-3-8B
        and SmolLM2 shapes). Same outputs up to rounding; the plan records the one resolved (``fold`` if absent).
    """

    elite_pairs: int = 0
    selection: str = "greedy"
    decomposition: str = "svd"
    search_fractions: list = field(default_factory=lambda: [0.125, 0.25, 0.5])
    search_sequences: int = 4
    seed: int = 0
    value_path: str = "auto"
    name = "elitekv"
    recorded = ("value_path",)
    order = 3
    exact_at_zero = False  # by design: the non-elite key dims and V share one latent of RAP's budget
    examples = ({"elite_pairs": 2, "value_path": "fold"}, {"elite_pairs": 2, "value_path": "up"},
                {"elite_pairs": 2, "selection": "uniform", "decomposition": "whiten"})

    @classmethod
    def refusal(cls, config) -> str | None:
        if has_qk_norm(config):
            return (f"EliteKV folds the non-elite key dims of every head into one shared latent, so the per-head "
                    f"k_norm of {config.model_type} (an RMS over the whole key head) cannot be applied; use rap or "
                    "palu.")
        return None

    @classmethod
    def bench_options(cls, head_dim: int, round_to: int) -> dict | None:
        if round_to != 1:  # its widths follow from the elite pairs and the latent; nothing rounds them
            return None
        return {"selection": "uniform", "decomposition": "svd", "elite_pairs": max(1, head_dim // 8)}

    @classmethod
    def label(cls, row) -> str:
        r = option(row, "elite_pairs") or "r searched"
        r = r if isinstance(r, str) else f"r={r}"
        head = "EliteKV + whitening" if option(row, "decomposition") == "whiten" else "EliteKV"
        vp = option(row, "value_path")
        if vp == "auto":  # named by what it resolved to (metrics.json's value_path); unsaid where not recorded
            vp = row.get("value_path")
        elif not isinstance(vp, str):  # a run from before value_path existed (no value, or NaN): it folded B_v into W_o
            vp = "fold"
        path = {"fold": "W_o folded", "up": "V up-projection"}.get(vp) if isinstance(vp, str) else None
        return f"{head} ({', '.join([str(option(row, 'selection')), str(r), *([path] if path else [])])})"

    @staticmethod
    def panel_label(plan: dict) -> str:
        return "EliteKV + whitening" if plan.get("decomposition") == "whiten" else "EliteKV"

    @staticmethod
    def kept_frequencies(plan: dict) -> np.ndarray:
        """The elite pairs (the rest of the key is a latent without RoPE)."""
        out = np.zeros((len(plan["layers"]), plan["head_dim"] // 2))
        for i, lp in enumerate(plan["layers"]):
            for pairs in lp["elite_pairs"]:
                out[i, pairs] += 1 / len(lp["elite_pairs"])
        return out

    def _candidates(self, config) -> tuple[list[int], int]:
        """The elite pair counts to try and RAP's cache elements per layer (the budget they must fit)."""
        d, nkv = head_dim(config), config.num_key_value_heads
        n_pairs, n_v = kv_budget(self.ratio, d)
        budget = nkv * (2 * n_pairs + n_v)
        if self.elite_pairs:
            candidates = [self.elite_pairs]
        else:
            candidates = sorted({max(1, round(f * d / 2)) for f in self.search_fractions})
        candidates = [r for r in candidates if 1 <= r <= d // 2 and budget - nkv * 2 * r >= 1]
        if not candidates:
            raise ConfigError(f"No elite pair count fits ratio={self.ratio} (budget {budget} per layer); lower the "
                              "ratio or elite_pairs.")
        return candidates, budget

    def validate(self, config) -> None:
        if self.selection not in ("greedy", "uniform", "contribution"):
            raise ConfigError(f"Unknown selection '{self.selection}'; use greedy, uniform or contribution.")
        check_decomposition(self.decomposition)
        if self.value_path not in ("auto", "fold", "up"):
            raise ConfigError(f"Unknown value_path '{self.value_path}'; use auto, fold or up.")
        check_config(config)
        self.check_supported(config)
        self._candidates(config)

    def make_plan(self, model, calibration=None) -> dict:
        self.validate(model.config)
        needs_data = self.selection != "uniform" or self.decomposition == "whiten" or not self.elite_pairs
        if calibration is None and needs_data:
            raise ConfigError("EliteKV needs calibration data here; pass calibration=<token batch>.")
        candidates, budget = self._candidates(model.config)
        held_out = None
        if len(candidates) > 1:  # score the candidates on sequences that no statistic is fitted on
            calibration, held_out = hold_out(calibration, self.search_sequences)
        order = self._order(model, calibration_for(calibration, "rope_elite"))
        whiten = calibration_for(calibration, "whiten")
        grams = whitening_grams(model, whiten, self.decomposition == "whiten")
        plans = self._plans(model, candidates, budget, order, grams)
        search = {}
        if len(plans) > 1:
            with stage("EliteKV r search"):
                search = {p["elite_pairs"]: _calibration_ppl(model, p, held_out) for p in plans}
            plans = [min(plans, key=lambda p: search[p["elite_pairs"]])]
        plan = plans[0]
        plan["search_ppl"] = {str(k): v for k, v in search.items()}
        return plan

    def _order(self, model, calibration):
        """Per layer and KV head, every RoPE pair in order of preference (the first r are elite)."""
        L, nkv = len(model.model.layers), model.config.num_key_value_heads
        if self.selection == "greedy":
            return rope_elite_order(model, calibration, seed=self.seed)
        if self.selection == "contribution":
            signed = attention_errors(model, calibration)["k_signed"]
            return [[row.argsort(descending=True).tolist() for row in s] for s in signed]
        return [[None] * nkv for _ in range(L)]  # uniform: spacing depends on r

    def resolve_value_path(self, config, kv_dim: int) -> str:
        """``fold`` or ``up``: ``value_path``, with ``auto`` the one with fewer parameters (``fold`` on a tie).

        Parameters
        ----------
        config : the model config.
        kv_dim : the joint latent's width.
        """
        if self.value_path != "auto":
            return self.value_path
        h, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim(config)
        return "up" if nkv * d * kv_dim + h * nh * d < h * nh * kv_dim else "fold"

    def _plans(self, model, candidates: list[int], budget: int, order, grams) -> list[dict]:
        """One plan per candidate r, in one pass over the layers.

        Parameters
        ----------
        model : the uncompressed model.
        candidates : the elite pair counts r.
        budget : cache elements per layer.
        order : per layer and KV head, the RoPE pairs in order of preference (``_order``).
        grams : ``(i, Gram of layer i's attention input)`` for every layer in order, or ``(i, None)`` for plain SVD
            (``calibration.whitening_grams``): one layer's is read, serves every r and is dropped before the next.
        """
        cfg, layers = model.config, model.model.layers
        d, nkv = layers[0].self_attn.head_dim, cfg.num_key_value_heads
        kv_dims = [min(budget - nkv * 2 * r, nkv * (d - 2 * r) + nkv * d, cfg.hidden_size) for r in candidates]
        # truncated, as the official code
        spaced = {r: torch.linspace(0, d // 2 - 1, r).long().tolist() for r in candidates}
        out, tensors = [[] for _ in candidates], [{} for _ in candidates]
        for i, gram in grams:
            a = layers[i].self_attn
            for j, (r, kv_dim) in enumerate(zip(candidates, kv_dims)):
                elite = [sorted(o[:r]) if o is not None else spaced[r] for o in order[i]]
                nope = [[c for c in range(d) if c not in set(pair_channels(e, d))] for e in elite]
                rows = [g * d + c for g in range(nkv) for c in nope[g]]
                w = torch.cat([a.k_proj.weight[rows], a.v_proj.weight])
                down, up = factorize(w, kv_dim, gram)
                tensors[j].update({f"down.{i}": down, f"up.{i}": up})
                out[j].append({"elite_pairs": elite, "kv_dim": kv_dim})
            del gram  # before the next layer's is read
        return [{"method": "elitekv", "ratio": self.ratio, "selection": self.selection,
                 "decomposition": self.decomposition, "elite_pairs": r, "kv_dim": kv_dim, "head_dim": d,
                 "value_path": self.resolve_value_path(cfg, kv_dim), "layers": lp, "tensors": t}
                for r, kv_dim, lp, t in zip(candidates, kv_dims, out, tensors)]

    @staticmethod
    def apply(model, plan: dict):
        t, value_path = plan["tensors"], plan_value_path(plan)
        for i, (layer, lp) in enumerate(zip(model.model.layers, plan["layers"], strict=True)):
            layer.self_attn = EliteAttention(layer.self_attn, lp["elite_pairs"], t[f"down.{i}"], t[f"up.{i}"],
                                             value_path)
        return model

    @staticmethod
    def check_plan(config, plan: dict) -> dict[str, tuple]:
        d, nkv, h = plan["head_dim"], config.num_key_value_heads, config.hidden_size
        r = positive_int(entry(plan, "elite_pairs", "the plan"), "elite_pairs", d // 2)
        if plan_value_path(plan) not in ("fold", "up"):
            raise PlanError(f"its value_path={plan['value_path']!r} is not fold or up")
        tensors = {}
        for i, lp in enumerate(plan["layers"]):
            n = per_head_indices(entry(lp, "elite_pairs", f"layer {i}"), nkv, d // 2, f"layer {i} elite_pairs")
            if n != r:
                raise PlanError(f"layer {i} keeps {n} elite pairs per KV head, but the plan says elite_pairs={r}")
            c = positive_int(entry(lp, "kv_dim", f"layer {i}"), f"layer {i} kv_dim", nkv * (d - 2 * r) + nkv * d)
            tensors.update({f"down.{i}": (c, h), f"up.{i}": (nkv * (d - 2 * r) + nkv * d, c)})
        return tensors

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        h, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, plan["head_dim"]
        qkv_bias, fold = has_qkv_bias(config), plan_value_path(plan) == "fold"
        shapes = []
        for lp in plan["layers"]:
            n_e, c = 2 * len(lp["elite_pairs"][0]), lp["kv_dim"]
            # W_q, the key up-projection applied to the queries, W_k (elite), the latent's down-projection
            weights = h * nh * d + nh * (d - n_e) * c + h * nkv * n_e + h * c
            params = weights - nh * (d - n_e) * c + nkv * (d - n_e) * c  # q_absorb is stored once per KV head
            if fold:  # W_o·B_v per query head
                weights, params = weights + nh * c * h, params + nh * c * h
            else:  # B_v per query head (stored per KV head), then W_o
                weights, params = weights + nh * c * d + h * nh * d, params + nkv * d * c + h * nh * d
            bias = (nh * d + nkv * n_e) * qkv_bias + h * has_latent_o_bias(config)
            shapes.append(AttentionShape(nh, n_e + c, c, nkv * n_e + c, weights, params + bias))
        return shapes


@torch.no_grad()
def _calibration_ppl(model, plan: dict, batch: torch.Tensor) -> float:
    """Perplexity on calibration sequences of ``model`` compressed by ``plan``: the plan's attention modules are
    built in place of the originals, which are put back afterwards (no model copy; ``model`` is left as it was)."""
    with swapped_attention(model):
        EliteKV.apply(model, plan)
        dev = model_device(model)
        nll = sum(model(row[None].to(dev), labels=row[None].to(dev), use_cache=False).loss.item() for row in batch)
    return math.exp(nll / len(batch))
