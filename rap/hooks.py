"""Running a model with hooks: hooks removed however the block ends, the arguments each decoder layer receives, and
passes over the calibration data one decoder layer at a time."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .devices import model_device


@contextmanager
def temporary_hooks(handles: list):
    """Run the block with the hooks of ``handles`` registered; remove them all on exit, however it ends."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _layers(model):
    return model.model.layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def _on(x, device):
    """``x`` (a tensor, or a tuple or dict of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_on(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _on(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def layer_calls(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """One forward of ``ids``: the first decoder layer's input, and per decoder layer the keyword arguments the model
    passes it (mask, position embeddings...: each layer's own, as Gemma 3's local layers have their RoPE base and a
    sliding-window mask; the same for every sequence of one length)."""
    layers = _layers(model)
    kwargs, first = [None] * len(layers), []

    def keep(i):
        def pre(_m, args, kw):
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == 0:
                first.append(args[0] if args else kw["hidden_states"])
        return pre

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with temporary_hooks(handles):
        model.model(ids.to(model_device(model)), use_cache=False)
    return first[0], kwargs


def layer_arguments(model, ids: torch.Tensor) -> list[dict]:
    """Per decoder layer, the position embeddings and attention mask the model passes it for ``ids`` (1, seqlen).
    The mask has batch 1, so it serves any batch of rows of that length."""
    return [{k: kw.get(k) for k in ("position_embeddings", "attention_mask")} for kw in layer_calls(model, ids)[1]]


@torch.no_grad()
def first_layer_inputs(model, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Every sequence's input to the first decoder layer (each forward stops there), and ``layer_calls``'s
    per-layer keyword arguments."""
    first, kwargs = layer_calls(model, batch[:1])
    hidden, dev = [first], model_device(model)

    def stop(_m, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        raise _Stop

    with temporary_hooks([_layers(model)[0].register_forward_pre_hook(stop, with_kwargs=True)]):
        for row in batch[1:]:
            try:
                model.model(row[None].to(dev), use_cache=False)
            except _Stop:
                pass
    return hidden, kwargs


@torch.no_grad()
def layer_by_layer(model, batch: torch.Tensor, desc: str):
    """Yield ``(i, layer, run)`` for each decoder layer in order; ``run()`` passes every calibration sequence
    through layer i (hooks on it fire) on the layer's own device, and keeps the outputs as the next layer's
    inputs. What is held between layers is the calibration hidden states (n, seqlen, hidden), never a
    statistic of every layer: as sequential compression methods do, each layer's is computed and consumed
    before the next one's."""
    hidden, kwargs = first_layer_inputs(model, batch)
    for i, layer in enumerate(tqdm(_layers(model), desc=desc, leave=False)):
        dev = next(layer.parameters()).device
        kw = _on(kwargs[i], dev)

        @torch.no_grad()  # run by the caller, outside this generator's no_grad: without it autograd would keep
        def run(layer=layer, kw=kw, dev=dev):  # every layer's activations, chained through the hidden states
            for j, x in enumerate(hidden):
                out = layer(x.to(dev), **kw)
                hidden[j] = out[0] if isinstance(out, tuple) else out

        yield i, layer, run
