"""Changing a loaded model's modules for the length of a block: other attention modules swapped in and back, or
only some parameters trainable and the rest as they were."""
from __future__ import annotations

from contextlib import contextmanager


def swap_attention(model, modules: list) -> list:
    """Put ``modules`` in as the layers' attention; returns the ones taken out (swap them back with this too)."""
    out = [layer.self_attn for layer in model.model.layers]
    for layer, m in zip(model.model.layers, modules, strict=True):
        layer.self_attn = m
    return out


@contextmanager
def swapped_attention(model, modules: list | None = None):
    """Within the block the layers' attention is ``modules`` (or whatever the block puts in, when None); on exit,
    however it ends, the modules that were there before are back, and so is the model's plan (``rap_plan``: a
    compression inside the block leaves none behind). Yields those modules."""
    before = [layer.self_attn for layer in model.model.layers]
    plan = model.__dict__.get("rap_plan")
    if modules is not None:
        swap_attention(model, modules)
    try:
        yield before
    finally:
        swap_attention(model, before)
        model.__dict__.pop("rap_plan", None)
        if plan is not None:
            model.rap_plan = plan


@contextmanager
def trainable_only(model, params: list):
    """Within the block only ``params`` take gradients; on exit every parameter's ``requires_grad`` is as before."""
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, r in was.items():
            p.requires_grad_(r)
