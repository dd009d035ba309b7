"""The KV cache a job runs with, and what it really holds.

``dynamic`` is transformers' ``DynamicCache`` (full precision). ``quantized`` is transformers' ``QuantizedCache``
with a real quantization library behind it (HQQ or optimum-quanto): every ``residual_length`` tokens the cached
tensors are quantized in groups of ``q_group_size`` consecutive channels of one token (HQQ ``axis=1``; quanto
``axis=0``), the newest tokens stay at full precision until then. The cache stores whatever the compressed
attention caches (RAP's narrower keys and values, Palu's latents, EliteKV's latent and elite keys), so
quantization composes with every method.

``cache_bytes`` counts the bytes of every tensor the cache holds (packed integers, scales, zero-points, the
full-precision residual), broken out; ``quantized_cache_bytes`` is the same count in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architecture import sliding_layers
from .compat import cache_kwargs
from .devices import model_device
from .errors import ConfigError

BACKEND_BITS = {"hqq": (2, 4, 8), "quanto": (2, 4)}
BACKEND_PACKAGE = {"hqq": "hqq", "quanto": "optimum.quanto"}
AXIS = {"hqq": 1, "quanto": 0}  # both group consecutive channels of one token (see the module docstring)


@dataclass
class CacheSpec:
    """The ``cache`` config group.

    Parameters
    ----------
    kind : str
        ``dynamic`` (full precision) or ``quantized``.
    backend : str
        ``hqq`` (2, 4 or 8 bits; pure torch) or ``quanto`` (2 or 4 bits; optimum-quanto compiles a small C++
        extension on first use on CPU).
    nbits : int
        Bits per cached element.
    q_group_size : int
        Channels per quantization group (one scale and one zero-point each). It must divide every cached width.
    residual_length : int
        Newest tokens kept at full precision before they are quantized together with the rest.
    """

    kind: str = "dynamic"
    backend: str = "hqq"
    nbits: int = 4
    q_group_size: int = 64
    residual_length: int = 128

    def validate(self) -> None:
        if self.kind not in ("dynamic", "quantized"):
            raise ConfigError(f"Unknown cache kind '{self.kind}'; use cache=dynamic or cache=quantized.")
        if self.kind == "dynamic":
            return
        if self.backend not in BACKEND_BITS:
            raise ConfigError(f"Unknown cache.backend '{self.backend}'; use hqq or quanto.")
        if self.nbits not in BACKEND_BITS[self.backend]:
            raise ConfigError(f"cache.nbits={self.nbits} is not available with cache.backend={self.backend}; "
                              f"use one of {list(BACKEND_BITS[self.backend])}.")
        if self.q_group_size < 1 or self.residual_length < 1:
            raise ConfigError(f"cache.q_group_size={self.q_group_size} and "
                              f"cache.residual_length={self.residual_length} must be positive.")
        try:
            __import__(BACKEND_PACKAGE[self.backend])
        except ImportError:
            raise ConfigError(f"cache.backend={self.backend} needs the "
                              f"{BACKEND_PACKAGE[self.backend].replace('.', '-')} "
                              f"package: pip install 'rap[quant]' (or install requirements.lock).") from None

    @property
    def label(self) -> str:
        return "fp" if self.kind == "dynamic" else f"{self.backend}-int{self.nbits}-g{self.q_group_size}"


def cache_spec(cfg) -> CacheSpec:
    """``CacheSpec`` from the job config's ``cache`` group (absent: dynamic)."""
    if cfg is None:
        return CacheSpec()
    options = dict(cfg)
    kind, _ = options.pop("name", "dynamic"), options.pop("tag", None)
    names = set(CacheSpec.__dataclass_fields__)
    if set(options) - names:
        raise ConfigError(f"Unknown cache option(s) {sorted(set(options) - names)}; the options are "
                          f"{sorted(names - {'kind'})}.")
    spec = CacheSpec(kind=kind, **options)
    spec.validate()
    return spec


