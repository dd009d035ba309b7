"""Recovery after compression ("healing"), one procedure for every method: values change, shapes never do.

``layerwise``: for each decoder layer in order, train only that layer's compressed attention parameters to reproduce
the uncompressed attention's output (MSE) on calibration tokens. Each layer's inputs come from the layers below as
already healed and compressed, as sequential pruning methods do, so errors do not pile up.

``e2e``: distil the uncompressed model's next-token distribution (KL divergence) into the compressed one, training
every compressed attention parameter at once. The teacher is the same model with its original attention modules
swapped back in for the teacher's forward, so no second model is held. Meant for GPUs (a full backward per step).

Pure tensor code: the job keeps the I/O and tracking.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .devices import model_device
from .hooks import layer_arguments
from .modules import swapped_attention, trainable_only

HEAL_PREFIX = "heal."
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)  # ``lr="auto"``: every method and layer picks from the same grid
HELD_OUT = 4  # ``lr="auto"``: one row in this many is held out to score the grid, never trained on


def _call(module, x, position_embeddings, attention_mask=None):
    out = module(x, position_embeddings=position_embeddings, attention_mask=attention_mask)
    return out[0] if isinstance(out, tuple) else out


def _train(attn, h, target, scale, pos, mask, rows, steps, lr, batch_size, gen) -> list[float]:
    """Adam on ``attn``'s parameters for ``steps`` steps of ``batch_size`` of ``rows``; each step's relative MSE."""
    params = list(attn.parameters())
    opt, curve = torch.optim.Adam(params, lr=lr), []
    for _ in range(steps):
        pick = rows[torch.randperm(len(rows), generator=gen)[:batch_size]].to(h.device)
        loss = F.mse_loss(_call(attn, h[pick], pos, mask).float(), target[pick].float()) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def pick_lr(model, attn, h, target, scale, pos, mask, steps, batch_size, gen) -> float:
    """The learning rate of ``LR_GRID`` whose training (on a copy of ``attn``, on the rows not held out) leaves the
    smallest relative MSE on the held-out rows: chosen on calibration text alone, never on a test metric."""
    import copy

    rows = torch.arange(len(h))
    held, train = rows[::HELD_OUT], rows[rows % HELD_OUT != 0]
    if len(held) == 0 or len(train) == 0:
        raise ValueError(f"heal.lr=auto holds out one calibration row in {HELD_OUT}; use heal.n_samples >= 2.")
    losses = {}
    for lr in LR_GRID:
        trial = copy.deepcopy(attn)
        with torch.enable_grad(), trainable_only(model, list(trial.parameters())):
            _train(trial, h, target, scale, pos, mask, train, steps, lr, batch_size, gen)
        with torch.no_grad():
            losses[lr] = (F.mse_loss(_call(trial, h[held], pos, mask).float(), target[held].float()) / scale).item()
    return min(losses, key=losses.get)


def heal_layerwise(model, originals: list, batch: torch.Tensor, steps: int, lr: float | str, batch_size: int,
                   seed: int = 0) -> dict:
    """Heal ``model`` (compressed, in place) against ``originals`` (each layer's uncompressed attention module; each
    is dropped once its layer is healed) on ``batch`` (n, seqlen) calibration token ids. ``lr="auto"`` picks each
    layer's learning rate from ``LR_GRID`` by held-out calibration loss (``pick_lr``), then trains on every row.

    Returns ``{"loss": per layer, the relative MSE (MSE / mean square of the target) of each step, "before", "after"
    (per layer, on all of ``batch``), "params" (trainable count), "lr" (per layer, as trained), "time_s"}``.
    """
    t0 = time.time()
    layers, dev = model.model.layers, model_device(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = model.model.embed_tokens(batch.to(dev))
    arguments = layer_arguments(model, batch[:1])  # each layer's RoPE tables and mask (sliding windows on Gemma 3)
    curves, before, after, n_params, lrs = [], [], [], 0, []
    for i, layer in enumerate(tqdm(layers, desc="heal layerwise", leave=False)):
        attn = layer.self_attn
        dev = layer.input_layernorm.weight.device  # this layer's, in a model spread over devices
        pos = tuple(p.to(dev) for p in arguments[i]["position_embeddings"])
        mask = arguments[i]["attention_mask"]
        x, mask = x.to(dev), mask.to(dev) if mask is not None else None
        with torch.no_grad():
            h = layer.input_layernorm(x)
            target = _call(originals[i], h, pos, mask)
            scale = target.float().pow(2).mean().clamp_min(1e-12)
            before.append((F.mse_loss(_call(attn, h, pos, mask).float(), target.float()) / scale).item())
        originals[i] = None  # this layer's uncompressed attention is no longer needed
        params = [p for p in attn.parameters()]
        n_params += sum(p.numel() for p in params)
        layer_lr = pick_lr(model, attn, h, target, scale, pos, mask, steps, batch_size, gen) if lr == "auto" else lr
        lrs.append(layer_lr)
        with torch.enable_grad(), trainable_only(model, params):
            curves.append(_train(attn, h, target, scale, pos, mask, torch.arange(len(h)), steps, layer_lr,
                                 batch_size, gen))
        with torch.no_grad():
            after.append((F.mse_loss(_call(attn, h, pos, mask).float(), target.float()) / scale).item())
            out = layer(x, position_embeddings=pos, attention_mask=mask, use_cache=False)
            x = out[0] if isinstance(out, tuple) else out
    return {"loss": curves, "before": before, "after": after, "params": n_params, "lr": lrs,
            "time_s": time.time() - t0}


def _kl(model, ids, originals, chunk: int = 1024) -> torch.Tensor:
    """Mean KL(teacher || student) per token, the teacher being ``model`` with ``originals`` swapped in. Computed over
    ``chunk`` positions at a time from the last hidden states, so full-vocabulary logits never exist for every token."""
    with torch.no_grad(), swapped_attention(model, originals):
        teacher = model.model(ids).last_hidden_state
    student = model.model(ids).last_hidden_state
    head, total, n = model.lm_head, 0.0, student.shape[0] * student.shape[1]
    t, s = teacher.reshape(n, -1), student.reshape(n, -1)
    for i in range(0, n, chunk):
        with torch.no_grad():
            log_p = F.log_softmax(head(t[i:i + chunk]).float(), -1)
        log_q = F.log_softmax(head(s[i:i + chunk]).float(), -1)
        total = total + F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return total / n


def heal_e2e(model, originals: list, batch: torch.Tensor, steps: int, lr: float, batch_size: int,
             seed: int = 0) -> dict:
    """Distil the uncompressed model (``model`` with ``originals`` swapped in) into the compressed ``model`` (in place)
    on ``batch``; returns ``{"loss": [per-step KL], "before", "after" (KL on all of ``batch``), "params", "time_s"}``.
    ``originals`` are released at the end."""
    t0 = time.time()
    dev = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    batch = batch.to(dev)
    params = [p for layer in model.model.layers for p in layer.self_attn.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def kl_all():
        with torch.no_grad():
            return sum(_kl(model, batch[i:i + batch_size], originals).item() * len(batch[i:i + batch_size])
                       for i in range(0, len(batch), batch_size)) / len(batch)

    before, curve = kl_all(), []
    with torch.enable_grad(), trainable_only(model, params):
        for _ in tqdm(range(steps), desc="heal e2e", leave=False):
            rows = torch.randperm(len(batch), generator=gen)[:batch_size].to(dev)
            loss = _kl(model, batch[rows], originals)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
    after = kl_all()
    originals.clear()
    return {"loss": [curve], "before": [before], "after": [after], "params": sum(p.numel() for p in params),
            "time_s": time.time() - t0}


HEALERS = {"layerwise": heal_layerwise, "e2e": heal_e2e}


def healed_tensors(model) -> dict[str, torch.Tensor]:
    """Every compressed attention parameter, named ``heal.<layer>.<parameter>``: saved with the plan."""
    return {f"{HEAL_PREFIX}{i}.{name}": p.detach().cpu().clone()
            for i, layer in enumerate(model.model.layers) for name, p in layer.self_attn.named_parameters()}


def expected_heal_tensors(model) -> dict[str, tuple]:
    """Name -> shape of the tensors ``load_healed`` needs for ``model`` (compressed, not yet healed)."""
    return {f"{HEAL_PREFIX}{i}.{name}": tuple(p.shape)
            for i, layer in enumerate(model.model.layers) for name, p in layer.self_attn.named_parameters()}


@torch.no_grad()
def load_healed(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy healed values into the compressed attention parameters (names and shapes checked by the caller)."""
    for i, layer in enumerate(model.model.layers):
        for name, p in layer.self_attn.named_parameters():
            p.copy_(tensors[f"{HEAL_PREFIX}{i}.{name}"].to(p))
