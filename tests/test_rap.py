"""RAP on tiny models: exactness against the masked oracle, real cache widths, costs, plans, criteria."""
import copy
import json

import pytest
import torch
from conftest import TINY

from rap import apply_plan, compress, costs, get_plan, measure, save_plan
from rap.compat import cache_kwargs, output_cache
from rap.criteria import CRITERIA, score
from rap.errors import ConfigError, ModelError
from rap.models import build_tiny

CALIB = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def masked_reference(model, plan):
    """The oracle: the original model with the pruned K rows and V rows zeroed."""
    ref = copy.deepcopy(model)
    d = plan["head_dim"]
    with torch.no_grad():
        for layer, lp in zip(ref.model.layers, plan["layers"]):
            a = layer.self_attn
            for proj, kept in ((a.k_proj, lp["k_channels"]), (a.v_proj, lp["v_channels"])):
                mask = torch.zeros(proj.weight.shape[0], dtype=torch.bool)
                for g, chans in enumerate(kept):
                    mask[[g * d + c for c in chans]] = True
                proj.weight[~mask] = 0
                if proj.bias is not None:
                    proj.bias[~mask] = 0
    return ref


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("criterion", ["key_energy", "qk_energy"])
def test_masked_oracle_prefill_and_decode(name, criterion):
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), "rap", 0.3, calibration=CALIB, criterion=criterion)
    ref = masked_reference(model, get_plan(c))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    step = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = c(x, use_cache=True), ref(x, use_cache=True)
        assert torch.allclose(a.logits, b.logits, atol=1e-5)
        for _ in range(3):  # cached decode
            la = c(step, **cache_kwargs(output_cache(a))).logits
            lb = ref(step, **cache_kwargs(output_cache(b))).logits
            assert torch.allclose(la, lb, atol=1e-5)


def test_ratio_zero_is_identical():
    model, _ = build_tiny("tiny-qwen2")
    c = compress(copy.deepcopy(model), "rap", 0.0, criterion="weight_norm")
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.allclose(c(x).logits, model(x).logits, atol=1e-6)


@pytest.mark.parametrize("ratio, pairs, v", [(0.2, 6, 13), (0.3, 6, 11), (0.5, 4, 8)])
def test_cache_widths_and_costs(ratio, pairs, v):
    model, _ = build_tiny("tiny-llama")  # head_dim 16: P = round((1-r)*8), V = round((1-r)*16)
    base = measure.measure_costs(model, 16)
    c = compress(model, "rap", ratio, criterion="weight_norm")
    plan = get_plan(c)
    cache = measure.prefill(c, torch.randint(0, 256, (1, 16)))
    for layer in cache.layers:
        assert layer.keys.shape[-1] == 2 * pairs and layer.values.shape[-1] == v
    m = measure.measure_costs(c, 16)
    cfg = c.config
    assert m["kv_bytes_per_token"] == costs.kv_bytes_per_token(cfg, plan) == (
        base["kv_bytes_per_token"] * (2 * pairs + v) / 32)
    assert m["params_attention"] == costs.attention_params(cfg, plan) < base["params_attention"]
    assert m["params_total"] == costs.total_params(cfg, plan)
    assert m["flops_decode"] == costs.decode_flops(cfg, 16, plan) < base["flops_decode"]
    assert m["flops_decode_attention"] == costs.attention_decode_flops(cfg, 16, plan)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_criteria_shapes_determinism_and_budget(criterion):
    model, _ = build_tiny("tiny-mistral")
    s1, s2 = score(criterion, model, CALIB, seed=3), score(criterion, model, CALIB, seed=3)
    assert len(s1["k"]) == len(s1["v"]) == 2
    for k1, k2, v1 in zip(s1["k"], s2["k"], s1["v"]):
        assert k1.shape == (2, 8) and v1.shape == (2, 16)
        assert torch.allclose(k1, k2)
    plan = get_plan(compress(copy.deepcopy(model), "rap", 0.3, calibration=CALIB, criterion=criterion, seed=3))
    for lp in plan["layers"]:
        assert all(len(kc) == 12 and len(set(kc)) == 12 for kc in lp["k_channels"])
        assert all(len(vc) == 11 for vc in lp["v_channels"])
        if criterion != "rope_blind":  # whole pairs
            assert all(set(kc) == {c % 8 for c in kc} | {c % 8 + 8 for c in kc} for kc in lp["k_channels"])


def test_random_criterion_depends_on_seed():
    model, _ = build_tiny("tiny-llama")
    assert not torch.equal(score("random", model, None, seed=0)["k"][0], score("random", model, None, seed=1)["k"][0])