@torch.no_grad()
def cached_widths(model, batch: int = 1) -> list[tuple[tuple, tuple]]:
    """Per layer, the (key, value) shapes the model's attention caches for ``batch`` sequences of one token."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(torch.zeros(batch, 1, dtype=torch.long, device=model_device(model)), **cache_kwargs(cache))
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]


def check_group_size(spec: CacheSpec, model, shapes=None) -> None:
    """A group must not straddle two tokens: one clear sentence when ``q_group_size`` does not divide a width.
    ``shapes``: ``cached_widths(model)`` when the caller has it already."""
    if spec.kind != "quantized":
        return
    widths = sorted({s[-1] for k, v in (shapes or cached_widths(model)) for s in (k, v)})
    bad = [w for w in widths if w % spec.q_group_size]
    if bad:
        g = math.gcd(*widths)
        works = max(d for d in (1, 2, 4, 8, 16, 32, 64, 128) if g % d == 0)
        method = getattr(model, "rap_plan", {}).get("method", "none")
        raise ConfigError(
            f"cache.q_group_size={spec.q_group_size} does not divide the cached width {bad[0]} of {method} "
            f"(widths {widths}); set method.round_to={spec.q_group_size} so kept widths are multiples of the group, "
            f"or cache.q_group_size={works}, which divides every width.")


def pack_rows(nbits: int) -> int:
    """Groups HQQ packs into one row of bytes: it packs along the group axis (2 per byte at 4 bits, 4 at 2 bits)."""
    return 8 // nbits


def _hqq_layer_class():
    from transformers.cache_utils import HQQQuantizedLayer

    class GroupPaddedHQQLayer(HQQQuantizedLayer):
        """HQQ cache layer whose group count need not be a multiple of HQQ's packing factor. HQQ packs 2 (4-bit) or
        4 (2-bit) groups per byte row and fails on any other count (an odd prompt length, three KV heads), so the
        groups are padded with up to 3 zero groups, which are quantized, held, counted and dropped on reading."""

        def _quantize(self, tensor, axis):
            groups = tensor.reshape(-1, self.q_group_size)
            pad = -groups.shape[0] % pack_rows(self.nbits)
            if pad:
                groups = torch.cat([groups, groups.new_zeros(pad, self.q_group_size)])
            qtensor, meta = super()._quantize(groups, axis)
            meta["cache_shape"] = tensor.shape
            return qtensor, meta

        def _dequantize(self, qtensor):
            shape = qtensor[1]["cache_shape"]
            return super()._dequantize(qtensor)[: math.prod(shape) // self.q_group_size].reshape(shape)

    return GroupPaddedHQQLayer


def make_cache(spec: CacheSpec, model):
    """A fresh cache of ``spec``'s kind for ``model``."""
    from transformers import DynamicCache, QuantizedCache

    if spec.kind == "dynamic":
        return DynamicCache(config=model.config)  # sliding-window layers keep their window, as the model's own cache
    windows = sum(sliding_layers(model.config))
    if windows:  # transformers' QuantizedCache builds full-attention layers only
        raise ConfigError(f"cache=quantized holds full-attention layers only, and this {model.config.model_type} "
                          f"model has {windows} sliding-window layers; use cache=dynamic.")
    axis = AXIS[spec.backend]
    kwargs = dict(nbits=spec.nbits, axis_key=axis, axis_value=axis, q_group_size=spec.q_group_size,
                  residual_length=spec.residual_length)
    cache = QuantizedCache(backend=spec.backend, config=model.config, **kwargs)
    if spec.backend == "hqq":
        cache.layers = [_hqq_layer_class()(**kwargs) for _ in cache.layers]
    return cache


