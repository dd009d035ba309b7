"""KV-Latent (arXiv 2507.11273) at RAP's KV budget: strided head dimensions and frequency-aware RoPE, nothing rebuilt.

From the method's official code (modelcodes/modeling_llama3.py): q_proj and k_proj keep every r-th output row of each
head (dims 0, r, 2r, ...), v_proj every r_v-th row and o_proj the matching input columns; no SVD, no data. The reduced
q/k head of width d' is a fresh RoPE head in the rotate_half layout, with d'/2 frequencies base^(-a_j/d'):
a = [d'/4, d'/4 + 2, ..., 3d'/4 - 2] then [3d'/4, ..., d' - 1], so the highest-frequency quarter is dropped, the middle
sampled with stride 2 and the lowest kept dense. Attention runs at the reduced widths, with the reduced head's softmax
scale 1/sqrt(d') (the official code sets the head dim to d'; Gemma 3's query_pre_attn_scalar is scaled by d'/d), and
the cache holds the reduced keys and values.

The official code is for Llama 3, which has no QK-norm. On Qwen3 and Gemma 3, whose q_norm/k_norm is an RMS over the
whole head, q and k are projected at full width and normalised exactly as the original before the strided dims are
taken: RAP's ``qk_norm=exact``, recorded in the plan as ``qk_norm: exact``.

KV-Latent is meant to be trained afterwards (KL distillation, then the LM loss); training-free it scrambles RoPE, so
its untrained numbers are expected to be poor. ``heal=layerwise`` / ``heal=e2e`` train it under the common budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..architecture import check_config, has_qk_norm, head_dim, layer_rope_bases, rope_types
from ..errors import ConfigError, PlanError
from ..naming import option, qk_norm_words
from ..shapes import AttentionShape, has_o_bias, has_qkv_bias
from .attention import CompressedAttention, full_width_qk, linear, linear_rows
from .base import Method, register
from .selection import kv_budget
from .validation import entry, indices


def reduced_dims(d: int, width: int) -> tuple[list[int], str]:
    """``width`` of a head's ``d`` dims: every (d/width)-th when that is an integer (KV-Latent's stride), else evenly
    spaced (floor(j d / width)); returns the dims and which rule gave them."""
    dims = [j * d // width for j in range(width)]
    return dims, (f"stride {d // width}" if d % width == 0 else "evenly spaced")


def rope_exponents(width: int) -> list[int]:
    """KV-Latent's exponents a_j (frequency base^(-a_j/width)) for a reduced head of even ``width``: the lower half of
    the width/2 frequencies with stride 2 from width/4, the upper half dense up to width - 1. For a width divisible by
    4 this is the published [w/4, w/4+2, ..., 3w/4-2] + [3w/4, ..., w-1]; otherwise the same rule with the dense part
    floor(w/4) long."""
    n = width // 2
    dense = n // 2
    middle = n - dense
    start = width - dense - 2 * middle
    return [start + 2 * i for i in range(middle)] + list(range(width - dense, width))


ROPES, SCALES = ("latent", "original"), ("reduced", "original")


def expected_exponents(rope: str, qk_dims: list[int]) -> list[int]:
    """The plan's RoPE exponents: KV-Latent's for the reduced width (``latent``), or each kept pair's own, 2i for
    pair i of a width-d head (``original``; the kept dims are whole pairs, ``reduced_dims``)."""
    if rope == "original":
        return [2 * c for c in qk_dims[:len(qk_dims) // 2]]
    return rope_exponents(len(qk_dims))


class LatentRope(torch.nn.Module):
    """RoPE on the reduced head: cos/sin of the positions at the given inverse frequencies, rotate_half layout."""

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # (b, 1, s, width)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class LatentAttention(CompressedAttention):
    """KV-Latent's attention: the reduced q/k/v rows, the matching W_o columns, its own RoPE and softmax scale."""

    def __init__(self, attn, qk_dims: list[int], v_dims: list[int], inv_freq: torch.Tensor, reduced_scale=True):
        super().__init__(attn)
        d, n_heads = self.head_dim, self.n_kv * self.num_key_value_groups
        self.n_qk, self.n_v = len(qk_dims), len(v_dims)
        self.qk_norm = hasattr(attn, "k_norm")  # full-width q/k, normalised as the original, then the strided dims
        if self.qk_norm:
            full_width_qk(self, attn)
            self.register_buffer("qk_index", torch.tensor(qk_dims, device=attn.q_proj.weight.device),
                                 persistent=False)
        else:
            self.q_proj = linear_rows(attn.q_proj, [h * d + c for h in range(n_heads) for c in qk_dims])
            self.k_proj = linear_rows(attn.k_proj, [g * d + c for g in range(self.n_kv) for c in qk_dims])
        self.v_proj = linear_rows(attn.v_proj, [g * d + c for g in range(self.n_kv) for c in v_dims])
        cols = [h * d + c for h in range(n_heads) for c in v_dims]
        self.o_proj = linear(attn.o_proj.weight[:, cols], attn.o_proj.bias)
        self.rope = LatentRope(inv_freq.to(attn.q_proj.weight.device))
        if reduced_scale:  # else the original head's scale, kept by CompressedAttention
            self.scaling = ((getattr(self.config, "query_pre_attn_scalar", None) or d) * self.n_qk / d) ** -0.5

    def project(self, x, position_embeddings, position_ids=None):
        b, s = x.shape[:2]
        if self.qk_norm:
            q = self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim))[..., self.qk_index].transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(b, s, -1, self.head_dim))[..., self.qk_index].transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, s, -1, self.n_qk).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.n_kv, self.n_qk).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.n_v).transpose(1, 2)
        positions = position_ids  # the reduced head's RoPE angles need the positions themselves
        if positions is None:  # called without the decoder layer (layerwise healing): a window from position 0
            positions = torch.arange(s, device=x.device)[None].expand(b, -1)
        cos, sin = self.rope.tables(positions, q.dtype)
        return LatentRope.rotate(q, cos, sin), LatentRope.rotate(k, cos, sin), v


