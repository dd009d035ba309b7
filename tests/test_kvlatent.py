"""KV-Latent on tiny models: the strided rows and frequency-aware RoPE equal the published formula, the module is exact
apart from its chosen frequencies, cached decode equals a full forward, the cache and costs equal their closed forms,
and unsupported models are refused in one sentence."""
import copy

import pytest
import torch
from conftest import TINY
from test_baselines import STEP, X, logits_prefill_and_decode

from analysis.collect import untrained_recipe
from rap import costs, measure
from rap.architecture import layer_rope_bases
from rap.errors import ConfigError, ModelError, PlanError
from rap.methods import get_method
from rap.methods.kvlatent import LatentAttention, reduced_dims, rope_exponents
from rap.models import build_tiny
from rap.plans import apply_plan, compress, get_plan

QK_NORM = ("tiny-qwen3", "tiny-gemma3")


def test_published_exponents_and_strided_dims():
    # d' = 8: a = [d'/4, d'/4 + 2] + [3d'/4, ..., d' - 1]; the highest-frequency quarter (a < 2) is dropped
    assert rope_exponents(8) == [2, 4, 6, 7]
    assert rope_exponents(64) == list(range(16, 48, 2)) + list(range(48, 64))
    assert sorted(set(rope_exponents(44))) == rope_exponents(44) and len(rope_exponents(44)) == 22
    assert reduced_dims(16, 8) == ([0, 2, 4, 6, 8, 10, 12, 14], "stride 2")
    dims, rule = reduced_dims(16, 12)  # no integer stride: evenly spaced, and said so
    assert rule == "evenly spaced" and len(set(dims)) == 12 and dims[0] == 0 and max(dims) < 16


def test_rows_columns_and_frequencies_follow_the_plan():
    model, _ = build_tiny("tiny-llama")
    d, base = 16, layer_rope_bases(model.config)[0]
    c = compress(copy.deepcopy(model), "kvlatent", 0.5)
    plan = get_plan(c)
    assert plan["qk_selection"] == "stride 2" and plan["layers"][0]["qk_dims"] == list(range(0, 16, 2))
    attn, orig = c.model.layers[0].self_attn, model.model.layers[0].self_attn
    rows = [h * d + j for h in range(4) for j in plan["layers"][0]["qk_dims"]]
    assert torch.equal(attn.q_proj.weight, orig.q_proj.weight[rows])
    v_cols = [h * d + j for h in range(4) for j in plan["layers"][0]["v_dims"]]
    assert torch.equal(attn.o_proj.weight, orig.o_proj.weight[:, v_cols])
    a = torch.tensor([2, 4, 6, 7], dtype=torch.float64)
    torch.testing.assert_close(attn.rope.inv_freq, (base ** (-a / 8)).float())
    assert attn.scaling == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("name", TINY)
def test_with_the_original_frequencies_and_scale_the_module_is_exact(name):
    """At ratio 0 every dim is kept; given the original RoPE frequencies and scale it reproduces the original logits,
    so whatever KV-Latent changes is its choice of frequencies (by design, as EliteKV's latent is)."""
    model, _ = build_tiny(name)
    c = copy.deepcopy(model)
    d = c.model.layers[0].self_attn.head_dim
    for layer in c.model.layers:
        inv_freq = c.model.rotary_emb.inv_freq.clone()
        scale = layer.self_attn.scaling
        layer.self_attn = LatentAttention(layer.self_attn, list(range(d)), list(range(d)), inv_freq)
        layer.self_attn.scaling = scale
    for a, b in zip(logits_prefill_and_decode(c), logits_prefill_and_decode(model)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_ablations_keep_each_pairs_own_frequency_and_the_original_scale():
    """rope=original: the q/k side is RAP with evenly spaced pairs (each kept dim rotates at its own frequency, so
    every kept q.k term is exact); scale=original keeps the original softmax scale. Both are recorded in the plan,
    rebuild from it, and bad values are refused."""
    model, _ = build_tiny("tiny-llama")
    d, base = 16, layer_rope_bases(model.config)[0]
    c = compress(copy.deepcopy(model), "kvlatent", 0.3, rope="original", scale="original")
    plan = get_plan(c)
    qk = plan["layers"][0]["qk_dims"]
    half = len(qk) // 2
    assert qk[half:] == [i + d // 2 for i in qk[:half]] and plan["rope"] == "original" and plan["scale"] == "original"
    attn, orig = c.model.layers[0].self_attn, model.model.layers[0].self_attn
    torch.testing.assert_close(attn.rope.inv_freq, model.model.rotary_emb.inv_freq[qk[:half]])
    assert attn.scaling == orig.scaling and plan["rope_exponents"] == [2 * i for i in qk[:half]]
    torch.testing.assert_close(base ** (-torch.tensor(plan["rope_exponents"], dtype=torch.float64) / d),
                               model.model.rotary_emb.inv_freq[qk[:half]].double())
    rebuilt = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X).logits, c(X).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="method.rope='new' is not one of latent, original"):
        compress(copy.deepcopy(model), "kvlatent", 0.3, rope="new")
    with pytest.raises(PlanError, match="rope_exponents"):
        apply_plan(copy.deepcopy(model), {**plan, "rope": "latent"})


