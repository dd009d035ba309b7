"""Palu-style, EliteKV-style and RAP with a low-rank V, on tiny models: exactness, real cache contents,
equal KV budget, costs (measured = formula), plans and usability."""
import copy
import json
import math

import pytest
import torch
from conftest import TINY

from rap import apply_plan, compress, costs, get_plan, measure, save_plan
from rap.calibration import attention_errors, attention_input_grams, calibration_for, greedy_order, hold_out
from rap.compat import cache_kwargs, output_cache
from rap.errors import ConfigError
from rap.methods.lowrank import fisher_uniform_ranks
from rap.models import build_tiny

CALIB = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
STEP = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(2))

FULL = [("palu", dict(decomposition="svd")), ("palu", dict(group_size=1)), ("elitekv", dict(elite_pairs=8)),
        ("rap", dict(criterion="key_energy", v_path="lowrank"))]
AT_30 = [("rap", dict(criterion="key_energy")), ("rap", dict(criterion="key_energy", v_path="lowrank")),
         ("palu", dict()), ("palu", dict(group_size=1, decomposition="svd")),
         ("elitekv", dict(elite_pairs=2, value_path="fold")), ("elitekv", dict(elite_pairs=2, value_path="up"))]


def logits_prefill_and_decode(model, steps=2):
    with torch.no_grad():
        out = model(X, use_cache=True)
        seq = [out.logits]
        for _ in range(steps):
            seq.append(model(STEP, **cache_kwargs(output_cache(out))).logits)
    return seq


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method, opts", FULL)
def test_full_rank_is_exact(name, method, opts):
    """Palu at full rank, EliteKV with every pair elite and full kv_dim, RAP's full-rank V path: original logits."""
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), method, 0.0, calibration=CALIB, **opts)
    for a, b in zip(logits_prefill_and_decode(c), logits_prefill_and_decode(model)):
        assert torch.allclose(a, b, atol=1e-4)


def reconstructed_reference(model, plan):
    """The oracle for Palu at any rank: the original model with W_k, W_v replaced by up @ down (biases kept)."""
    ref = copy.deepcopy(model)
    t, g, d = plan["tensors"], plan["group_size"], plan["head_dim"]
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for n in ("k", "v"):
                down, up = t[f"{n}_down.{i}"], t[f"{n}_up.{i}"]
                r = up.shape[2]
                w = torch.cat([up[j] @ down[j * r:(j + 1) * r] for j in range(up.shape[0])])
                getattr(layer.self_attn, f"{n}_proj").weight.copy_(w)
    assert up.shape[1] == g * d
    return ref


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("group_size", [1, 2])
def test_palu_equals_its_low_rank_reconstruction(name, group_size):
    """At ratio 0.3 the latent cache, the key rebuild and the W_o absorption change nothing but W ≈ up·down."""
    model, _ = build_tiny(name)
    c = compress(copy.deepcopy(model), "palu", 0.3, calibration=CALIB, group_size=group_size)
    ref = reconstructed_reference(model, get_plan(c))
    for a, b in zip(logits_prefill_and_decode(c, steps=3), logits_prefill_and_decode(ref, steps=3)):
        assert torch.allclose(a, b, atol=1e-4)


def test_cache_holds_exactly_the_latents():
    model, _ = build_tiny("tiny-llama")  # 2 KV heads, head_dim 16; ratio 0.3 keeps P=6 pairs, 11 V channels
    palu = compress(copy.deepcopy(model), "palu", 0.3, calibration=CALIB, group_size=1, rank_allocation="uniform")
    layer = measure.prefill(palu, X[:1]).layers[0]
    assert layer.keys.shape == (1, 2, 24, 12) and layer.values.shape == (1, 2, 24, 11)
    joint = compress(copy.deepcopy(model), "palu", 0.3, calibration=CALIB, group_size=2, rank_allocation="uniform")
    layer = measure.prefill(joint, X[:1]).layers[0]
    assert layer.keys.shape == (1, 1, 24, 24) and layer.values.shape == (1, 1, 24, 22)
    elite = compress(copy.deepcopy(model), "elitekv", 0.3, calibration=CALIB, elite_pairs=2)
    layer = measure.prefill(elite, X[:1]).layers[0]
    kv_dim = 2 * (12 + 11) - 2 * 4
    assert get_plan(elite)["kv_dim"] == kv_dim
    assert (layer.keys.shape == (1, 1, 24, kv_dim)
            and layer.values.shape == (1, 1, 24, 2 * 4))  # latent; packed elite keys