def test_global_allocation_keeps_the_budget():
    model, _ = build_tiny("tiny-llama", num_hidden_layers=4)
    plan = get_plan(compress(model, "rap", 0.4, calibration=CALIB, criterion="key_energy", allocation="global",
                             floor=2))
    k = [len(lp["k_channels"][0]) // 2 for lp in plan["layers"]]
    assert sum(k) == 4 * 5 and min(k) >= 2  # round(0.6 * 8) = 5 pairs per layer on average
    assert sum(len(lp["v_channels"][0]) for lp in plan["layers"]) == 4 * 10


def test_plan_round_trip(tmp_path):
    model, _ = build_tiny("tiny-qwen2")
    c = compress(copy.deepcopy(model), "rap", 0.3, calibration=CALIB, criterion="qk_energy", allocation="global")
    save_plan(c, tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "rap" and plan["criterion"] == "qk_energy" and len(plan["layers"]) == 2
    rebuilt = apply_plan(copy.deepcopy(model), tmp_path / "plan.json")
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, c(x).logits)


def test_generate_and_lm_eval_on_compressed(tmp_path, data_dir):
    from rap.harness.zeroshot import evaluate_zero_shot

    model, tok = build_tiny("tiny-llama")
    c = compress(model, "rap", 0.3, calibration=CALIB, criterion="key_energy")
    out = c.generate(tok("hello", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 5 + 5
    res = evaluate_zero_shot(c, tok, ["piqa"], data_dir, limit=4, work_dir=tmp_path)
    assert res["n_piqa"] == 4 and 0 <= res["acc_piqa"] <= 1


@pytest.mark.parametrize("kept", [[[1, 3, 9, 11], [0, 2, 8, 10]],     # whole pairs (RAP): rotate_half path
                                  [[1, 3, 9, 12], [0, 5, 6, 10]]])   # RoPE-blind: some partners dropped
def test_pair_rope_rotates_kept_channels_like_full_rope_with_dropped_zeroed(kept):
    """Each kept channel keeps its own frequency; a dropped partner counts as zero (the documented control)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from rap.methods.attention import PairRope

    d, b, s = 16, 2, 5
    x = torch.randn(b, 4, s, d)  # 2 KV heads x 2 query heads each
    ang = torch.arange(s)[:, None] * (10000 ** (-torch.arange(d // 2) / (d // 2)))[None]
    cos, sin = (torch.cat([ang, ang], -1).cos()[None].expand(b, s, d),
                torch.cat([ang, ang], -1).sin()[None].expand(b, s, d))
    mask = torch.zeros(4, d)
    for h in range(4):
        mask[h, kept[h // 2]] = 1
    full, _ = apply_rotary_pos_emb(x * mask[None, :, None], x * mask[None, :, None], cos, sin)
    expected = torch.stack([full[:, h, :, kept[h // 2]] for h in range(4)], 1)
    rope = PairRope(kept, d)
    xs = torch.stack([x[:, h, :, kept[h // 2]] for h in range(4)], 1)
    assert rope.paired == (kept[0] == [1, 3, 9, 11])
    assert torch.allclose(rope(xs, rope.tables(cos, sin)), expected, atol=1e-6)


def test_rope_blind_caches_the_same_budget():
    model, _ = build_tiny("tiny-llama")
    c = compress(model, "rap", 0.3, calibration=CALIB, criterion="rope_blind")
    cache = measure.prefill(c, torch.randint(0, 256, (1, 8)))
    assert cache.layers[0].keys.shape[-1] == 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), "outside"),
    (dict(ratio=0.97), "leaves no RoPE pair"),
    (dict(ratio=0.3, criterion="nope"), "Unknown criterion"),
    (dict(ratio=0.3, criterion="key_energy"), "needs calibration"),
    (dict(ratio=0.3, criterion="weight_norm", allocation="wrong"), "Unknown allocation"),
])
def test_bad_input(kwargs, message):
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(ConfigError, match=message):
        compress(model, "rap", **kwargs)


def test_unknown_method_and_odd_head_dim():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(ConfigError, match="Unknown method"):
        compress(model, "lowrank-magic", 0.3)
    with pytest.raises(ModelError, match="odd"):
        from rap.models import check_rope_model

        odd, _ = build_tiny("tiny-llama")
        odd.model.layers[0].self_attn.head_dim = 15
        check_rope_model(odd)


def test_v_refit_reduces_output_error_and_round_trips(tmp_path):
    """The least-squares W_o refit is exact at full V width and beats plain V pruning on calibration text."""
    model, _ = build_tiny("tiny-llama")
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(5))
    x = calib[:2]
    with torch.no_grad():
        ref = model(x).logits
        full = compress(copy.deepcopy(model), "rap", 0.0, calibration=calib, criterion="key_energy", v_refit=True)
        assert torch.allclose(full(x).logits, ref, atol=2e-3)  # ridge damping only
        kw = dict(calibration=calib, criterion="key_energy", prune_k=False)
        plain = compress(copy.deepcopy(model), "rap", 0.5, **kw)
        refit = compress(copy.deepcopy(model), "rap", 0.5, v_refit=True, **kw)
        assert (refit(x).logits - ref).pow(2).mean() < (plain(x).logits - ref).pow(2).mean()
        save_plan(refit, tmp_path / "plan.json")
        assert (tmp_path / "plan.safetensors").exists()
        again = apply_plan(copy.deepcopy(model), tmp_path / "plan.json")
        assert torch.equal(again(x).logits, refit(x).logits)
