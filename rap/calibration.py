"""Calibration statistics, gathered layer by layer with hooks (running sums, never stored activations)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .metrics import model_device


# Statistics whose calibration size can be set on its own (``calibration.<name>`` in the config).
STATISTICS = ("whiten", "fisher", "scores", "rope_elite")


def calibration_for(calibration, statistic: str):
    """The token batch one statistic reads. ``calibration`` is one (n, seqlen) batch for every statistic, or a dict
    ``{statistic: batch}`` whose ``"default"`` entry serves the statistics without one of their own."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    return calibration.get(statistic, calibration.get("default"))


def hold_out(calibration, n: int):
    """Split off the last ``n`` sequences of the default batch for scoring: returns ``(fit, held_out)``, where
    ``fit`` is ``calibration`` without them, so no statistic is fitted on the sequences that score it."""
    default = calibration_for(calibration, "default")
    if default is None or len(default) <= n:
        size = 0 if default is None else len(default)
        raise ConfigError(f"Holding out {n} calibration sequences for scoring needs more than {n}, and the batch has {size}; raise calibration.n_samples.")
    if isinstance(calibration, torch.Tensor):
        return default[:-n], default[-n:]
    return {**calibration, "default": default[:-n]}, default[-n:]


def _layers(model):
    return model.model.layers