@pytest.mark.parametrize("name", ("tiny-llama", *QK_NORM))
def test_original_frequencies_and_scale_at_every_dim_reproduce_the_model(name):
    """At ratio 0 with both ablations on, KV-Latent keeps every pair at its own frequency and the original scale:
    the original logits, QK-norm models (normalised at full width) and Gemma 3's sliding layers included."""
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), "kvlatent", 0.0, rope="original", scale="original")
    for a, b in zip(logits_prefill_and_decode(c), logits_prefill_and_decode(model)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY + QK_NORM)
def test_cached_decode_equals_a_full_forward_and_costs_equal_their_formulas(name):
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), "kvlatent", 0.3)
    plan = get_plan(c)
    seq = logits_prefill_and_decode(c, steps=2)
    with torch.no_grad():
        full = c(torch.cat([X, STEP, STEP], dim=1)).logits
    n = X.shape[1]
    for got, want in zip(seq, (full[:, :n], full[:, n:n + 1], full[:, n + 1:n + 2])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    m = measure.measure_costs(c, 24)
    kept = len(plan["layers"][0]["qk_dims"]) + len(plan["layers"][0]["v_dims"])
    # kv_bytes, not per token: Gemma 3's sliding layers hold at most their window
    assert m["kv_bytes"] == costs.kv_bytes(c.config, 24, plan)
    assert m["kv_bytes"] == costs.kv_bytes(model.config, 24, None) * kept / 32
    assert m["params_attention"] == costs.attention_params(c.config, plan)
    assert m["flops_decode_attention"] == costs.attention_decode_flops(c.config, 24, plan)
    rap = measure.measure_costs(compress(copy.deepcopy(model), "rap", 0.3, criterion="weight_norm"), 24)
    assert m["kv_bytes"] == rap["kv_bytes"]  # the same KV budget as every method


def test_a_saved_plan_rebuilds_the_model(tmp_path):
    from rap.plans import save_plan

    model, _ = build_tiny("tiny-qwen2")
    c = compress(copy.deepcopy(model), "kvlatent", 0.25)
    save_plan(c, tmp_path / "plan.json")
    rebuilt = apply_plan(copy.deepcopy(model), tmp_path / "plan.json")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X).logits, c(X).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", QK_NORM)
def test_qk_norm_models_normalise_at_full_width_then_take_the_strided_dims(name):
    """q and k are projected and normalised as the original, then the strided dims are taken; the plan says so,
    replays, and a plan whose qk_norm does not fit the model is refused. Gemma 3's reduced scale scales its
    query_pre_attn_scalar by d'/d."""
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), "kvlatent", 0.5)
    plan = get_plan(c)
    assert plan["qk_norm"] == "exact"
    assert get_method("kvlatent").plan_record(plan) == {"qk_norm": "exact"}  # metrics.json, hence the table's label
    assert untrained_recipe({"method": "kvlatent", "qk_norm": "exact"}) == \
        "KV-Latent (strided dims, frequency-aware RoPE, QK-norm exact)"
    attn, orig = c.model.layers[0].self_attn, model.model.layers[0].self_attn
    d, dims = orig.head_dim, plan["layers"][0]["qk_dims"]
    with torch.no_grad():
        x = torch.randn(1, 5, model.config.hidden_size)
        want = orig.k_norm(orig.k_proj(x).view(1, 5, -1, d))[..., dims].transpose(1, 2)
        got = attn.k_norm(attn.k_proj(x).view(1, 5, -1, d))[..., attn.qk_index].transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pre = getattr(model.config, "query_pre_attn_scalar", None) or d
    assert attn.scaling == pytest.approx((pre * len(dims) / d) ** -0.5)
    rebuilt = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X).logits, c(X).logits, rtol=0, atol=0)
    with pytest.raises(PlanError, match="qk_norm"):
        apply_plan(copy.deepcopy(model), {k: v for k, v in plan.items() if k != "qk_norm"})


def test_a_healed_plan_on_a_qk_norm_model_rebuilds_the_healed_model(tmp_path):
    from rap.heal import heal_layerwise, healed_tensors
    from rap.plans import save_plan

    model, _ = build_tiny("tiny-gemma3")
    originals = [layer.self_attn for layer in model.model.layers]
    compress(model, "kvlatent", 0.25)
    heal_layerwise(model, originals, torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1)),
                   steps=3, lr=1e-3, batch_size=2)
    plan = get_plan(model)
    plan["tensors"] = {**(plan.get("tensors") or {}), **healed_tensors(model)}
    plan["heal"] = {"mode": "layerwise", "steps": 3}
    save_plan(model, tmp_path / "plan.json")
    rebuilt = apply_plan(build_tiny("tiny-gemma3")[0], tmp_path / "plan.json")
    unhealed = compress(build_tiny("tiny-gemma3")[0], "kvlatent", 0.25)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X).logits, model(X).logits, rtol=0, atol=0)
        assert not torch.allclose(unhealed(X).logits, model(X).logits)


def test_models_it_cannot_reproduce_are_refused():
    model, _ = build_tiny("tiny-llama31")
    with pytest.raises(ModelError, match="plain RoPE"):
        compress(model, "kvlatent", 0.3)
    assert not any(type(layer.self_attn) is LatentAttention for layer in model.model.layers)
