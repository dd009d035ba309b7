"""Pure tensor code for the low-rank paths: (whitened) SVD factors of projection rows, per group of KV heads,
and the rank budget that matches RAP's KV cache."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..errors import ConfigError
from ..memory import stage

DECOMPOSITIONS = ("svd", "whiten")


def check_decomposition(name: str) -> None:
    if name not in DECOMPOSITIONS:
        raise ConfigError(f"Unknown decomposition '{name}'; use svd or whiten.")


def group_size_for(n_kv: int, group_size: int) -> int:
    """KV heads per latent group: ``group_size`` capped at the head count (so 0, or anything >= n_kv, is joint)."""
    g = n_kv if group_size <= 0 else min(group_size, n_kv)
    if n_kv % g:
        raise ConfigError(f"group_size={group_size} does not divide the {n_kv} KV heads; pick a divisor of {n_kv}.")
    return g


@torch.no_grad()  # the weights require grad: a graph would keep every temporary (and the Gram) alive with the factors
def factorize(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, threads: int | None = 1):
    """``weight`` (out, in) ≈ up @ down with down (rank, in) and up (out, rank), computed in float64 on the weight's
    device and returned on the CPU in the weight's dtype.

    Without ``gram``: truncated SVD, up = U_r √Σ_r, down = √Σ_r V_rᵀ. With ``gram`` = XᵀX of the layer inputs
    (SVD-LLM whitening): the factors that minimise ‖(W - up·down) X‖ rather than ‖W - up·down‖. With S the
    Cholesky factor of the Gram, SVD-LLM takes the SVD W·S = U Σ Vᵀ and down = √Σ_r V_rᵀ S⁻¹. Since
    (W·S)(W·S)ᵀ = W·G·Wᵀ, U and Σ² are its eigenvectors and eigenvalues, and V_rᵀ S⁻¹ = Σ_r⁻¹ U_rᵀ W: the same
    factors from an eigendecomposition of the small (out, out) matrix, with no Cholesky of the (in, in) Gram
    (which needed jitter when the Gram is singular). On a Llama-3-8B block (512 x 4096, a 4096² Gram, 1 thread)
    this took 0.3-0.9 s against 2.1-3.8 s for the Cholesky route, with the same error. ``threads``: CPU threads for
    the SVD or eigendecomposition (``linalg_threads``).
    """
    with stage("low-rank factorisation"):
        down, up = _factorize(weight, rank, gram, threads)
    # The factors go into the plan, which is saved and applied from the CPU: on a GPU they would otherwise hold a
    # second copy of the compressed weights beside the modules built from them.
    return down.cpu(), up.cpu()


@contextmanager
def linalg_threads(tensor: torch.Tensor, threads: int | None = 1):
    """Run LAPACK on CPU with ``threads`` threads (None: torch's own count); matmuls keep torch's. On the 2-core
    machines one thread is about as fast as two when the machine is idle, and faster beside other work
    (``experiments/scale.py --threads``; docs/scale.md), so the methods use one."""
    before = torch.get_num_threads()
    if tensor.device.type == "cpu" and threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _factorize(weight, rank, gram, threads):
    w = weight.double()
    if gram is None:
        with linalg_threads(w, threads):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)
    g = gram.to(device=w.device, dtype=torch.float64)
    m = w @ g @ w.T
    with linalg_threads(m, threads):
        evals, evecs = torch.linalg.eigh(m)  # ascending
    u = evecs.flip(-1)[:, :rank]
    # √σ_r = eigenvalue^(1/4); floored so that directions the calibration never excites do not divide by zero
    # (up·down = U_r U_rᵀ W whatever the split).
    root = evals.flip(-1)[:rank].clamp_min(evals[-1].clamp_min(1e-300) * 1e-24).pow(0.25)
    return ((u.T @ w) / root[:, None]).to(weight.dtype), (u * root).to(weight.dtype)


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
