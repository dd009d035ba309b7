"""Measured costs (real cache, real parameters, FlopCounterMode) equal the closed-form formulas."""
import pytest
from conftest import TINY

from rap import costs, measure
from rap.models import build_tiny


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("context_len", [1, 37])
def test_measured_costs_equal_formulas(name, context_len):
    model, _ = build_tiny(name)
    cfg = model.config
    m = measure.measure_costs(model, context_len)
    assert m["kv_bytes_per_token"] == costs.kv_bytes_per_token(cfg)
    assert m["kv_bytes"] == context_len * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert m["params_total"] == costs.total_params(cfg)
    assert m["params_attention"] == costs.attention_params(cfg)
    assert m["flops_decode"] == costs.decode_flops(cfg, context_len)
    assert m["flops_decode_attention"] == costs.attention_decode_flops(cfg, context_len)
    assert "scaled_dot_product" in m["sdpa_kernel"]  # the attention kernel itself was counted


def test_decode_flops_grow_linearly_with_context():
    model, _ = build_tiny("tiny-llama")
    f = [measure.measure_costs(model, n)["flops_decode_attention"] for n in (8, 16, 24)]
    assert f[1] - f[0] == f[2] - f[1] > 0


def test_latency_reports_medians():
    model, _ = build_tiny("tiny-llama")
    lat = measure.measure_latency(model, 16, repeats=2, warmup=0, decode_steps=2)
    assert 0 < lat["latency_prefill_attention_ms"] <= lat["latency_prefill_ms"]
    assert 0 < lat["latency_decode_attention_ms"] <= lat["latency_decode_ms"]
    assert lat["latency_device"] == "cpu" and lat["latency_dtype"] == "float32"