@register
@dataclass
class KVLatent(Method):
    """KV-Latent-style strided dimensions with frequency-aware RoPE.

    Parameters
    ----------
    ratio : float
        Fraction of KV-cache dimensions removed. The K width is twice RAP's kept RoPE pairs and the V width RAP's
        kept V channels at this ratio (``kv_budget``), so every method holds the same KV bytes.
    rope : str
        ``latent`` (the published recipe): the reduced head's new frequencies. ``original``: each kept pair keeps its
        own frequency, which makes the q/k side RAP with evenly spaced pairs (an ablation of the recipe).
    scale : str
        ``reduced`` (the published recipe): softmax scale 1/sqrt(d') of the reduced head. ``original``: the original
        head's scale, as RAP keeps it (an ablation).

    On QK-norm models (Qwen3, Gemma 3) q and k are normalised at full width before the strided dims are taken, as
    RAP's ``qk_norm=exact`` does; the plan says ``qk_norm: exact``.
    """

    rope: str = "latent"
    scale: str = "reduced"
    name = "kvlatent"
    recorded = ("qk_norm",)
    order = 4
    examples = ({}, {"rope": "original", "scale": "original"})

    @property
    def exact_at_zero(self) -> bool:
        """Only its ablation keeping each pair's own frequency and the original scale: the published recipe gives the
        full-width head new frequencies and 1/sqrt(d') at every ratio."""
        return self.rope == "original" and self.scale == "original"

    @classmethod
    def refusal(cls, config) -> str | None:
        if rope_types(config) != {"default"}:
            return (f"KV-Latent's frequency-aware RoPE is defined for plain RoPE (rope_type default); this model uses "
                    f"{', '.join(sorted(rope_types(config)))}.")
        return None

    @classmethod
    def label(cls, row) -> str:
        rope = "original RoPE frequencies" if option(row, "rope") == "original" else "frequency-aware RoPE"
        scale = [", original scale"] if option(row, "scale") == "original" else []
        norm = [f", {qk_norm_words(row)}"] if qk_norm_words(row) else []
        return f"KV-Latent (strided dims, {rope}{''.join(scale + norm)})"

    @staticmethod
    def panel_label(plan: dict) -> str:
        return "KV-Latent"

    @staticmethod
    def kept_frequencies(plan: dict) -> np.ndarray:
        """Its new frequencies, each at the original pair of the same frequency: pair i rotates at base^(-2i/d), so
        exponent a of a width-w head sits at pair a*d/(2w) (w is head_dim itself with ``rope=original``)."""
        half = plan["head_dim"] // 2
        out = np.zeros((len(plan["layers"]), half))
        for i, lp in enumerate(plan["layers"]):
            width = plan["head_dim"] if plan.get("rope") == "original" else len(lp["qk_dims"])
            for a in plan["rope_exponents"]:
                out[i, min(half - 1, round(a * plan["head_dim"] / (2 * width)))] = 1.0
        return out

    def validate(self, config) -> None:
        check_config(config)
        self.check_supported(config)
        kv_budget(self.ratio, head_dim(config))
        for name, value, allowed in (("rope", self.rope, ROPES), ("scale", self.scale, SCALES)):
            if value not in allowed:
                raise ConfigError(f"method.{name}={value!r} is not one of {', '.join(allowed)}")

    def needs_calibration(self, config=None) -> bool:
        return False

    def make_plan(self, model, calibration=None) -> dict:
        self.validate(model.config)
        config, d = model.config, head_dim(model.config)
        n_pairs, n_v = kv_budget(self.ratio, d)
        qk_dims, qk_rule = reduced_dims(d, 2 * n_pairs)
        v_dims, v_rule = reduced_dims(d, n_v)
        layers = [{"qk_dims": qk_dims, "v_dims": v_dims} for _ in range(config.num_hidden_layers)]
        plan = {"method": self.name, "ratio": self.ratio, "head_dim": d, "qk_selection": qk_rule,
                "v_selection": v_rule, "rope": self.rope, "scale": self.scale,
                "rope_exponents": expected_exponents(self.rope, qk_dims),
                "rope_bases": layer_rope_bases(config), "layers": layers}
        return {**plan, "qk_norm": "exact"} if has_qk_norm(config) else plan

    @staticmethod
    def inv_freq(plan: dict, layer: int) -> torch.Tensor:
        """base^(-a/w): ``w`` the reduced width for the new frequencies, the original head_dim for the original."""
        a = torch.tensor(plan["rope_exponents"], dtype=torch.float64)
        width = plan["head_dim"] if plan.get("rope") == "original" else len(plan["layers"][layer]["qk_dims"])
        return (float(plan["rope_bases"][layer]) ** (-a / width)).float()

    @staticmethod
    def apply(model, plan: dict):
        for i, (layer, lp) in enumerate(zip(model.model.layers, plan["layers"], strict=True)):
            layer.self_attn = LatentAttention(layer.self_attn, lp["qk_dims"], lp["v_dims"], KVLatent.inv_freq(plan, i),
                                              reduced_scale=plan.get("scale", "reduced") == "reduced")
        return model

    @staticmethod
    def check_plan(config, plan: dict) -> dict[str, tuple]:
        d = plan["head_dim"]
        if plan.get("qk_norm") != ("exact" if has_qk_norm(config) else None):
            raise PlanError(f"its qk_norm {plan.get('qk_norm')!r} does not fit {config.model_type} (exact with "
                            "q_norm/k_norm, absent without)")
        bases = entry(plan, "rope_bases", "the plan")
        if not isinstance(bases, list) or len(bases) != config.num_hidden_layers or not all(
                isinstance(b, (int, float)) and b > 1 for b in bases):
            raise PlanError("its rope_bases is not one base above 1 per layer")
        widths = set()
        for i, lp in enumerate(plan["layers"]):
            qk = indices(entry(lp, "qk_dims", f"layer {i}"), d, f"layer {i} qk_dims")
            indices(entry(lp, "v_dims", f"layer {i}"), d, f"layer {i} v_dims")
            if not qk or len(qk) % 2 or not lp["v_dims"]:
                raise PlanError(f"layer {i} keeps {len(qk)} q/k dims and {len(lp['v_dims'])} v dims; q/k needs an "
                                "even number of at least 2, v at least 1")
            widths.add(len(qk))
        if len(widths) != 1:
            raise PlanError(f"its layers keep q/k widths {sorted(widths)}; its RoPE exponents fit one width")
        rope, scale = plan.get("rope", "latent"), plan.get("scale", "reduced")  # plans from before the options
        if rope not in ROPES or scale not in SCALES:
            raise PlanError(f"its rope {rope!r} or scale {scale!r} is not one of {ROPES} / {SCALES}")
        qk = plan["layers"][0]["qk_dims"]
        if any(lp["qk_dims"] != qk for lp in plan["layers"]) and rope == "original":
            raise PlanError("its layers keep different q/k dims; original frequencies fit one set")
        if rope == "original" and qk[len(qk) // 2:] != [c + d // 2 for c in qk[:len(qk) // 2]]:
            raise PlanError("its q/k dims are not whole RoPE pairs (i, i + head_dim/2), as original frequencies need")
        if entry(plan, "rope_exponents", "the plan") != expected_exponents(rope, qk):
            raise PlanError(f"its rope_exponents are not KV-Latent's ({rope}) for q/k dims of width {len(qk)}")
        return {}

    @staticmethod
    def attention_shapes(config, plan: dict) -> list[AttentionShape]:
        h, nh, nkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        exact_norm = plan.get("qk_norm") == "exact"
        shapes = []
        for lp in plan["layers"]:
            nqk, nv = len(lp["qk_dims"]), len(lp["v_dims"])
            proj = plan["head_dim"] if exact_norm else nqk  # q/k projected at full width under exact QK-norm
            weights = h * nh * proj + h * nkv * proj + h * nkv * nv + nh * nv * h
            bias = (nh * proj + nkv * (proj + nv)) * has_qkv_bias(config) + h * has_o_bias(config)
            norms = 2 * plan["head_dim"] * exact_norm
            shapes.append(AttentionShape(nh, nqk, nv, nkv * (nqk + nv), weights, weights + bias + norms))
        return shapes
