"""Cache-in-the-loop perplexity and KV-cache quantization composed with every method: chunked perplexity through
the cache equals the one-forward perplexity for the weight-level methods, the bytes a quantized cache holds equal
their closed form, and a group size that does not divide a width fails with one sentence naming what works."""
import pytest
import torch
from test_cache import CALIB, METHODS, compressed

from rap import compress
from rap.cache import (
    CacheSpec,
    cache_bytes,
    cached_widths,
    check_group_size,
    make_cache,
    quantized_cache_bytes,
    quantized_tokens,
)
from rap.compat import cache_kwargs
from rap.errors import ConfigError
from rap.harness.perplexity import perplexity

CORPUS = torch.randint(0, 256, (3 * 24,), generator=torch.Generator().manual_seed(2))
SPECS = [CacheSpec("quantized", "hqq", 8, 4, 5), CacheSpec("quantized", "hqq", 4, 4, 8),
         CacheSpec("quantized", "hqq", 2, 2, 3)]


@pytest.mark.parametrize("method", METHODS)
def test_cached_perplexity_equals_one_forward(method):
    model = compressed("tiny-llama", method)
    full = perplexity(model, CORPUS, seqlen=24)
    for chunk in (5, 8):  # 5 leaves a shorter last chunk
        cached = perplexity(model, CORPUS, seqlen=24, chunk=chunk)
        assert cached["window_nll"] == pytest.approx(full["window_nll"], abs=1e-5)


@pytest.mark.parametrize("method", ["none", "rap", "palu-joint", "elitekv-fold", "elitekv-up"])
def test_quantized_cache_bytes_equal_closed_form(method):
    """Measured from the tensors held after an odd-length prefill and decode steps that cross the residual window:
    packed integers, scales and zero-points, full-precision residual; and the closed form agrees term by term."""
    model = compressed("tiny-llama", "none")
    if METHODS[method] is not None:  # ratio 0.25: every cached width is a multiple of 4 (Palu's ranks rounded to 4)
        name, opts = METHODS[method]
        model = compress(model, name, 0.25, calibration=CALIB, **opts, **({"round_to": 4} if name == "palu" else {}))
    shapes = cached_widths(model)
    ids = torch.randint(0, 256, (1, 23 + 9), generator=torch.Generator().manual_seed(3))
    for spec in [CacheSpec()] + SPECS:
        check_group_size(spec, model)
        cache = make_cache(spec, model)
        with torch.no_grad():
            model(ids[:, :23], **cache_kwargs(cache))
            for t in range(23, 32):
                model(ids[:, t:t + 1], **cache_kwargs(cache))
        held = cache_bytes(cache)
        assert held == quantized_cache_bytes(shapes, spec, 23, 9, element_size=4), spec
        if spec.kind == "quantized":
            assert held["packed"] > 0 and held["scales"] > 0
            assert (held["full"] > 0) == (quantized_tokens(23, 9, spec.residual_length)[1] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS[1:] + [CacheSpec("quantized", "quanto", 4, 4, 8),
                                               CacheSpec("quantized", "quanto", 2, 8, 8)],
                         ids=lambda s: s.label)
def test_odd_group_counts_are_held_and_counted(spec):
    """Three KV heads and an odd prompt give an odd group count: HQQ's padding and quanto's rounded-up last byte row
    are real bytes, and the closed form counts them (optimum-quanto compiles its C++ extension on first use)."""
    from rap.models import build_tiny

    model, _ = build_tiny("tiny-llama", num_attention_heads=3, num_key_value_heads=3, hidden_size=48)
    ids = torch.randint(0, 256, (1, 23 + 9), generator=torch.Generator().manual_seed(4))
    cache = make_cache(spec, model)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = [model(ids[:, :23], **cache_kwargs(cache)).logits]
        out += [model(ids[:, t:t + 1], **cache_kwargs(cache)).logits for t in range(23, 32)]
    assert cache_bytes(cache) == quantized_cache_bytes(cached_widths(model), spec, 23, 9, element_size=4)
    assert torch.allclose(out[0], full[:, :23], atol=1e-4)  # the prompt's own pass reads nothing quantized
    assert torch.isfinite(torch.cat(out, 1)).all()


