"""Calibration statistics, gathered layer by layer with hooks (running sums, never stored activations)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .devices import model_device
from .errors import ConfigError
from .hooks import layer_by_layer, temporary_hooks
from .memory import stage
from .modules import trainable_only

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
        raise ConfigError(f"Holding out {n} calibration sequences for scoring needs more than {n}, and the batch has "
                          f"{size}; raise calibration.n_samples.")
    if isinstance(calibration, torch.Tensor):
        return default[:-n], default[-n:]
    return {**calibration, "default": default[:-n]}, default[-n:]


def _layers(model):
    return model.model.layers


@torch.no_grad()
def _forward_each(model, batch: torch.Tensor, handles: list, desc: str) -> None:
    """Run every calibration sequence through the model (hooks collect the statistics), then remove the hooks."""
    dev = model_device(model)
    with temporary_hooks(handles), stage(desc):
        for row in tqdm(batch, desc=desc, leave=False):
            model(row[None].to(dev), use_cache=False)


def _hook_attention(model, make_hook) -> list:
    """A forward pre-hook (with kwargs) ``make_hook(i, attn)`` on every layer's attention; returns the handles."""
    return [layer.self_attn.register_forward_pre_hook(make_hook(i, layer.self_attn), with_kwargs=True)
            for i, layer in enumerate(_layers(model))]


