"""Compressed attention modules: real modules with smaller tensors, whose cache holds only what the method
caches.

``CompressedAttention`` is the shared forward (project -> cache -> expand -> attend -> o_proj); a method's
module overrides ``project`` (what is computed from the new tokens and cached) and, if the cached tensors are
not what the kernel attends over, ``expand`` (and ``decode``, the one-token step, to attend without expanding
them). Each method's module lives in the method's own file (RAP's ``PrunedAttention`` in ``rap.methods.rap``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import rotate_half


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def linear_rows(lin: nn.Linear, rows: list[int]) -> nn.Linear:
    """A new Linear holding only ``rows`` of ``lin``'s outputs (weight rows and bias)."""
    return linear(lin.weight[rows], lin.bias[rows] if lin.bias is not None else None)


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


class PairRope(nn.Module):
    """RoPE on a subset of key channels, chosen per KV head: each kept channel keeps its own frequency (cos/sin
    are gathered at its original index) and is rotated with its partner (channel i pairs with i + d/2 in the HF
    rotate_half layout). A channel whose partner was dropped is rotated as if the partner were zero.

    Whole pairs laid out as [pairs..., their partners...] (RAP, EliteKV) are themselves a rotate_half layout, so
    they are rotated with ``rotate_half``; other layouts (the RoPE-blind control) gather each partner.
    """

    def __init__(self, channels: list[list[int]], head_dim: int, device=None):
        super().__init__()
        partners = [rope_partners(c, head_dim) for c in channels]
        n = len(channels[0])
        self.n_kv = len(channels)
        self.paired = n % 2 == 0 and all(p == [(j + n // 2) % n for j in range(n)] for p, _ in partners)
        self.register_buffer("index", torch.tensor(channels, device=device), persistent=False)  # (n_kv, n)
        if not self.paired:  # the rotate_half path needs no partner table
            self.register_buffer("partner", torch.tensor([p for p, _ in partners], device=device), persistent=False)
            self.register_buffer("sign", torch.tensor([s for _, s in partners], device=device), persistent=False)

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (b, s, d) of the full head -> per KV head at the kept channels, (b, n_kv, 1, s, n)."""
        return (cos[:, :, self.index].permute(0, 2, 1, 3)[:, :, None],
                sin[:, :, self.index].permute(0, 2, 1, 3)[:, :, None])

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (b, heads, s, n) with heads a multiple of n_kv (query heads of a group are consecutive)."""
        cos_k, sin_k = tables
        b, h, s, n = x.shape
        xg = x.view(b, self.n_kv, h // self.n_kv, s, n)
        if self.paired:
            other = rotate_half(xg)
        else:
            idx = self.partner[None, :, None, None, :].expand(b, -1, h // self.n_kv, s, -1)
            other = xg.gather(-1, idx) * self.sign[None, :, None, None, :].to(x.dtype)
        return (xg * cos_k + other * sin_k).view(b, h, s, n)


def _o_bias(attn: nn.Module) -> torch.Tensor | None:
    """W_o's bias (float32) with the value bias moved in: a constant under attention weights that sum to 1."""
    d, rep = attn.head_dim, attn.num_key_value_groups
    w = attn.o_proj.weight.float()
    bias = attn.o_proj.bias.float() if attn.o_proj.bias is not None else None
    if attn.v_proj.bias is not None:
        b_v = attn.v_proj.bias.float().view(-1, d).repeat_interleave(rep, 0).reshape(-1)  # per query head
        bias = w @ b_v if bias is None else bias + w @ b_v
    return bias


def latent_o_proj(attn: nn.Module, up: torch.Tensor) -> nn.Linear:
    """W_o with a value latent's up-projection absorbed. ``up`` (G, g·d, r) maps each group's latent to the values
    of its g KV heads; query head h reads the rows of its KV head, so its block of W_o becomes W_o[:, h] @ up_rows.
    The value bias moves into the output bias (``_o_bias``)."""
    d, rep = attn.head_dim, attn.num_key_value_groups
    w = attn.o_proj.weight.float()
    n_heads = w.shape[1] // d
    g = up.shape[1] // d
    blocks = []
    for h in range(n_heads):
        kv = h // rep
        rows = up[kv // g, (kv % g) * d:(kv % g + 1) * d].float().to(w.device)  # (d, r)
        blocks.append(w[:, h * d:(h + 1) * d] @ rows)
    bias, dtype = _o_bias(attn), attn.o_proj.weight.dtype
    return linear(torch.cat(blocks, 1).to(dtype), None if bias is None else bias.to(dtype))


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel gain of a head RMS norm in float32: Gemma's norms scale by (1 + weight), the others by weight."""
    w = norm.weight.detach().float()
    return 1.0 + w if type(norm).__name__.startswith("Gemma") else w


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def full_width_qk(module: nn.Module, attn: nn.Module) -> None:
    """Give ``module`` copies of ``attn``'s full-width q/k projections and its q_norm/k_norm, so QK-norm runs exactly
    as in the original before the kept channels are taken (RAP's ``qk_norm=exact``, KV-Latent on QK-norm models)."""
    module.q_proj, module.k_proj = (linear(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj))
    module.q_norm, module.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)


class KeptHeadNorm(nn.Module):
    """A head RMS norm (Qwen3's or Gemma 3's q_norm/k_norm) over each head's kept channels only, with the statistic
    rescaled to the full head's: x · rsqrt(rho_h · mean_kept(x²) + eps) · gain[kept], where rho_h (calibrated) is the
    ratio of the full head's mean square to the kept channels'. rho is 1 when every channel is kept: the original norm.

    Parameters
    ----------
    norm : the original norm (its gain and eps are copied).
    channels : per head, the kept channels (equal counts).
    rho : (heads,) the per-head correction.
    """

    def __init__(self, norm: nn.Module, channels: list[list[int]], rho: torch.Tensor):
        super().__init__()
        gain = norm_gain(norm)
        dev = norm.weight.device
        self.weight = nn.Parameter(gain[torch.tensor(channels, device=dev)].to(norm.weight.dtype))  # (heads, n)
        self.register_buffer("rho", rho.detach().float().to(dev).view(-1, 1), persistent=False)
        self.eps = norm_eps(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., heads, n)."""
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True) * self.rho
        return (xf * torch.rsqrt(var + self.eps) * self.weight.float()).to(x.dtype)


def layer_rope(rotary: nn.Module, attn: nn.Module) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and attention scaling of ``attn``'s layer: Gemma 3's rotary module holds one set per
    layer type (local and global layers have their own RoPE base), the others one for every layer."""
    kind = getattr(attn, "layer_type", None)
    if kind is not None and hasattr(rotary, f"{kind}_inv_freq"):
        return getattr(rotary, f"{kind}_inv_freq"), float(getattr(rotary, f"{kind}_attention_scaling", 1.0))
    return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


def fused_width(n: int) -> bool:
    """Whether equal q/k and v widths ``n`` reach a fused SDPA kernel on CUDA that reads them in place: flash takes
    at most 256 (and copies its inputs to pad other widths to a multiple of 8), cuDNN and the memory-efficient
    kernel (16-bit) take multiples of 8."""
    return n % 8 == 0 and n <= 256


def pad_widths(q, k, v, multiple: int = 1):
    """Zero-pad q/k or v (..., width) to one common width, rounded up to ``multiple``. Zero columns add nothing to
    any score q·k and give zero output columns past v's width, which the caller cuts off: the output is unchanged.
    Rounding up to 8 keeps a width of at most 256 at most 256 (256 is a multiple of 8)."""
    n_qk, n_v = q.shape[-1], v.shape[-1]
    w = -(-max(n_qk, n_v) // multiple) * multiple
    if w > n_qk:
        q, k = F.pad(q, (0, w - n_qk)), F.pad(k, (0, w - n_qk))
    if w > n_v:
        v = F.pad(v, (0, w - n_v))
    return q, k, v


class LatentUpOut(nn.Module):
    """The value path after attention over a value latent, not absorbed: each query head's attended latent (r) times
    its KV head's rows of the up-projection (d, r) gives the head's d values, then the original W_o (the value bias
    moved into its bias). Holds n_kv·d·r + hidden·n_heads·d weights where ``latent_o_proj`` holds hidden·n_heads·r.

    Parameters
    ----------
    attn : the original attention module.
    up : (G, g·d, r), as for ``latent_o_proj``.
    """

    def __init__(self, attn: nn.Module, up: torch.Tensor):
        super().__init__()
        w = attn.o_proj.weight
        self.rep = attn.num_key_value_groups
        self.up = nn.Parameter(up.reshape(-1, attn.head_dim, up.shape[-1]).to(w).clone())  # (n_kv, d, r)
        bias = _o_bias(attn)
        self.o_proj = linear(w, None if bias is None else bias.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., n_heads·r), query heads of a KV head consecutive -> (..., hidden)."""
        n_kv, _, r = self.up.shape
        # One batched matmul per KV head (tokens and the group's query heads as rows): ``up`` is never repeated.
        v = torch.einsum("...gjr,gdr->...gjd", x.unflatten(-1, (n_kv, self.rep, r)), self.up)
        return self.o_proj(v.flatten(-3))


def decode_attention(q, k, v, mask, scaling: float) -> torch.Tensor:
    """Attention of one new token per sequence over the whole cache, at the true widths and without copying the
    cache: q (b, nh, 1, n), k (b, hk, T, n), v (b, hv, T, m), with hk and hv dividing nh (query heads of a group
    are consecutive). ``mask``: None, boolean (True = attend) or additive, broadcastable to (b, 1, 1, T).
    Returns (b, 1, nh, m)."""
    b, nh, _, n = q.shape
    hk, hv, t = k.shape[1], v.shape[1], k.shape[2]
    if q.is_cuda and hk == hv and n == v.shape[-1] and fused_width(n):
        # Measured on an H100 in bf16 (Llama-3-8B heads, README "On a GPU"): the fused GQA kernels (cuDNN, flash)
        # read the cache in place and run 1.4-3x faster than the matmul path below. The cache is not padded (that
        # would copy it every step), so other widths take the matmul path: with a mask (a static cache) SDPA would
        # fall back to its math kernel, which copies the cache per query head (3-12x slower), and without one flash
        # pads a copy of it (width 90: 1.7-3x slower than the matmul path at batch 4-16, at most 1.4x faster at batch 1;
        # docs/bench/gpu_h100_decode_kernels.txt).
        m = None if mask is None else mask[..., -1:, :t]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling, enable_gqa=True).transpose(1, 2)
    scores = (q.reshape(b, hk, nh // hk, n) @ k.transpose(-1, -2)).reshape(b, nh, t) * scaling
    probs = decode_probs(scores, mask, v.dtype)
    out = probs.reshape(b, hv, nh // hv, t) @ v  # (b, hv, nh/hv, m)
    return out.reshape(b, 1, nh, v.shape[-1])


def decode_probs(scores: torch.Tensor, mask, dtype: torch.dtype) -> torch.Tensor:
    """Attention weights of one new token from its scaled scores (b, nh, T): ``mask`` as for ``decode_attention``,
    softmax in float32, cast to ``dtype``."""
    t = scores.shape[-1]
    if mask is not None:
        mask = mask[..., -1, :t].reshape(mask.shape[0], 1, t)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _to_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(b, h, s, w) with h dividing n -> (b, n, s, w), each head serving n/h consecutive heads."""
    return x if x.shape[1] == n else x.repeat_interleave(n // x.shape[1], dim=1)


class CompressedAttention(nn.Module):
    """Base of the compressed attention modules: a drop-in replacement for a Llama/Mistral/Qwen2 attention.

    The softmax scale stays the module's own (1/sqrt(d), or Gemma 3's query_pre_attn_scalar), and so does its sliding
    window. QK-norm (``q_norm``/``k_norm``) is the subclass's to apply, before RoPE. Subclasses set
    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` as they need and override ``project`` (and ``expand``).
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        cfg = attn.config
        self.config, self.layer_idx = cfg, attn.layer_idx
        self.layer_type = getattr(attn, "layer_type", None)
        self.is_causal, self.attention_dropout = True, attn.attention_dropout
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_key_value_groups = attn.num_key_value_groups
        self.n_kv = cfg.num_key_value_heads

    def project(self, x: torch.Tensor, position_embeddings, position_ids=None) -> tuple[torch.Tensor, ...]:
        """From the new tokens: queries (b, heads, s, w) and what the cache stores for keys and values.
        ``position_ids`` are the decoder layer's (None when called without it, as layer-wise healing does)."""
        raise NotImplementedError

    uses_cache_slots = False  # True: ``expand`` reads ``past`` (read from the cache only then: a GPU sync per layer)

    def expand(self, q, k, v, past: int = 0):
        """From the cached tensors (all cache slots) to the keys and values the kernel attends over; ``past`` is the
        number of tokens cached before the new ones (the slot of the first query). Keys and values may have fewer
        heads than the KV heads (a shared latent): they are repeated to the KV head count."""
        return q, k, v

    def decode(self, q, k, v, mask, past: int = 0) -> torch.Tensor:
        """Attention of one new token per sequence over the cached tensors (all cache slots), (b, 1, heads, v width):
        ``expand``, then ``decode_attention``. A module that can attend over what it caches without expanding it
        overrides this."""
        q, k, v = self.expand(q, k, v, past)
        return decode_attention(q, k, v, mask, self.scaling)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        # The decoder layer passes the cache as `cache` from transformers 5.24 on, as `past_key_values` before.
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        q, k, v = self.project(hidden_states, position_embeddings, kwargs.pop("position_ids", None))
        past = 0
        if cache is not None:
            if self.uses_cache_slots:
                past = int(cache.get_seq_length(self.layer_idx))
            k, v = cache.update(k, v, self.layer_idx)
        if q.shape[2] == 1:  # decode: true widths, no copy of the cache
            out = self.decode(q, k, v, attention_mask, past)
            return self.o_proj(out.reshape(*input_shape, -1)), None
        q, k, v = self.expand(q, k, v, past)
        k, v = _to_heads(k, self.n_kv), _to_heads(v, self.n_kv)
        # The fused SDPA kernels need equal q/k and v widths, else torch runs the math kernel, which materialises
        # every score. Zero-padding the narrower side changes no score and no output and is cheaper even at large
        # gaps: 32 heads x 4096 tokens on 2 CPU threads, q/k 128 padded to a value latent of 360, flash 1.6 s
        # against math 4.8 s (within 10% of each other at 256 tokens). On CUDA the common width is also rounded
        # up to a multiple of 8, which cuDNN and the memory-efficient kernel need (``fused_width``).
        n_v = v.shape[-1]
        q, k, v = pad_widths(q, k, v, 8 if q.is_cuda else 1)
        if self.sliding_window is not None:
            kwargs.setdefault("sliding_window", self.sliding_window)
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out[..., :n_v]
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None