def test_equal_budget_and_costs_at_ratio_03():
    """Measured KV bytes agree within 2% across methods; measured costs equal the closed forms; Palu's key
    rebuild shows in its decode FLOPs (above RAP's at the same ratio and context)."""
    model, _ = build_tiny("tiny-qwen2")
    ctx, measured = 32, {}
    for method, opts in AT_30:
        c = compress(copy.deepcopy(model), method, 0.3, calibration=CALIB, **opts)
        plan, cfg = get_plan(c), c.config
        m = measure.measure_costs(c, ctx)
        assert m["kv_bytes_per_token"] == costs.kv_bytes_per_token(cfg, plan)
        assert m["params_attention"] == costs.attention_params(cfg, plan)
        assert m["params_total"] == costs.total_params(cfg, plan)
        assert m["flops_decode"] == costs.decode_flops(cfg, ctx, plan)
        assert m["flops_decode_attention"] == costs.attention_decode_flops(cfg, ctx, plan)
        measured[(method, json.dumps(opts))] = m
    kv = [m["kv_bytes_per_token"] for m in measured.values()]
    assert max(kv) <= 1.02 * min(kv)
    rap = measured[("rap", json.dumps(dict(criterion="key_energy")))]
    for (method, _), m in measured.items():
        if method == "palu":
            assert m["flops_decode_attention"] > rap["flops_decode_attention"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_per_head_lowrank_v_costs_what_channel_pruning_costs(name):
    """RAP's low-rank V per KV head: same cache, attention params and decode FLOPs as pruned V channels (the
    up-projection is absorbed into W_o, nothing is rebuilt); a joint latent widens W_o and the value sum."""
    model, _ = build_tiny(name)
    measured = {}
    for label, opts in [("channels", {}), ("per_head", dict(v_path="lowrank", group_size=1)),
                        ("joint", dict(v_path="lowrank", group_size=2))]:
        c = compress(copy.deepcopy(model), "rap", 0.3, calibration=CALIB, criterion="key_energy", **opts)
        measured[label] = measure.measure_costs(c, 32)
    keys = ["kv_bytes_per_token", "params_attention", "flops_decode_attention"]
    assert [measured["per_head"][k] for k in keys] == [measured["channels"][k] for k in keys]
    assert measured["joint"]["kv_bytes_per_token"] == measured["channels"]["kv_bytes_per_token"]
    assert measured["joint"]["params_attention"] > measured["channels"]["params_attention"]
    assert measured["joint"]["flops_decode_attention"] > measured["channels"]["flops_decode_attention"]


@pytest.mark.parametrize("method, opts", [("palu", dict(floor=2)), ("elitekv", dict(search_sequences=1)),
                                          ("rap", dict(criterion="key_energy", v_path="lowrank"))])
def test_plan_round_trip_and_generate(tmp_path, method, opts):
    model, tok = build_tiny("tiny-mistral")
    c = compress(copy.deepcopy(model), method, 0.3, calibration=CALIB, **opts)
    save_plan(c, tmp_path / "plan.json")
    assert (tmp_path / "plan.safetensors").exists()
    rebuilt = apply_plan(copy.deepcopy(model), tmp_path / "plan.json")
    with torch.no_grad():
        assert torch.equal(rebuilt(X).logits, c(X).logits)
    out = c.generate(tok("hello", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 10


def test_fisher_uniform_ranks_on_hand_numbers():
    """Palu's rule: floor of the proportional share, capped; the rest one by one, ascending fractional part."""
    assert fisher_uniform_ranks([1, 2, 3, 4], 20, cap=100) == [2, 4, 6, 8]
    assert fisher_uniform_ranks([1, 2, 3, 4], 20, cap=7) == [3, 4, 6, 7]  # 8 capped at 7; the spare rank goes to m0
    assert fisher_uniform_ranks([1, 1, 1], 10, cap=10) == [4, 3, 3]
    assert (fisher_uniform_ranks([0, 0, 1], 9, cap=8, floor=1) == [1, 1, 7]
            and sum(fisher_uniform_ranks([5, 1], 40, 16)) == 32)


def direct_palu_scores(model, calib):
    """Per module (k_proj, v_proj of each layer, in order): mean over its weights of sqrt(E[g²]), by plain autograd."""
    sq = {}
    for row in calib:
        model.zero_grad()
        model(row[None], labels=row[None]).loss.backward()
        for i, layer in enumerate(model.model.layers):
            for n in ("k", "v"):
                g = getattr(layer.self_attn, f"{n}_proj").weight.grad.double().pow(2) / len(calib)
                sq[(i, n)] = sq.get((i, n), 0) + g
    model.zero_grad()
    return [sq[(i, n)].sqrt().mean().item() for i in range(len(model.model.layers)) for n in ("k", "v")]


@pytest.mark.parametrize("group_size", [1, 2])
def test_palu_fisher_uniform_shares_one_budget_by_sqrt_fisher(group_size):
    model, _ = build_tiny("tiny-llama", num_hidden_layers=4)
    scores = direct_palu_scores(copy.deepcopy(model), CALIB)
    plan = get_plan(compress(model, "palu", 0.3, calibration=CALIB, group_size=group_size))
    assert plan["rank_allocation"] == "fisher_uniform"  # Palu's default
    ranks = [r for lp in plan["layers"] for r in (lp["k_rank"], lp["v_rank"])]
    g = plan["group_size"]
    total, cap = 4 * g * (12 + 11), g * 16  # RAP's K (6 pairs) + V (11 channels) per KV head, per group
    assert sum(ranks) == total and max(ranks) <= cap  # one shared K+V budget, exact
    assert ranks == fisher_uniform_ranks(scores, total, cap)
    # Not rap's former rule (separate K and V budgets, no square root).
    assert sum(ranks[0::2]) != 4 * g * 12 or sum(ranks[1::2]) != 4 * g * 11 or ranks != fisher_uniform_ranks(
        [s * s for s in scores], total, cap)


def test_palu_round_to_rounds_every_rank():
    model, _ = build_tiny("tiny-llama", num_hidden_layers=4)
    plan = get_plan(compress(model, "palu", 0.3, calibration=CALIB, group_size=1, round_to=4))
    assert all(r % 4 == 0 and 4 <= r <= 16 for lp in plan["layers"] for r in (lp["k_rank"], lp["v_rank"]))


def test_elitekv_default_is_plain_svd_of_the_stacked_weights():
    model, _ = build_tiny("tiny-llama")
    plan = get_plan(compress(copy.deepcopy(model), "elitekv", 0.3, calibration=CALIB, elite_pairs=2))
    assert plan["decomposition"] == "svd"
    d, nkv = plan["head_dim"], model.config.num_key_value_heads
    for i, (layer, lp) in enumerate(zip(model.model.layers, plan["layers"])):
        a = layer.self_attn
        nope = [[c for c in range(d) if c % (d // 2) not in set(e)] for e in lp["elite_pairs"]]
        w = torch.cat([a.k_proj.weight[[g * d + c for g in range(nkv) for c in nope[g]]], a.v_proj.weight]).double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = lp["kv_dim"]
        best = (u[:, :r] * s[:r]) @ vh[:r]  # the rank-r truncation, which is unique
        got = plan["tensors"][f"up.{i}"].double() @ plan["tensors"][f"down.{i}"].double()
        assert torch.allclose(got, best, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_elitekv_value_paths_give_the_same_model(name):
    """fold (B_v absorbed into W_o) and up (B_v per KV head after attention, then the original W_o): the same logits at
    prefill and at cached decode steps, the same cache; fewer parameters for up here, each count as its formula says."""
    model, _ = build_tiny(name)
    fold, up = (compress(copy.deepcopy(model), "elitekv", 0.3, calibration=CALIB, elite_pairs=2, value_path=vp)
                for vp in ("fold", "up"))
    assert get_plan(fold)["value_path"] == "fold" and get_plan(up)["value_path"] == "up"
    for a, b in zip(logits_prefill_and_decode(fold, steps=3), logits_prefill_and_decode(up, steps=3)):
        assert torch.allclose(a, b, atol=1e-4)
    measured = [measure.measure_costs(m, 24) for m in (fold, up)]
    assert measured[0]["kv_bytes"] == measured[1]["kv_bytes"]
    assert measured[1]["params_attention"] < measured[0]["params_attention"]
    for m, c in zip((fold, up), measured):
        assert c["params_attention"] == costs.attention_params(m.config, get_plan(m))
        assert c["flops_decode_attention"] == costs.attention_decode_flops(m.config, 24, get_plan(m))


@pytest.mark.parametrize("ratio, expected", [(0.3, "up"), (0.7, "fold")])
def test_elitekv_auto_value_path_holds_fewer_parameters(ratio, expected):
    """On the tiny model the two break even at kv_dim 18: up holds fewer parameters at 0.3 (kv_dim 38), fold at 0.7
    (kv_dim 10)."""
    model, _ = build_tiny("tiny-llama")
    built = {vp: compress(copy.deepcopy(model), "elitekv", ratio, calibration=CALIB, elite_pairs=2, value_path=vp)
             for vp in ("auto", "fold", "up")}
    params = {vp: measure.count_params(m)["params_attention"] for vp, m in built.items()}
    assert get_plan(built["auto"])["value_path"] == expected == min(("fold", "up"), key=params.get)
    assert params["auto"] == params[expected]


def held_out_ppl(model, batch):
    with torch.no_grad():
        return math.exp(sum(model(row[None], labels=row[None]).loss.item() for row in batch) / len(batch))


@pytest.mark.parametrize("decomposition", ["svd", "whiten"])
def test_elitekv_search_builds_candidates_in_place_and_puts_the_model_back(monkeypatch, decomposition):
    """Each candidate r is scored with its modules in place of the model's attention (no model copy), and afterwards
    the model holds the very same modules and weights. A candidate's score is the perplexity of its plan applied to a
    copy, and its tensors are those of a plan made for that r alone (one pass over the layers serves every r)."""
    import rap.methods.elitekv as elitekv

    model, _ = build_tiny("tiny-llama")
    calib = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(3))
    modules = [layer.self_attn for layer in model.model.layers]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    scored, seen = {}, set()
    real_ppl = elitekv._calibration_ppl
    monkeypatch.setattr(elitekv, "_calibration_ppl",
                        lambda m, p, b: scored.setdefault(p["elite_pairs"], p) and real_ppl(m, p, b))
    model.lm_head.register_forward_hook(lambda *_: seen.add(type(model.model.layers[0].self_attn)))
    plan = elitekv.EliteKV(0.3, search_sequences=2, decomposition=decomposition).make_plan(model, calib)
    assert elitekv.EliteAttention in seen  # the scoring forwards ran this very model, compressed
    assert all(a is b for a, b in zip(modules, [layer.self_attn for layer in model.model.layers], strict=True))
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(v, state[k]) for k, v in weights.items())
    assert set(scored) == {1, 2, 4}
    for r, p in scored.items():
        alone = elitekv.EliteKV(0.3, elite_pairs=r, decomposition=decomposition).make_plan(model, calib[:4])
        assert p["layers"] == alone["layers"] and p["kv_dim"] == alone["kv_dim"]
        assert p["tensors"].keys() == alone["tensors"].keys()
        assert all(torch.equal(t, alone["tensors"][k]) for k, t in p["tensors"].items())
        assert plan["search_ppl"][str(r)] == held_out_ppl(apply_plan(copy.deepcopy(model), p), calib[4:])


def test_elitekv_reads_each_layers_gram_once_for_every_candidate(monkeypatch):
    """Whitening Grams may come one layer at a time (any iterable): layer i's serves every candidate r before layer
    i+1's is read, and each candidate's tensors are those of a plan made for that r alone."""
    import rap.methods.elitekv as elitekv

    model, _ = build_tiny("tiny-llama")
    alone = elitekv.EliteKV(0.3, elite_pairs=2, decomposition="whiten").make_plan(model, CALIB)
    search = elitekv.EliteKV(0.3, decomposition="whiten")
    candidates, budget = search._candidates(model.config)
    events, real_factorize = [], elitekv.factorize

    def layer_by_layer():
        for i, g in attention_input_grams(model, CALIB):
            events.append(("gram", i))
            yield i, g

    monkeypatch.setattr(elitekv, "factorize",
                        lambda w, rank, gram: events.append(("factorize", rank)) or real_factorize(w, rank, gram))
    plans = search._plans(model, candidates, budget, search._order(model, CALIB), layer_by_layer())
    kv_dims = [p["kv_dim"] for p in plans]
    assert candidates == [1, 2, 4] and len(set(kv_dims)) == 3
    assert events == [e for i in range(2) for e in [("gram", i), *[("factorize", k) for k in kv_dims]]]
    assert plans[1]["layers"] == alone["layers"]
    assert all(torch.equal(t, alone["tensors"][k]) for k, t in plans[1]["tensors"].items())


def test_elitekv_search_scores_held_out_sequences(monkeypatch):
    import rap.methods.elitekv as elitekv

    seen = {}
    real_order, real_ppl = elitekv.rope_elite_order, elitekv._calibration_ppl
    monkeypatch.setattr(elitekv, "rope_elite_order",
                        lambda m, b, **kw: seen.setdefault("fit", b) is None or real_order(m, b, **kw))
    monkeypatch.setattr(elitekv, "_calibration_ppl",
                        lambda m, p, b: seen.setdefault("score", b) is None or real_ppl(m, p, b))
    model, _ = build_tiny("tiny-llama")
    calib = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(3))
    plan = get_plan(compress(model, "elitekv", 0.3, calibration=calib, search_sequences=2))
    assert torch.equal(seen["fit"], calib[:4]) and torch.equal(seen["score"], calib[4:])
    search = {int(k): v for k, v in plan["search_ppl"].items()}
    assert set(search) == {1, 2, 4} and plan["elite_pairs"] == min(search, key=search.get)
    assert all(len(p) == plan["elite_pairs"] for lp in plan["layers"] for p in lp["elite_pairs"])
    with pytest.raises(ConfigError, match="raise calibration.n_samples"):
        compress(build_tiny("tiny-llama")[0], "elitekv", 0.3, calibration=calib[:2], search_sequences=2)


def test_calibration_per_statistic():
    default, whiten = CALIB, CALIB[:2]
    both = {"default": default, "whiten": whiten}
    assert calibration_for(both, "whiten") is whiten and calibration_for(both, "fisher") is default
    assert calibration_for(default, "whiten") is default and calibration_for(None, "scores") is None
    fit, held = hold_out(both, 1)
    assert fit["whiten"] is whiten and torch.equal(fit["default"], default[:3]) and torch.equal(held, default[3:])


def test_contribution_is_a_signed_sum():
    model, _ = build_tiny("tiny-llama")
    e = attention_errors(model, CALIB)
    for k, signed in zip(e["k"], e["k_signed"]):
        assert (signed.abs() <= k + 1e-6).all() and (signed < 0).any()


def test_greedy_order_takes_the_largest_error_first():
    gaps = torch.tensor([[0.1, 0.1, 0.1], [5.0, 5.0, 5.0], [1.0, -1.0, 1.0]])
    assert greedy_order(gaps) == [1, 2, 0]


@pytest.mark.parametrize("method, opts, message", [
    ("palu", dict(group_size=3), "does not divide"),
    ("palu", dict(decomposition="qr"), "Unknown decomposition"),
    ("palu", dict(rank_allocation="magic"), "Unknown rank_allocation"),
    ("palu", dict(rank_allocation="fisher"), "use fisher_uniform"),
    ("elitekv", dict(selection="best"), "Unknown selection"),
    ("rap", dict(criterion="weight_norm", v_path="dense"), "Unknown v_path"),
    ("palu", dict(ratio=0.97), "leaves no RoPE pair"),
    ("palu", dict(nope=1), "Bad option"),
])
def test_bad_input(method, opts, message):
    model, _ = build_tiny("tiny-llama", num_key_value_heads=4)  # 4 query and 4 KV heads
    opts = {"ratio": 0.3, **opts}
    with pytest.raises(ConfigError, match=message):
        compress(model, method, calibration=CALIB, **opts)


@pytest.mark.parametrize("selection", ["uniform", "contribution", "greedy"])
def test_elite_selection_options(selection):
    model, _ = build_tiny("tiny-llama")
    plan = get_plan(compress(model, "elitekv", 0.3, calibration=CALIB, elite_pairs=3, selection=selection))
    for lp in plan["layers"]:
        for pairs in lp["elite_pairs"]:
            assert len(pairs) == len(set(pairs)) == 3 and all(0 <= p < 8 for p in pairs)
            if selection == "uniform":
                assert pairs == [0, 3, 7]  # evenly spaced over the 8 frequencies, truncated (0, 3.5, 7)