@torch.no_grad()
def _forward_each(model, batch: torch.Tensor, handles: list, desc: str) -> None:
    """Run every calibration sequence through the model (hooks collect the statistics), then remove the hooks."""
    dev = model_device(model)
    try:
        for row in tqdm(batch, desc=desc, leave=False):
            model(row[None].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_energy(model, batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Mean squared output per channel of q_proj, k_proj and v_proj, per layer: ``{"q","k","v"}`` -> list of
    (out_features,) tensors. Pre-RoPE: a RoPE rotation preserves the energy of each (i, i+d/2) pair."""
    sums = {n: [None] * len(_layers(model)) for n in ("q", "k", "v")}
    handles = []
    for i, layer in enumerate(_layers(model)):
        for n in ("q", "k", "v"):
            def hook(_m, _inp, out, n=n, i=i):
                s = out.detach().float().pow(2).reshape(-1, out.shape[-1]).sum(0)
                sums[n][i] = s if sums[n][i] is None else sums[n][i] + s
            handles.append(getattr(layer.self_attn, f"{n}_proj").register_forward_hook(hook))
    _forward_each(model, batch, handles, "calibration (energy)")
    return {n: [s / batch.numel() for s in v] for n, v in sums.items()}


def weight_gradients(model, batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per layer, over calibration sequences: mean squared gradient (Fisher) and mean |w·g| (Taylor) of the
    k_proj and v_proj weights, for the LM loss. Returns keys ``fisher_k, fisher_v, taylor_k, taylor_v``."""
    dev = model_device(model)
    targets = [(i, n, getattr(layer.self_attn, f"{n}_proj").weight) for i, layer in enumerate(_layers(model)) for n in ("k", "v")]
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, w in targets:
        w.requires_grad_(True)
    out = {f"{kind}_{n}": [torch.zeros_like(w, dtype=torch.float32) for i, nn_, w in targets if nn_ == n]
           for kind in ("fisher", "taylor") for n in ("k", "v")}
    try:
        for row in tqdm(batch, desc="calibration (gradients)", leave=False):
            ids = row[None].to(dev)
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()
            for i, n, w in targets:
                g = w.grad.float()
                out[f"fisher_{n}"][i] += g.pow(2) / len(batch)
                out[f"taylor_{n}"][i] += (w.detach().float() * g).abs() / len(batch)
    finally:
        model.zero_grad(set_to_none=True)
        for p, r in was.items():
            p.requires_grad_(r)
    return out


def _heads_pre_rope(attn, args, kwargs):
    """In a self_attn forward pre-hook: the input x and the pre-RoPE q, k, v as (b, heads, s, d) float, cos, sin."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    cos, sin = kwargs["position_embeddings"]
    b, s, _ = x.shape
    d = attn.head_dim
    q, k, v = (getattr(attn, f"{n}_proj")(x).view(b, s, -1, d).transpose(1, 2).float() for n in "qkv")
    return x, q, k, v, cos.float(), sin.float()


@torch.no_grad()
def attention_errors(model, batch: torch.Tensor, n_queries: int = 64) -> dict[str, list[torch.Tensor]]:
    """Per layer: ``k`` (n_kv, d/2), the mean |pre-softmax logit change| when RoPE pair i of a KV head is dropped
    (its exact contribution to q·k, over the group's query heads and causal query/key pairs); ``k_signed``, the
    same contribution summed with its sign (EliteKV's "contribution" score); ``v`` (n_kv, d),
    the mean |attention output| of value channel c times the norm of the W_o columns it feeds."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    L = len(_layers(model))
    acc = {"k": [None] * L, "k_signed": [None] * L, "v": [None] * L}
    handles = []

    def make_hook(i, attn):
        d, rep = attn.head_dim, attn.num_key_value_groups

        def hook(_m, args, kwargs):
            x, q, k, v, cos, sin = _heads_pre_rope(attn, args, kwargs)
            b, s, _ = x.shape
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            nkv = k.shape[1]
            qi = torch.linspace(s // 4, s - 1, min(n_queries, s)).long().to(x.device)  # skip the first tokens
            qs = q[:, :, qi].view(b, nkv, rep, len(qi), d)
            causal = (torch.arange(s, device=x.device)[None, :] <= qi[:, None]).float()  # (nq, s)
            half = d // 2
            prod = qs[..., None, :] * k[:, :, None, None, :, :]  # (b, nkv, rep, nq, s, d)
            pair = prod[..., :half] + prod[..., half:]
            weight = causal[None, None, None, :, :, None] / (b * rep * causal.sum())
            k_err, k_signed = (pair.abs() * weight).sum((0, 2, 3, 4)), (pair * weight).sum((0, 2, 3, 4))
            logits = (qs @ k[:, :, None].transpose(-1, -2)) * attn.scaling + (causal - 1) * 1e9
            o = torch.softmax(logits, -1) @ v[:, :, None]  # (b, nkv, rep, nq, d)
            w_o = attn.o_proj.weight.float().view(attn.o_proj.weight.shape[0], nkv, rep, d).norm(dim=0)  # (nkv, rep, d)
            v_err = (o.abs().mean((0, 3)) * w_o).sum(1)
            acc["k"][i] = k_err if acc["k"][i] is None else acc["k"][i] + k_err
            acc["k_signed"][i] = k_signed if acc["k_signed"][i] is None else acc["k_signed"][i] + k_signed
            acc["v"][i] = v_err if acc["v"][i] is None else acc["v"][i] + v_err

        return hook

    for i, layer in enumerate(_layers(model)):
        handles.append(layer.self_attn.register_forward_pre_hook(make_hook(i, layer.self_attn), with_kwargs=True))
    _forward_each(model, batch, handles, "calibration (attention error)")
    return {n: [t / len(batch) for t in v] for n, v in acc.items()}


@torch.no_grad()
def attention_output_gram(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the (n_heads, d, d) Gram matrix of each query head's attention output (the input of
    o_proj), summed over calibration tokens: what a least-squares refit of W_o needs."""
    grams = [None] * len(_layers(model))
    handles = []
    for i, layer in enumerate(_layers(model)):
        a = layer.self_attn

        def pre(_m, args, i=i, a=a):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1] // a.head_dim, a.head_dim).transpose(0, 1)  # (heads, tokens, d)
            g = x.transpose(1, 2) @ x
            grams[i] = g if grams[i] is None else grams[i] + g
        handles.append(a.o_proj.register_forward_pre_hook(pre))
    _forward_each(model, batch, handles, "calibration (attention outputs)")
    return grams


@torch.no_grad()
def attention_input_gram(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, XᵀX (hidden, hidden) of the attention input (the normed hidden states that q/k/v_proj read),
    summed over calibration tokens in float64: what whitened SVD needs."""
    grams = [None] * len(_layers(model))
    handles = []
    for i, layer in enumerate(_layers(model)):
        def pre(_m, args, i=i):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            g = x.T @ x
            grams[i] = g if grams[i] is None else grams[i] + g
        handles.append(layer.self_attn.k_proj.register_forward_pre_hook(pre))
    _forward_each(model, batch, handles, "calibration (attention inputs)")
    return grams


def greedy_order(gaps: torch.Tensor) -> list[int]:
    """``gaps`` (units, samples): unit i's term in an error sum over samples. Returns the units in greedy order:
    each round takes the unit whose removal from the sum most reduces its mean absolute value."""
    left = list(range(gaps.shape[0]))
    total = gaps.sum(0)
    order = []
    while left:
        err = (total[None] - gaps[left]).abs().mean(1)
        j = left.pop(int(err.argmin()))
        order.append(j)
        total = total - gaps[j]
    return order


@torch.no_grad()
def rope_elite_order(model, batch: torch.Tensor, n_queries: int = 16, n_keys: int = 64, max_sequences: int = 8,
                     seed: int = 0) -> list[list[list[int]]]:
    """EliteKV's RoPElite: per layer and KV head, the RoPE pairs in greedy order. A pair left without RoPE
    changes the pre-softmax logit q·k by (its unrotated term − its rotated term); each round adds to the elite
    set the pair whose rotation most reduces the mean |logit error| against full RoPE, over the group's query
    heads and sampled causal (query, key) pairs of up to ``max_sequences`` calibration sequences."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    L = len(_layers(model))
    orders: list = [None] * L
    gen = torch.Generator().manual_seed(seed)
    handles = []

    def make_hook(i, attn):
        d, rep = attn.head_dim, attn.num_key_value_groups

        def hook(_m, args, kwargs):
            x, q, k, _, cos, sin = _heads_pre_rope(attn, args, kwargs)
            b, s, _ = x.shape
            qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
            nkv, half = k.shape[1], d // 2
            qi = torch.linspace(s // 4, s - 1, min(n_queries, s)).long()
            kj = (torch.rand(len(qi), n_keys, generator=gen) * (qi[:, None] + 1)).long().clamp(max=s - 1)  # causal

            def terms(qq, kk):  # per pair: (b, nkv, rep, nq, nk, half)
                qs = qq[:, :, qi].view(b, nkv, rep, len(qi), 1, d)
                ks = kk[:, :, kj.flatten().to(x.device)].view(b, nkv, 1, len(qi), n_keys, d)
                prod = qs * ks
                return prod[..., :half] + prod[..., half:]

            gap = (terms(q, k) - terms(qr, kr)).permute(1, 5, 0, 2, 3, 4).reshape(nkv, half, -1)
            orders[i] = [greedy_order(gap[g]) for g in range(nkv)]

        return hook

    for i, layer in enumerate(_layers(model)):
        handles.append(layer.self_attn.register_forward_pre_hook(make_hook(i, layer.self_attn), with_kwargs=True))
    try:
        dev = model_device(model)
        model(batch[:max_sequences].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return orders