@torch.no_grad()
def channel_energy(model, batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Mean squared output per channel of q_proj, k_proj and v_proj, per layer: ``{"q","k","v"}`` -> list of
    (out_features,) tensors. Pre-RoPE: a RoPE rotation preserves the energy of each (i, i+d/2) pair. With QK-norm
    (Qwen3, Gemma 3) also ``q_post`` and ``k_post``, the same after q_norm/k_norm: what RoPE rotates and scores read."""
    sums = {n: [None] * len(_layers(model)) for n in ("q", "k", "v")}
    handles = []
    for i, layer in enumerate(_layers(model)):
        for n in ("q", "k", "v"):
            def hook(_m, _inp, out, n=n, i=i):
                s = out.detach().float().pow(2).reshape(-1, out.shape[-1]).sum(0)
                sums[n][i] = s if sums[n][i] is None else sums[n][i] + s
            handles.append(getattr(layer.self_attn, f"{n}_proj").register_forward_hook(hook))
    if hasattr(_layers(model)[0].self_attn, "k_norm"):  # QK-norm: also the normalised q and k that RoPE rotates
        for n in ("q_post", "k_post"):
            sums[n] = [None] * len(_layers(model))
        for i, layer in enumerate(_layers(model)):
            def post(_m, args, kwargs, i=i, attn=layer.self_attn):
                _, q, k, _, _, _ = _heads_pre_rope(attn, args, kwargs)
                for n, t in (("q_post", q), ("k_post", k)):
                    s = t.pow(2).sum((0, 2)).reshape(-1)  # (heads·d), head-major as the projection's rows
                    sums[n][i] = s if sums[n][i] is None else sums[n][i] + s
            handles.append(layer.self_attn.register_forward_pre_hook(post, with_kwargs=True))
    _forward_each(model, batch, handles, "calibration (energy)")
    return {n: [s / batch.numel() for s in v] for n, v in sums.items()}


@dataclass
class GradientSettings:
    """How the gradient statistics (Fisher, Taylor) run: ``checkpointing`` recomputes each decoder layer's
    activations in the backward instead of keeping them (transformers' activation checkpointing), and the LM loss
    is computed over ``loss_chunk`` positions at a time, so full-vocabulary logits never exist for every token."""

    checkpointing: bool = False
    loss_chunk: int = 1024


def _chunk_loss(head, hidden, labels):
    return F.cross_entropy(head(hidden).float().flatten(0, 1), labels.flatten(), reduction="sum")


def lm_loss(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The causal LM loss of ``model(ids, labels=ids)``, with the head and the loss over ``chunk`` positions at a
    time; each chunk's logits are recomputed in the backward rather than kept."""
    hidden = model.model(ids, use_cache=False).last_hidden_state[:, :-1]
    labels = ids[:, 1:].to(hidden.device)
    total = sum(checkpoint(_chunk_loss, model.lm_head, hidden[:, i:i + chunk], labels[:, i:i + chunk],
                           use_reentrant=False)
                for i in range(0, labels.shape[1], chunk))
    return total / labels.numel()


def weight_gradients(model, batch: torch.Tensor, kinds=("fisher", "taylor"), rows: bool = True,
                     settings: GradientSettings | None = None) -> dict[str, list[torch.Tensor]]:
    """Per layer, over calibration sequences, for the LM loss: mean squared gradient (``fisher``) and mean |w·g|
    (``taylor``) of the k_proj and v_proj weights, under keys ``fisher_k, fisher_v, taylor_k, taylor_v``.

    Only what is asked for is kept: ``rows=True`` sums each weight row, (out,) per layer (what the pair and
    channel criteria read); ``rows=False`` keeps every element, (out, in) in float32 (Palu's module scores take
    a square root per element). Each weight's gradient is folded in and freed as soon as the backward has
    produced it, so no layer's full gradient outlives its own step. ``settings``: how the backward runs (memory
    savers that change no value; the defaults when None)."""
    settings = settings or GradientSettings()
    dev = model_device(model)
    targets = [(i, n, getattr(layer.self_attn, f"{n}_proj").weight)
               for i, layer in enumerate(_layers(model)) for n in ("k", "v")]
    out = {f"{kind}_{n}": [None] * len(_layers(model)) for kind in kinds for n in ("k", "v")}

    def fold(i, n, w):
        def hook(p):
            g = p.grad.float()
            for kind in kinds:
                x = g.pow(2) if kind == "fisher" else (w.detach().float() * g).abs()
                x = (x.sum(1) if rows else x) / len(batch)
                key = f"{kind}_{n}"
                out[key][i] = x if out[key][i] is None else out[key][i].add_(x)
            p.grad = None
        return hook

    training = model.training
    if settings.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models have no dropout in use
    try:
        with trainable_only(model, [w for _, _, w in targets]), stage("calibration (gradients)"), \
                temporary_hooks([w.register_post_accumulate_grad_hook(fold(i, n, w)) for i, n, w in targets]):
            for row in tqdm(batch, desc="calibration (gradients)", leave=False):
                lm_loss(model, row[None].to(dev), settings.loss_chunk).backward()
    finally:
        if settings.checkpointing:
            model.activation_checkpointing_disable()
        model.train(training)
        model.zero_grad(set_to_none=True)
    return out


def _heads_pre_rope(attn, args, kwargs):
    """In a self_attn forward pre-hook: the input x and the pre-RoPE q, k, v as (b, heads, s, d) float (q and k after
    the model's q_norm/k_norm, if it has them), cos, sin."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    cos, sin = kwargs["position_embeddings"]
    b, s, _ = x.shape
    d = attn.head_dim
    q, k, v = (getattr(attn, f"{n}_proj")(x).view(b, s, -1, d) for n in "qkv")
    if hasattr(attn, "k_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    return x, q, k, v, cos.float(), sin.float()


def _sampled_heads(attn, args, kwargs, n_queries: int):
    """In a self_attn pre-hook: ``_heads_pre_rope``'s x, q, k, v, then q and k after RoPE, and ``n_queries`` query
    positions spread over the last three quarters of the sequence (the first tokens attend to little)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, q, k, v, cos, sin = _heads_pre_rope(attn, args, kwargs)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    s = x.shape[1]
    return x, q, k, v, qr, kr, torch.linspace(s // 4, s - 1, min(n_queries, s)).long().to(x.device)


@torch.no_grad()
def attention_errors(model, batch: torch.Tensor, n_queries: int = 64) -> dict[str, list[torch.Tensor]]:
    """Per layer: ``k`` (n_kv, d/2), the mean |pre-softmax logit change| when RoPE pair i of a KV head is dropped
    (its exact contribution to q·k, over the group's query heads and causal query/key pairs); ``k_signed``, the
    same contribution summed with its sign (EliteKV's "contribution" score); ``v`` (n_kv, d),
    the mean |attention output| of value channel c times the norm of the W_o columns it feeds."""
    L = len(_layers(model))
    acc = {"k": [None] * L, "k_signed": [None] * L, "v": [None] * L}

    def make_hook(i, attn):
        d, rep = attn.head_dim, attn.num_key_value_groups

        def hook(_m, args, kwargs):
            x, _, _, v, q, k, qi = _sampled_heads(attn, args, kwargs, n_queries)
            b, s, _ = x.shape
            nkv = k.shape[1]
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

    _forward_each(model, batch, _hook_attention(model, make_hook), "calibration (attention error)")
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


def attention_input_grams(model, batch: torch.Tensor):
    """Yield ``(i, gram)`` layer by layer: XᵀX (hidden, hidden) of layer i's attention input (the normed hidden
    states that q/k/v_proj read), summed over calibration tokens in float64, what whitened SVD needs. Only one
    layer's Gram exists at a time if the caller drops each (``del``) before asking for the next."""
    for i, layer, run in layer_by_layer(model, batch, "calibration (attention inputs)"):
        acc = []

        def pre(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            if acc:
                acc[0].addmm_(x.T, x)
            else:
                acc.append(x.T @ x)

        handle = layer.self_attn.k_proj.register_forward_pre_hook(pre)
        try:
            with stage("calibration (attention inputs)"):
                run()
        finally:
            handle.remove()
        gram = acc.pop()
        yield i, gram
        del gram


def whitening_grams(model, batch: torch.Tensor | None, whiten: bool):
    """``attention_input_grams`` when ``whiten``, else ``(i, None)`` for every layer (plain SVD)."""
    if whiten:
        return attention_input_grams(model, batch)
    return ((i, None) for i in range(len(_layers(model))))


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
    orders: list = [None] * len(_layers(model))
    gen = torch.Generator().manual_seed(seed)

    def make_hook(i, attn):
        d, rep = attn.head_dim, attn.num_key_value_groups

        def hook(_m, args, kwargs):
            x, q, k, _, qr, kr, qi = _sampled_heads(attn, args, kwargs, n_queries)
            b, s, _ = x.shape
            nkv, half = k.shape[1], d // 2
            kj = (torch.rand(len(qi), n_keys, generator=gen) * (qi.cpu()[:, None] + 1)).long().clamp(max=s - 1)

            def terms(qq, kk):  # per pair: (b, nkv, rep, nq, nk, half)
                qs = qq[:, :, qi].view(b, nkv, rep, len(qi), 1, d)
                ks = kk[:, :, kj.flatten().to(x.device)].view(b, nkv, 1, len(qi), n_keys, d)
                prod = qs * ks
                return prod[..., :half] + prod[..., half:]

            gap = (terms(q, k) - terms(qr, kr)).permute(1, 5, 0, 2, 3, 4).reshape(nkv, half, -1)
            orders[i] = [greedy_order(gap[g]) for g in range(nkv)]

        return hook

    with temporary_hooks(_hook_attention(model, make_hook)), stage("calibration (RoPElite order)"):
        model(batch[:max_sequences].to(model_device(model)), use_cache=False)
    return orders
