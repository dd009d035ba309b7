"""Pure tensor code: turn scores into kept indices under a budget."""
from __future__ import annotations

import torch

from ..architecture import check_even_head_dim
from ..errors import ConfigError


def check_ratio(ratio) -> float:
    """``ratio`` as a float in [0, 1), the fraction of KV-cache dimensions removed; one sentence otherwise."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio={ratio!r} is not a number; it is the fraction of KV-cache dimensions removed, in "
                          "[0, 1).") from None
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"ratio={r} is outside [0, 1); it is the fraction of KV-cache dimensions removed.")
    return r


def kept_count(ratio: float, units: int, round_to: int = 1, unit_width: int = 1) -> int:
    """Units kept at ``ratio`` (e.g. RoPE pairs: unit_width 2). ``round_to`` rounds kept dims to a multiple."""
    kept = round((1 - ratio) * units)
    if round_to > 1:  # round the kept dims (units * unit_width) to a multiple of round_to
        dims = max(round_to, round(kept * unit_width / round_to) * round_to)
        kept = dims // unit_width
    return min(units, kept)


def kv_budget(ratio: float, head_dim: int, round_to: int = 1, prune_k: bool = True,
              prune_v: bool = True) -> tuple[int, int]:
    """RAP's kept RoPE pairs and V channels per KV head at ``ratio``: the KV budget every method matches."""
    check_even_head_dim(head_dim)
    n_pairs = kept_count(ratio, head_dim // 2, round_to, unit_width=2) if prune_k else head_dim // 2
    n_v = kept_count(ratio, head_dim, round_to) if prune_v else head_dim
    if n_pairs < 1 or n_v < 1:
        raise ConfigError(f"ratio={ratio} leaves no RoPE pair or V channel of head_dim={head_dim}; lower the ratio.")
    return n_pairs, n_v


def top_per_head(scores: torch.Tensor, k: int) -> list[list[int]]:
    """(heads, units) -> per head the indices of the ``k`` best units, sorted ascending."""
    return [sorted(row.topk(k).indices.tolist()) for row in scores]


def allocate(scores: list[torch.Tensor], keep_per_layer: int, allocation: str = "uniform", floor: int = 1) -> list[int]:
    """Kept units per layer. ``uniform``: the same in every layer. ``global``: the same total, with layers
    ranked by their per-layer-normalised scores (a slot of a layer is worth the heads' mean j-th best score)."""
    L = len(scores)
    if allocation == "uniform":
        return [keep_per_layer] * L
    if allocation != "global":
        raise ConfigError(f"Unknown allocation '{allocation}'; use uniform or global.")
    units = scores[0].shape[1]
    floor = min(floor, keep_per_layer)
    counts = [floor] * L
    slots = []
    for layer, s in enumerate(scores):
        s = s.float() / s.float().mean().clamp_min(1e-12)  # per-layer normalisation
        ranked = s.sort(dim=1, descending=True).values.mean(0)  # (units,) non-increasing
        slots += [(ranked[j].item(), layer) for j in range(floor, units)]
    slots.sort(key=lambda t: -t[0])
    for _, layer in slots[: keep_per_layer * L - floor * L]:
        counts[layer] += 1
    return counts


def least_squares_map(gram: torch.Tensor, kept: list[int], damp: float = 1e-6) -> torch.Tensor:
    """(d, |kept|) matrix M minimising E‖x - M x_kept‖² for x with second moment ``gram`` (d, d):
    M = G[:, S] G[S, S]^-1, ridge-damped relative to the mean diagonal."""
    g = gram.double()
    gss = g[kept][:, kept]
    gss = gss + damp * gss.diagonal().mean() * torch.eye(len(kept), dtype=g.dtype, device=g.device)
    return torch.linalg.solve(gss, g[kept, :]).T.float()  # G[:,S] G[S,S]^-1, using symmetry
