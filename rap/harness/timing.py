"""Timing attention variants against each other: each variant's modules built once and swapped in, its prefill and
decode operations on a cache of the real size, and interleaved timing rounds (``rap.harness.bench``)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..cache import cached_widths
from ..compat import CACHE_ARG
from ..measure import Timer, kernel_used, kv_bytes, rewindable
from ..modules import swap_attention, swapped_attention


@dataclass
class Variant:
    name: str
    method: str
    ratio: float
    round_to: int
    modules: list  # the attention module of each layer


def build_variants(model, methods, ratios, round_tos) -> list[Variant]:
    """``stock``, ``rap-full`` and every compressed variant, each as its own attention modules. The model keeps its
    original modules: each variant is compressed in place and its modules swapped out again (no model copy)."""
    from ..architecture import head_dim
    from ..methods import get_method
    from ..plans import compress

    stock = [layer.self_attn for layer in model.model.layers]

    def compressed(method, ratio, **opts):
        with swapped_attention(model):
            compress(model, method, ratio, **opts)
            return [layer.self_attn for layer in model.model.layers]

    d = head_dim(model.config)
    out = [Variant("stock", "stock", 0.0, 1, stock),
           Variant("rap-full", "rap", 0.0, 1, compressed("rap", 0.0, **get_method("rap").bench_options(d, 1)))]
    for ratio in ratios:
        for rt in round_tos:
            for m in methods:
                cls = get_method(m)
                options = cls.bench_options(d, rt)
                if options is None or cls.refusal(model.config):  # it cannot round to rt, or refuses this model
                    continue
                name = f"{m}-r{ratio}" + (f"-round{rt}" if rt != 1 else "")
                out.append(Variant(name, m, ratio, rt, compressed(m, ratio, **options)))
    return out


def use(model, variant: Variant):
    swap_attention(model, variant.modules)


def _cache(kind: str, model, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_len)


def filled_cache(kind: str, model, context: int, shapes):
    """A cache holding ``context`` random tokens of the current variant's cached tensors (+1 slot when static)."""
    cache = _cache(kind, model, context + 1)
    g = torch.Generator(device=model.device).manual_seed(0)  # drawn where it is used: 32k-token caches on GPU
    dtype = next(model.parameters()).dtype
    for i, (k, v) in enumerate(shapes):
        rand = lambda s: torch.randn(s[0], s[1], context, s[3], generator=g, device=model.device, dtype=dtype)  # noqa: E731
        cache.update(rand(k), rand(v), i)
    return cache


def decode_op(model, batch: int, context: int, kind: str):
    """One decode step at exactly ``context`` cached tokens: (the op, the KV bytes it reads per token per layer)."""
    cache = rewindable(filled_cache(kind, model, context, cached_widths(model, batch)))
    held = kv_bytes(cache)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    pos = torch.full((batch, 1), context, device=model.device)

    def step():
        model(ids, position_ids=pos, use_cache=True, **{CACHE_ARG: cache})
        cache.crop(-1)

    return step, held / (context + (1 if kind == "static" else 0)) / batch / len(cache.layers)


def prefill_op(model, batch: int, seqlen: int, kind: str):
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)

    def step():
        model(ids, use_cache=True, **{CACHE_ARG: _cache(kind, model, seqlen)})

    cache = _cache(kind, model, seqlen)
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_ARG: cache})
    return step, kv_bytes(cache) / seqlen / batch / len(cache.layers)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def memory_mb(device) -> float:
    """Peak GPU memory since the last reset, or the process's resident memory on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def time_cell(model, variants, ops: dict, rounds: int, warmup: int, inner: int, scope: str = "attention") -> dict:
    """Interleaved rounds over the variants (``ops``: name -> (op, KV bytes per token per layer)): per variant, its
    time in ms per call in each round (the attention modules alone, or the whole ``model`` forward), the kernel
    it ran and the memory after its warm-up."""
    from ..measure import attention_timer

    timer = Timer(model.device)
    times = {v.name: [] for v in variants}
    extra = {}
    with torch.no_grad():
        for v in variants:
            use(model, v)
            op = ops[v.name][0]
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                op()
            extra[v.name] = {"kernel": kernel_used(op), "memory_mb": memory_mb(model.device)}
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no variant always first
            for v in order:
                use(model, v)
                op = ops[v.name][0]
                if scope == "model":
                    start = timer.mark()
                    for _ in range(inner):
                        op()
                    times[v.name].append(timer.elapsed_ms(start, timer.mark()) / inner)
                    continue
                with attention_timer(model, timer) as spans:
                    for _ in range(inner):
                        op()
                times[v.name].append(sum(timer.elapsed_ms(a, b) for a, b in spans) / inner)
    use(model, variants[0])
    return {name: {"times": t, "kv_bytes_per_token_layer": ops[name][1], **extra[name]} for name, t in times.items()}


def widths(model) -> tuple[int, int]:
    """(key, value) widths per head of the current variant's cached tensors."""
    k, v = cached_widths(model, 1)[0]
    return k[3], v[3]