def _tensors(x) -> list[torch.Tensor]:
    """The plain tensors inside ``x``: a tensor subclass (quanto) is flattened to its inner tensors, HQQ's
    ``(packed, meta)`` pair to the packed tensor and every tensor in its meta dict."""
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    if isinstance(x, torch.Tensor):
        if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
            names, _ = x.__tensor_flatten__()
            return [t for n in names for t in _tensors(getattr(x, n))]
        return [x]
    return []


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def cache_bytes(cache) -> dict:
    """Bytes of every tensor ``cache`` holds, summed over layers: ``total``, and its parts ``full`` (full-precision
    tensors: the whole dynamic cache, or a quantized cache's residual tokens), ``packed`` (quantized integers)
    and ``scales`` (scales and zero-points)."""
    full = packed = scales = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                full += t.numel() * t.element_size()
        for name in ("_quantized_keys", "_quantized_values"):
            q = getattr(layer, name, None)
            if q is None:
                continue
            ts = _tensors(q)
            if isinstance(q, tuple):  # HQQ: (packed, meta)
                packed += _nbytes(_tensors(q[0]))
                scales += _nbytes(_tensors(q[1]))
            else:  # quanto: integer data and float scale / shift
                packed += _nbytes([t for t in ts if not t.is_floating_point()])
                scales += _nbytes([t for t in ts if t.is_floating_point()])
    return {"total": full + packed + scales, "full": full, "packed": packed, "scales": scales}


def measured_split(spec: CacheSpec, context_len: int) -> tuple[int, int]:
    """(prefill tokens, one-token decode steps) that put ``context_len`` tokens in the cache whose bytes are reported:
    a quantized cache decodes its last ``residual_length // 2`` tokens, so it holds half a residual window at full
    precision, its average over a generation."""
    steps = min(spec.residual_length // 2, context_len - 1) if spec.kind == "quantized" else 0
    return context_len - steps, steps


def quantized_tokens(prefill: int, steps: int, residual_length: int) -> tuple[int, int]:
    """(quantized, full-precision residual) tokens in a transformers quantized cache after a prefill of ``prefill``
    tokens and ``steps`` one-token decode steps: the prefill is quantized at once; each step joins the residual,
    and when it reaches ``residual_length`` everything is quantized together."""
    quantized, residual = prefill, 0
    for _ in range(steps):
        if residual + 1 >= residual_length:
            quantized, residual = quantized + residual + 1, 0
        else:
            residual += 1
    return quantized, residual


def quantized_cache_bytes(shapes, spec: CacheSpec, prefill: int, steps: int, element_size: int,
                          scale_size: int | None = None) -> dict:
    """``cache_bytes`` in closed form. ``shapes``: per layer the (key, value) shapes of one token (``cached_widths``),
    batch first. Packed integers take nbits per element (HQQ stores 8-bit values as bytes, 4 bits two per byte, 2 bits
    four per byte; quanto the same); each group of ``q_group_size`` channels of one token has one scale and one
    zero-point of ``scale_size`` bytes (the cache's dtype for HQQ; quanto's scales are the cache dtype too). Both
    pack along the group axis: HQQ's groups are padded to whole byte rows, quanto rounds only its last row up."""
    scale_size = element_size if scale_size is None else scale_size
    if spec.kind == "dynamic":
        n = prefill + steps
        full = sum(math.prod(s[:2]) * n * s[3] for kv in shapes for s in kv) * element_size
        return {"total": full, "full": full, "packed": 0, "scales": 0}
    tq, tr = quantized_tokens(prefill, steps, spec.residual_length)
    full = packed = scales = 0
    for kv in shapes:
        for b, h, _, w in kv:
            full += b * h * tr * w * element_size
            if tq == 0:
                continue
            groups, rows = b * h * tq * w // spec.q_group_size, pack_rows(spec.nbits)
            if spec.backend == "hqq":  # groups padded to whole byte rows (GroupPaddedHQQLayer), scales included
                groups += -groups % rows
            packed += -(-groups // rows) * spec.q_group_size  # quanto rounds its last byte row up
            scales += 2 * groups * scale_size
    return {"total": full + packed + scales, "full": full, "packed": packed, "scales": scales}
