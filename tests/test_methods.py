"""The contract every registered method keeps, checked for each method's ``examples`` on every tiny architecture it
does not refuse: exact at ratio 0 where it claims so, a saved plan rebuilds the same model, cached decode equals a
full forward, measured costs equal the closed form, compressed modules live on their layer's device, and healing
changes values but no shape or cost. A new method is held to all of it by registering (``rap.methods.base``)."""
import copy
from dataclasses import dataclass

import pytest
import torch

from rap import costs, measure
from rap.cache import cache_spec
from rap.compat import cache_kwargs, output_cache
from rap.errors import ModelError
from rap.heal import heal_layerwise
from rap.methods import METHODS, make_method
from rap.methods.attention import CompressedAttention
from rap.methods.base import register
from rap.methods.rap import RAP
from rap.models import build_tiny
from rap.plans import apply_plan, compress, get_plan, save_plan

ARCHS = ("tiny-llama", "tiny-llama31", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-phi3")
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
PREFILL = 16
CASES = [(name, i) for name, m in METHODS.items() for i in range(len(m.examples))]


def case_id(case):
    name, i = case
    return f"{name}-{i}:" + ",".join(f"{k}={v}" for k, v in METHODS[name].examples[i].items())


def compressed(arch, name, i, ratio=0.3):
    """The tiny ``arch`` model and its copy compressed by example ``i`` of method ``name``; skips a refused pair."""
    model, _ = build_tiny(arch)
    reason = METHODS[name].refusal(model.config)
    if reason:
        pytest.skip(reason)
    return model, compress(copy.deepcopy(model), name, ratio, calibration=CALIB, **METHODS[name].examples[i])


def logits(model, ids=X):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ratio_zero_reproduces_the_original_where_the_method_claims_it(arch, case):
    name, i = case
    if not make_method(name, 0.0, **METHODS[name].examples[i]).exact_at_zero:
        pytest.skip(f"{name} with {METHODS[name].examples[i]} is not exact at ratio 0 by design")
    model, c = compressed(arch, name, i, ratio=0.0)
    assert rel(logits(c), logits(model)) < 1e-4


@pytest.mark.parametrize("arch", ("tiny-llama", "tiny-gemma3"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_saved_plan_rebuilds_the_same_model(tmp_path, arch, case):
    model, c = compressed(arch, *case)
    save_plan(c, tmp_path / "plan.json")
    rebuilt = apply_plan(model, tmp_path / "plan.json")
    torch.testing.assert_close(logits(rebuilt), logits(c))


@pytest.mark.parametrize("arch", ("tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-phi3"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cached_decode_equals_a_full_forward_and_the_cache_holds_the_methods_widths(arch, case):
    _, model = compressed(arch, *case)
    shapes = costs.attention_shapes(model.config, get_plan(model))
    full = logits(model)
    with torch.no_grad():
        out = model(X[:, :PREFILL], use_cache=True)
        cache = output_cache(out)
        for layer, shape in zip(cache.layers, shapes):
            k, v = layer.keys, layer.values
            assert k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3] == shape.cache_elements
        steps = [out.logits[:, -1]]
        for t in range(PREFILL, X.shape[1]):
            out = model(X[:, t:t + 1], use_cache=True, **cache_kwargs(cache))
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, PREFILL - 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ("tiny-llama", "tiny-qwen2", "tiny-gemma3"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_measured_costs_equal_the_closed_form_and_the_cache_shrinks(arch, case):
    model, c = compressed(arch, *case)
    plan, cfg, n = get_plan(c), c.config, 24
    m, base = measure.measure_costs(c, n), measure.measure_costs(model, n)
    assert m["kv_bytes"] == costs.kv_bytes(cfg, n, plan) < base["kv_bytes"]
    assert m["params_total"] == costs.total_params(cfg, plan)
    assert m["params_attention"] == costs.attention_params(cfg, plan)
    assert m["flops_decode"] == costs.decode_flops(cfg, n, plan)
    assert m["flops_decode_attention"] == costs.attention_decode_flops(cfg, n, plan)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compressed_modules_live_on_their_layers_device(case):
    """``meta`` stands in for a second device: applying a plan only slices and copies tensors, which meta does."""
    name, i = case
    model, c = compressed("tiny-llama", name, i)
    model.model.layers[1].to("meta")
    split = apply_plan(model, get_plan(c))
    for layer, device in zip(split.model.layers, ("cpu", "meta")):
        attn = layer.self_attn
        assert isinstance(attn, CompressedAttention)
        assert {n: t.device.type for n, t in (*attn.named_parameters(), *attn.named_buffers())
                if t.device.type != device} == {}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_healing_changes_no_shape_or_cost_and_lowers_each_layers_error(case):
    model, _ = build_tiny("tiny-llama")
    originals = [layer.self_attn for layer in model.model.layers]
    name, i = case
    compress(model, name, 0.3, calibration=CALIB, **METHODS[name].examples[i])
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    before = measure.measure_costs(model, 16, cache_spec(None))
    # RoPE tables and kept-channel indices are buffers (less Palu's cos/sin cache, which grows with the positions seen)
    buffers = {n: t.clone() for n, t in model.named_buffers() if not n.endswith("_table")}
    batch = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    out = heal_layerwise(model, originals, batch, steps=20, lr=1e-3, batch_size=3)
    assert {n: tuple(t.shape) for n, t in model.named_parameters()} == shapes
    assert measure.measure_costs(model, 16, cache_spec(None)) == before
    assert all(torch.equal(t, dict(model.named_buffers())[n]) for n, t in buffers.items())
    # a layer the method keeps exact (Palu's Fisher ranks can give one full rank) has nothing to heal
    assert all(a < b for a, b in zip(out["after"], out["before"]) if b > 1e-6), (out["before"], out["after"])
    assert sum(out["after"]) < sum(out["before"])


def test_every_method_states_what_reports_and_the_benchmark_need():
    orders = [m.order for m in METHODS.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)  # the registry lists methods in report order
    for name, m in METHODS.items():
        assert m.name == name and m.examples
        assert isinstance(m.bench_options(16, 1), dict)  # every method has an unrounded benchmark row
        assert m.label({"method": name, "cfg.criterion.name": "key_energy"})


def test_a_method_refused_for_a_model_leaves_it_unchanged_in_one_sentence():
    model, _ = build_tiny("tiny-qwen3")
    refusing = [n for n, m in METHODS.items() if m.refusal(model.config)]
    assert refusing  # EliteKV refuses QK-norm models
    for name in refusing:
        before = [type(layer.self_attn) for layer in model.model.layers]
        with pytest.raises(ModelError) as err:
            compress(model, name, 0.3, calibration=CALIB, **METHODS[name].examples[0])
        assert "\n" not in str(err.value) and str(err.value).endswith(".")
        assert [type(layer.self_attn) for layer in model.model.layers] == before


@pytest.fixture
def toy_method():
    """A fifth method in one class, as a contributor would add it (here: RAP with evenly spaced pairs)."""

    @register
    @dataclass
    class EvenPairs(RAP):
        """RAP keeping evenly spaced pairs (criterion ``random``'s shapes, chosen without data)."""

        name = "even_pairs"
        order = 5
        examples = ({"criterion": "weight_norm"},)

        @classmethod
        def label(cls, row) -> str:
            return "even pairs"

    yield EvenPairs
    del METHODS["even_pairs"]


def test_a_registered_method_reaches_the_registry_plans_reports_and_benchmark(toy_method, tmp_path):
    from analysis.collect import untrained_recipe

    model, _ = build_tiny("tiny-llama")
    c = compress(copy.deepcopy(model), "even_pairs", 0.3, criterion="weight_norm")
    plan = get_plan(c)
    assert plan["method"] == "rap"  # it builds RAP plans: a saved plan needs no new loader
    assert untrained_recipe({"method": "even_pairs"}) == "even pairs"
    assert toy_method.bench_options(16, 8) == {"criterion": "weight_norm", "round_to": 8}
    assert list(METHODS)[-1] == "even_pairs"
