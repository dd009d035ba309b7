"""Every compressed layer uses the cache it is handed, under whichever argument name the installed transformers
passes it: after a prefill each layer holds tensors of the method's widths, and cached decode reproduces a full
forward over the same tokens. rap's own calls pass no deprecated cache argument."""
import copy
import logging
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rap import compress, get_plan, measure
from rap.compat import CACHE_ARG, cache_kwargs, output_cache
from rap.models import build_tiny

CALIB = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
PREFILL = 16  # the last X.shape[1] - PREFILL tokens are decoded one at a time

METHODS = {
    "none": None,
    "rap": ("rap", dict(criterion="key_energy")),
    "rap-rope_blind": ("rap", dict(criterion="rope_blind")),
    "rap-lowrank_v": ("rap", dict(criterion="key_energy", v_path="lowrank")),
    "palu-joint": ("palu", dict()),
    "palu-per_head": ("palu", dict(group_size=1, decomposition="svd")),
    "elitekv-fold": ("elitekv", dict(elite_pairs=2, value_path="fold")),
    "elitekv-up": ("elitekv", dict(elite_pairs=2, value_path="up")),
}


def compressed(name: str, method: str):
    model, _ = build_tiny(name)
    if METHODS[method] is None:
        return model
    m, opts = METHODS[method]
    return compress(copy.deepcopy(model), m, 0.3, calibration=CALIB, **opts)


@pytest.mark.parametrize("method", METHODS)
def test_static_cache_decode_equals_full_forward(method):
    """A preallocated StaticCache (longer than the text: unfilled slots are masked) gives the same logits."""
    from transformers import StaticCache

    model = compressed("tiny-llama", method)
    cache = StaticCache(config=model.config, max_cache_len=X.shape[1] + 3)
    with torch.no_grad():
        full = model(X, use_cache=False).logits
        out = model(X[:, :PREFILL], use_cache=True, **cache_kwargs(cache))
        steps = [out.logits[:, -1]]
        for t in range(PREFILL, X.shape[1]):
            steps.append(model(X[:, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, PREFILL - 1:], atol=1e-4)


class NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an op returns in new memory (not views of its inputs, not in-place writes)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.shapes += [tuple(t.shape) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given]
        return out


@pytest.mark.parametrize("method", ["elitekv-fold", "elitekv-up"])
def test_elitekv_decode_reads_the_latent_in_place(method):
    """A decode step writes nothing larger than the cached latent itself (the cache's own append): neither the latent
    repeated per KV head, as the generic step does (``expand``), nor q_absorb repeated per query head."""
    from rap.methods.attention import CompressedAttention
    from rap.methods.elitekv import EliteAttention

    model = compressed("tiny-llama", method)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    latent = ids.numel() * get_plan(model)["kv_dim"]  # b x T x kv_dim

    def largest_write():
        with torch.no_grad():
            cache = output_cache(model(ids[:, :-1], use_cache=True))
            with NewTensors() as seen:
                model(ids[:, -1:], use_cache=True, **cache_kwargs(cache))
        return max(math.prod(s) for s in seen.shapes)

    assert largest_write() <= latent
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EliteAttention, "decode", CompressedAttention.decode)
        assert largest_write() >= model.config.num_key_value_heads * latent


@pytest.fixture
def captured_deprecations(caplog):
    """Deprecation warnings (Python warnings and transformers' log-once messages) raised in the block."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # a message logged once earlier in the session must show again
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]


def test_rap_passes_no_deprecated_cache_argument(captured_deprecations):
    model = compressed("tiny-llama", "rap")
    measure.measure_costs(model, 8)
    measure.measure_latency(model, 8, repeats=1, warmup=0, decode_steps=1)
    with torch.no_grad():
        out = model(X[:, :8], use_cache=True)
        model(X[:, 8:9], **cache_kwargs(output_cache(out)))
    hits = [m for m in captured_deprecations() if "past_key_values" in m and CACHE_ARG == "cache"]
    assert hits == []


def test_compressed_layer_reads_the_cache_under_either_name():
    """The module itself, called as 5.23 (past_key_values=) and 5.24 (cache=) decoder layers call it."""
    from transformers import DynamicCache

    model = compressed("tiny-qwen2", "rap")
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 5, model.config.hidden_size)
    pos = model.model.rotary_emb(h, torch.arange(5)[None])
    widths = []
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            attn(h, pos, None, **{name: cache})
        widths.append((cache.layers[0].keys.shape, cache.layers[0].values.shape))
    assert widths[0] == widths[1] and widths[0][0][2] == 5


@pytest.mark.parametrize("method", METHODS)
def test_cached_greedy_generation_equals_full_forward_at_every_step(method):
    """generate() through the compressed cache picks, at every step, the argmax of a full forward without cache."""
    model = compressed("tiny-llama", method)
    prompt = X[:1, :12]
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(8):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(gen, ids)
