"""Pure tensor code for the low-rank paths: (whitened) SVD factors of projection rows, per group of KV heads,
and the rank budget that matches RAP's KV cache."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def group_size_for(n_kv: int, group_size: int) -> int:
    """KV heads per latent group: ``group_size`` capped at the head count (so 0, or anything >= n_kv, is joint)."""
    g = n_kv if group_size <= 0 else min(group_size, n_kv)
    if n_kv % g:
        raise ConfigError(f"group_size={group_size} does not divide the {n_kv} KV heads; pick a divisor of {n_kv}.")
    return g


def _cholesky(gram: torch.Tensor, jitter: float) -> torch.Tensor:
    """Lower Cholesky factor of ``gram``, adding diagonal jitter (x10 per try) when it is not positive-definite."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    for k in range(8):
        s, info = torch.linalg.cholesky_ex(gram + (0 if k == 0 else jitter * 10 ** (k - 1)) * scale * eye)
        if info.item() == 0:
            return s
    raise ValueError("calibration Gram matrix is not positive-definite even with jitter")


def factorize(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, jitter: float = 1e-6):
    """``weight`` (out, in) ≈ up @ down with down (rank, in) and up (out, rank).

    Without ``gram``: truncated SVD, up = U_r √Σ_r, down = √Σ_r V_rᵀ. With ``gram`` = XᵀX of the layer inputs
    (SVD-LLM whitening): SVD of W·S with S the Cholesky factor of the Gram, then down = √Σ_r V_rᵀ S⁻¹, which
    minimises ‖(W - up·down) X‖ rather than ‖W - up·down‖. Computed in float64.
    """
    w = weight.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        chol = _cholesky(gram.double().to(w.device), jitter)
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        vh = torch.linalg.solve_triangular(chol.T, vh[:rank].T, upper=True).T  # V_rᵀ S⁻¹
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def group_factors(weight: torch.Tensor, head_dim: int, group_size: int, rank: int, gram: torch.Tensor | None = None):
    """Factor the rows of each group of ``group_size`` KV heads of a k/v projection weight (n_kv·d, hidden).
    Returns down (G·rank, hidden), the stacked latents' projections, and up (G, g·d, rank)."""
    rows = group_size * head_dim
    downs, ups = zip(*(factorize(weight[i:i + rows], rank, gram) for i in range(0, weight.shape[0], rows)))
    return torch.cat(downs), torch.stack(ups)


def fisher_uniform_ranks(scores: list[float], total: int, cap: int, floor: int = 1) -> list[int]:
    """Palu's ``fisher_uniform`` rank search: module m gets floor(total · s_m / Σ s), capped at ``cap`` (and at
    least ``floor``); what is left of ``total`` is then handed out one rank at a time, in rounds over the modules
    below their cap, in the order of Palu's code (ascending fractional part of the proportional share).
    ``scores`` are per module (mean sqrt(E[g²]) of its weights); ranks are per latent group of the module."""
    s = [max(float(x), 0.0) for x in scores]
    total = min(total, cap * len(s))
    share = [total * x / sum(s) for x in s] if sum(s) > 0 else [total / len(s)] * len(s)
    ranks = [min(cap, max(floor, math.floor(x))) for x in share]
    order = sorted(range(len(s)), key=lambda m: share[m] - ranks[m])
    left = total - sum(ranks)
    while left > 0 and any(ranks[m] < cap for m in order):
        for m in order:
            if left == 0:
                break
            if ranks[m] < cap:
                ranks[m] += 1
                left -= 1
    while left < 0:  # floors took more than the total: take back from the largest ranks above the floor
        m = max((m for m in order if ranks[m] > floor), key=lambda m: ranks[m])
        ranks[m] -= 1
        left += 1
    return ranks