def test_quantized_cache_costs_perplexity_in_order_of_bits():
    """Cached perplexity reads the quantized cache: 8 bits stay within a hair of full precision, 2 bits do not."""
    model = compressed("tiny-llama", "rap")
    fp = perplexity(model, CORPUS, seqlen=24, chunk=6)["nll"]
    gap = {}
    for nbits in (8, 2):
        spec = CacheSpec("quantized", "hqq", nbits, 4, 4)
        gap[nbits] = abs(perplexity(model, CORPUS, seqlen=24, chunk=6,
                                    make_cache=lambda: make_cache(spec, model))["nll"] - fp)
    assert gap[8] < 0.01 < gap[2]


def test_group_size_not_dividing_a_width_fails_naming_what_works():
    model = compressed("tiny-llama", "rap")  # head_dim 16 at ratio 0.3: 6 pairs (12 key dims) and 11 V channels
    assert {s[-1] for kv in cached_widths(model) for s in kv} == {11, 12}
    with pytest.raises(ConfigError,
                       match=r"q_group_size=4 does not divide the cached width 11 .*round_to=4.*q_group_size=1,"):
        check_group_size(CacheSpec("quantized", "hqq", 4, 4, 8), model)
    check_group_size(CacheSpec("quantized", "hqq", 4, 1, 8), model)
    rounded = compress(compressed("tiny-llama", "none"), "rap", 0.3, criterion="weight_norm", round_to=4)
    check_group_size(CacheSpec("quantized", "hqq", 4, 4, 8), rounded)


@pytest.mark.parametrize("bad, message", [
    (dict(kind="fp16"), "Unknown cache kind"),
    (dict(kind="quantized", backend="bnb"), "Unknown cache.backend"),
    (dict(kind="quantized", backend="quanto", nbits=8), "nbits=8 is not available with cache.backend=quanto"),
    (dict(kind="quantized", q_group_size=0), "must be positive"),
])
def test_bad_cache_options_fail_clearly(bad, message):
    with pytest.raises(ConfigError, match=message):
        CacheSpec(**bad).validate()


@pytest.mark.slow
def test_quantized_cache_job_measures_bytes_and_cached_perplexity(tmp_path, data_dir):
    from conftest import compose

    from rap.harness.job import run_job

    cfg = compose("model=tiny-llama", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", "ratio=0.25",
                  "eval.zeroshot.tasks=[]", "calibration.n_samples=2", "calibration.seqlen=32", "cache=quantized",
                  "cache.q_group_size=4", "cache.residual_length=8", "eval.ppl.chunk=16")
    assert (cfg.run_name.endswith("_rap-key_energy-uniform_r0.25_hqq-int4-g4_smoke")
            or "_hqq-int4-g4_smoke-spread" in cfg.run_name)
    m = run_job(cfg, tmp_path / "job")
    assert m["kv_cache"] == "hqq-int4-g4" and m["ppl_mode"] == "cached" and m["ppl_chunk"] == 16
    for part in ("full", "packed", "scales"):
        assert m[f"kv_bytes_{part}"] == m[f"kv_bytes_{part}_formula"] and m[f"kv_bytes_{part}"] > 0
    assert m["kv_bytes_per_token"] == m["kv_bytes_per_token_formula"]
    assert m["kv_bytes_per_token_ratio"] < 0.75  # below RAP's own 0.75 at full precision
    fp = run_job(compose("model=tiny-llama", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", "ratio=0.25",
                         "eval.zeroshot.tasks=[]", "calibration.n_samples=2", "calibration.seqlen=32",
                         "eval.ppl.mode=cached", "eval.ppl.chunk=16"), tmp_path / "fp")
    assert fp["kv_cache"] == "fp" and fp["kv_bytes_per_token_ratio"] == 0.75 and fp["ppl_mode"] == "cached"
    assert m["ppl_wikitext2"] != fp["ppl_wikitext2"]  # the quantized cache is read


def test_the_default_cache_leaves_the_identity_of_earlier_results():
    from rap.harness.results import identity

    old = {"method": {"name": "rap"}, "ratio": 0.2}
    assert identity(old) == identity({**old, "cache": {"name": "dynamic", "tag": ""}})
    assert identity(old) != identity({**old, "cache": {"name": "quantized", "nbits": 4}})
