"""Measured costs of a real model: KV bytes from the cache after a prefill, parameters, FLOPs with
``FlopCounterMode`` over one decode step, and prefill/decode latency (CUDA events on GPU)."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .compat import cache_kwargs, output_cache
from .devices import model_device, model_devices
from .hooks import temporary_hooks

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T plus AV, GQA-aware (query heads may be a multiple of KV heads); causal masking not discounted."""
    b, hq, sq, dq = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * hq * sq * sk * dq + 2 * b * hq * sq * sk * dv


# torch's counter has no formula for the CPU flash kernel and asserts equal head counts (no GQA).
SDPA_FLOP_MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention: _sdpa_flops,
    aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    aten._scaled_dot_product_cudnn_attention: _sdpa_flops,
}


def sdpa_kernels(counter: FlopCounterMode) -> str:
    """The SDPA kernels a ``FlopCounterMode`` saw, by name, or ``matmul`` for none (rap's decode path on CPU)."""
    ops = {str(o) for o in counter.get_flop_counts().get("Global", {})}
    return ",".join(sorted(o.replace("aten.", "") for o in ops if "scaled_dot_product" in o)) or "matmul"


def kernel_used(op) -> str:
    """The attention kernel one call of ``op`` dispatches (``sdpa_kernels``)."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_MAPPING)
    with torch.no_grad(), counter:
        op()
    return sdpa_kernels(counter)


def random_ids(model, n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=g).to(model_device(model))


@torch.no_grad()
def prefill(model, ids):
    return output_cache(model(ids, use_cache=True))


def count_params(model) -> dict:
    attn = sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    return {"params_total": sum(p.numel() for p in model.parameters()), "params_attention": attn}


def kv_bytes(cache) -> int:
    """Bytes of every tensor the cache holds (``rap.cache.cache_bytes``' total)."""
    from .cache import cache_bytes

    return cache_bytes(cache)["total"]


@torch.no_grad()
def measure_costs(model, context_len: int, cache_spec=None, press=None) -> dict:
    """A cache holding ``context_len`` real tokens, then one decode step under ``FlopCounterMode``.

    With the default full-precision cache the tokens are one prefill. With a quantized cache (``rap.cache``) the
    last ``residual_length // 2`` of them are decoded one at a time, so the cache holds what it holds on average
    during generation: the quantized tokens and half a residual window at full precision.

    Returns the bytes the cache holds (``kv_bytes``, and its parts ``kv_bytes_full``, ``kv_bytes_packed`` and
    ``kv_bytes_scales``), the FLOPs of the decode step (whole model and ``self_attn`` modules alone), the attention
    kernels that ran in the prefill and the decode step (``sdpa_kernels``), and the parameter counts.

    With a ``press`` (``rap.presses``) the context is pressed before the decode step: ``kv_bytes`` is what the kept
    entries hold, ``kv_bytes_allocated`` what the cache's tensors hold (the same while every head keeps one count),
    and ``press_kept_fraction`` the tokens kept over the tokens seen, the mean over layers and heads.
    """
    from .cache import CacheSpec, cache_bytes, make_cache, measured_split
    from .presses import kept_fraction, next_positions

    spec = cache_spec or CacheSpec()
    n_prefill, _ = measured_split(spec, context_len)
    ids = random_ids(model, context_len)
    cache = make_cache(spec, model)
    with press.capture(model) if press is not None else nullcontext():
        prefill_kernels = kernel_used(lambda: model(ids[:, :n_prefill], use_cache=True, **cache_kwargs(cache)))
    for t in range(n_prefill, context_len):
        model(ids[:, t:t + 1], use_cache=True, **cache_kwargs(cache))
    positions = {}
    if press is not None:
        press.compress(model, cache, ids)
        positions = {"position_ids": next_positions(cache, 1)}
    held, kept = cache_bytes(cache), kept_fraction(cache)
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_MAPPING)
    with counter:
        model(random_ids(model, 1, seed=1), use_cache=True, **cache_kwargs(cache), **positions)
    per_module = counter.get_flop_counts()
    attn = sum(sum(ops.values()) for name, ops in per_module.items() if name.endswith("self_attn"))
    return {
        "context_len": context_len, "kv_bytes": held["total"], "kv_bytes_per_token": held["total"] / context_len,
        **{f"kv_bytes_{k}": held[k] for k in ("full", "packed", "scales")}, "kv_cache": spec.label,
        "kv_bytes_allocated": held["total"], "press_kept_fraction": kept,
        "flops_decode": counter.get_total_flops(), "flops_decode_attention": attn, "sdpa_kernel": sdpa_kernels(counter),
        "sdpa_kernel_prefill": prefill_kernels, **count_params(model),
    }


