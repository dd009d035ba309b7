"""Attention with pruned query/key channels and value channels: a real module with smaller tensors.

Each KV head keeps its own channels. A kept key channel keeps its own RoPE frequency (cos/sin are gathered
at its original index), and is rotated with its RoPE partner (channel i pairs with i + d/2 in the HF
rotate_half layout). With whole pairs kept (RAP), every kept q·k term is exact; a channel whose partner
was dropped (the RoPE-blind control) is rotated as if the partner were zero. The softmax scale stays
1/sqrt(d) of the original head, and the cache holds keys of width ``n_k`` and values of width ``n_v``.
The SDPA kernel itself runs at width max(n_k, n_v) (see ``forward``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def rope_partners(kept: list[int], head_dim: int) -> tuple[list[int], list[float]]:
    """For each kept channel: the position of its RoPE partner among the kept ones (or itself) and the
    sign of the partner's term in rotate_half (-1 for the first half, +1 for the second, 0 if dropped)."""
    half = head_dim // 2
    where = {c: j for j, c in enumerate(kept)}
    partner, sign = [], []
    for j, c in enumerate(kept):
        p = c + half if c < half else c - half
        partner.append(where.get(p, j))
        sign.append(0.0 if p not in where else (-1.0 if c < half else 1.0))
    return partner, sign


class PrunedAttention(nn.Module):
    """Drop-in replacement for a Llama/Mistral/Qwen2 attention module.

    Parameters
    ----------
    attn : the original attention module (weights are copied, not shared).
    k_channels : per KV head, the kept key channels (original indices in [0, head_dim)); equal counts.
    v_channels : per KV head, the kept value channels; equal counts.
    o_maps : optional (n_heads, d, n_v) least-squares maps from each query head's kept value channels to its
        full attention output; W_o of head h becomes W_o[:, head h] @ o_maps[h] (compensates the dropped
        channels). Without it, W_o keeps the matching input columns.
    """

    def __init__(self, attn: nn.Module, k_channels: list[list[int]], v_channels: list[list[int]],
                 o_maps: torch.Tensor | None = None):
        super().__init__()
        cfg = attn.config
        self.config, self.layer_idx = cfg, attn.layer_idx
        self.is_causal, self.attention_dropout = True, attn.attention_dropout
        self.sliding_window = getattr(attn, "sliding_window", None)
        d = self.head_dim = attn.head_dim
        self.scaling = d ** -0.5  # the original scale: kept q·k terms are unchanged, so is their softmax
        n_kv = len(k_channels)
        self.num_key_value_groups = attn.num_key_value_groups
        self.n_k, self.n_v = len(k_channels[0]), len(v_channels[0])
        if any(len(c) != self.n_k for c in k_channels) or any(len(c) != self.n_v for c in v_channels):
            raise ValueError("kept channel counts must be equal across the KV heads of a layer")
        rep = self.num_key_value_groups
        k_rows = [g * d + c for g in range(n_kv) for c in k_channels[g]]
        q_rows = [h * d + c for h in range(n_kv * rep) for c in k_channels[h // rep]]
        v_rows = [g * d + c for g in range(n_kv) for c in v_channels[g]]
        o_cols = [h * d + c for h in range(n_kv * rep) for c in v_channels[h // rep]]

        def rows(lin, idx):
            b = lin.bias[idx] if lin.bias is not None else None
            return _linear(lin.weight[idx], b)

        self.q_proj, self.k_proj, self.v_proj = rows(attn.q_proj, q_rows), rows(attn.k_proj, k_rows), rows(attn.v_proj, v_rows)
        if o_maps is None:
            w_o = attn.o_proj.weight[:, o_cols]
        else:
            w = attn.o_proj.weight
            heads = w.view(w.shape[0], -1, d).transpose(0, 1)  # (n_heads, hidden, d)
            w_o = (heads.float() @ o_maps.to(w.device).float()).transpose(0, 1).reshape(w.shape[0], -1).to(w.dtype)
        self.o_proj = _linear(w_o, attn.o_proj.bias)
        dev = attn.q_proj.weight.device
        partners = [rope_partners(k_channels[g], d) for g in range(n_kv)]
        self.register_buffer("k_index", torch.tensor(k_channels, device=dev), persistent=False)  # (n_kv, n_k)
        self.register_buffer("partner", torch.tensor([p for p, _ in partners], device=dev), persistent=False)
        self.register_buffer("sign", torch.tensor([s for _, s in partners], device=dev), persistent=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_per_kv: int) -> torch.Tensor:
        """x: (b, heads, s, n_k); cos/sin: (b, s, d) of the full head, gathered per KV head at the kept channels."""
        b, h, s, n = x.shape
        idx = self.k_index.repeat_interleave(heads_per_kv, 0)  # (heads, n_k)
        cos_k = cos[:, None, :, :].expand(b, h, s, -1).gather(-1, idx[None, :, None, :].expand(b, h, s, n))
        sin_k = sin[:, None, :, :].expand(b, h, s, -1).gather(-1, idx[None, :, None, :].expand(b, h, s, n))
        partner = self.partner.repeat_interleave(heads_per_kv, 0)[None, :, None, :].expand(b, h, s, n)
        sign = self.sign.repeat_interleave(heads_per_kv, 0)[None, :, None, :].to(x.dtype)
        return x * cos_k + x.gather(-1, partner) * sign * sin_k

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.n_k).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.n_k).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.n_v).transpose(1, 2)
        cos, sin = position_embeddings
        q = self._rope(q, cos, sin, self.num_key_value_groups)
        k = self._rope(k, cos, sin, 1)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # SDPA's fused CPU/GPU kernels need equal q/k and v widths; otherwise torch falls back to the math
        # kernel (3-4x slower on CPU). Zero-padding the narrower side changes no score and no output.
        n = max(self.n_k, self.n_v)
        if self.n_k < n:
            q, k = F.pad(q, (0, n - self.n_k)), F.pad(k, (0, n - self.n_k))
        elif self.n_v < n:
            v = F.pad(v, (0, n - self.n_v))
        kwargs.pop("position_ids", None)
        if self.sliding_window is not None:
            kwargs.setdefault("sliding_window", self.sliding_window)
        out, weights = sdpa_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out[..., : self.n_v]
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