class Timer:
    """Wall-clock on CPU, CUDA events on GPU: one event per GPU the model uses, each on that GPU's stream.

    A span is the longest of its per-GPU spans. A model spread over GPUs runs its layers one GPU after another,
    each GPU's stream waiting for the copy from the one before, so an idle GPU's start event fires when the span
    starts and the GPU finishing last ends it; timing on one GPU would miss the work queued on the others.
    """

    def __init__(self, devices):
        devices = devices if isinstance(devices, (list, tuple, set)) else [devices]
        self.gpus = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
        self.cuda = bool(self.gpus)

    def mark(self):
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in self.gpus]
            for e, d in zip(events, self.gpus):
                e.record(torch.cuda.current_stream(d))
            return events
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            for d in self.gpus:
                torch.cuda.synchronize(d)
            return max(a.elapsed_time(b) for a, b in zip(start, end))
        return (end - start) * 1e3


@contextmanager
def attention_timer(model, timer: Timer):
    """Accumulates the time spent inside every ``self_attn`` module (hooks at entry and exit)."""
    spans, handles = [], []

    def pre(_m, _a):
        spans.append([timer.mark(), None])

    def post(_m, _a, _o):
        spans[-1][1] = timer.mark()

    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_pre_hook(pre))
        handles.append(layer.self_attn.register_forward_hook(post))
    with temporary_hooks(handles):
        yield spans


def rewindable(cache):
    """``cache`` with its sliding-window layers recording past states, so ``crop(-1)`` can take back a decoded token
    (transformers refuses to crop a full sliding layer otherwise); returns it."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


@torch.no_grad()
def measure_latency(model, context_len: int, repeats: int = 5, warmup: int = 1, decode_steps: int = 8) -> dict:
    """Median prefill time for ``context_len`` tokens and median per-token decode time at that context.

    Decode: each timed step appends one token, then the cache is cropped back to ``context_len``,
    so every step runs at exactly that context.
    """
    devices = model_devices(model)
    timer = Timer(devices)
    ids = random_ids(model, context_len)
    step_ids = random_ids(model, 1, seed=1)

    def timed(fn):
        with attention_timer(model, timer) as spans:
            start = timer.mark()
            out = fn()
            end = timer.mark()
        total = timer.elapsed_ms(start, end)
        return total, sum(timer.elapsed_ms(a, b) for a, b in spans), out

    pre_total, pre_attn = [], []
    for i in tqdm(range(warmup + repeats), desc=f"prefill latency @{context_len}", leave=False):
        t, a, cache = timed(lambda: rewindable(output_cache(model(ids, use_cache=True))))
        if i >= warmup:
            pre_total.append(t)
            pre_attn.append(a)
    dec_total, dec_attn = [], []
    for i in tqdm(range(warmup + decode_steps), desc=f"decode latency @{context_len}", leave=False):
        t, a, _ = timed(lambda: model(step_ids, use_cache=True, **cache_kwargs(cache)))
        cache.crop(-1)  # back to exactly context_len cached tokens
        if i >= warmup:
            dec_total.append(t)
            dec_attn.append(a)
    med = statistics.median
    return {
        "latency_prefill_ms": med(pre_total), "latency_prefill_attention_ms": med(pre_attn),
        "latency_decode_ms": med(dec_total), "latency_decode_attention_ms": med(dec_attn),
        "latency_device": ",".join(map(str, devices)),
        "latency_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "latency_threads": torch.get_num_threads(), "latency_repeats": repeats, "latency_decode_steps": decode_steps,
        "attn_implementation": model.config._attn_implementation,
    }
