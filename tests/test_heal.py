"""Healing changes values, never shapes: costs are identical before and after, RAP's kept pairs keep their frequencies,
each layer's error goes down, and a saved healed plan rebuilds the healed model exactly."""
import json

import pytest
import torch
from conftest import compose

from rap.errors import ConfigError, PlanError
from rap.heal import heal_e2e, heal_layerwise, healed_tensors
from rap.models import build_tiny
from rap.plans import apply_plan, compress, get_plan, save_plan

OPTIONS = {"rap": {"criterion": "weight_norm"}, "palu": {"rank_allocation": "uniform", "decomposition": "svd"},
           "elitekv": {"elite_pairs": 2, "selection": "uniform", "decomposition": "svd"}, "kvlatent": {}}


def healed_model(method, steps=30, lr=1e-3, **options):
    model, _ = build_tiny("tiny-llama")
    originals = [layer.self_attn for layer in model.model.layers]
    compress(model, method, 0.25, **{**OPTIONS[method], **options})
    batch = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    return model, heal_layerwise(model, originals, batch, steps=steps, lr=lr, batch_size=3)


def model_tensors(module):
    """Parameters and buffers, less Palu's cos/sin cache (``*_table``), which grows with the positions seen."""
    return {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if not n.endswith("_table")}


def shapes(model):
    return {n: tuple(t.shape) for n, t in model_tensors(model).items()}


@pytest.mark.parametrize("method", ["rap", "elitekv", "kvlatent"])
def test_a_healed_plan_rebuilds_the_healed_model(tmp_path, method):
    model, _ = healed_model(method, steps=5)
    plan = get_plan(model)
    plan["tensors"] = {**(plan.get("tensors") or {}), **healed_tensors(model)}
    plan["heal"] = {"mode": "layerwise", "steps": 5}
    save_plan(model, tmp_path / "plan.json")
    rebuilt = apply_plan(build_tiny("tiny-llama")[0], tmp_path / "plan.json")
    unhealed = compress(build_tiny("tiny-llama")[0], method, 0.25, **OPTIONS[method])
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(unhealed(ids).logits, model(ids).logits)
    # A healed weight of the wrong shape is refused, and the fresh model keeps its original attention.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "plan.safetensors")
    name = next(k for k in tensors if k.startswith("heal.1."))
    tensors[name] = tensors[name][..., :-1].contiguous()
    save_file(tensors, str(tmp_path / "plan.safetensors"))
    fresh, _ = build_tiny("tiny-llama")
    kinds = [type(layer.self_attn) for layer in fresh.model.layers]
    with pytest.raises(PlanError, match=rf"its healed weights: tensor '{name}' has shape"):
        apply_plan(fresh, tmp_path / "plan.json")
    assert [type(layer.self_attn) for layer in fresh.model.layers] == kinds


def test_a_healed_elitekv_plan_from_before_value_path_rebuilds_folded(tmp_path):
    """EliteKV plans saved before value_path existed folded B_v into W_o, and their healed weights are named after that
    module's parameters: a plan without the field rebuilds the healed model exactly."""
    model, _ = healed_model("elitekv", steps=5, value_path="fold")
    plan = get_plan(model)
    plan["tensors"] = {**plan["tensors"], **healed_tensors(model)}
    plan["heal"] = {"mode": "layerwise", "steps": 5}
    save_plan(model, tmp_path / "plan.json")
    old = json.loads((tmp_path / "plan.json").read_text())
    del old["value_path"]
    (tmp_path / "plan.json").write_text(json.dumps(old))
    rebuilt = apply_plan(build_tiny("tiny-llama")[0], tmp_path / "plan.json")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_heal_job_records_its_budget_and_changes_no_cost(tmp_path, data_dir):
    from rap.harness.job import run_job

    common = ("model=tiny-llama", "eval=smoke", "eval.zeroshot.tasks=[]", "tracking=none", f"out_dir={tmp_path}",
              "ratio=0.25", "criterion=weight_norm")
    heal = ("heal=layerwise", "heal.n_samples=4", "heal.seqlen=32", "heal.steps=10", "heal.batch_size=2",
            "heal.lr=1e-3")
    cfg = compose(*common, *heal)
    assert cfg.run_name.endswith("-heal-lw_smoke-spread") and "heal" not in compose(*common[:-2], *heal).run_name
    free, healed = run_job(compose(*common), tmp_path / "free"), run_job(cfg, tmp_path / "healed")
    for k in ("kv_bytes_per_token", "params_total", "params_attention", "flops_decode"):
        assert healed[k] == free[k]
    assert healed["heal_steps"] == 10 and healed["heal_tokens"] == 128 and healed["heal_source"] == "wiki"
    assert healed["heal_loss_after"] < healed["heal_loss_before"] and healed["heal_time_s"] > 0
    assert healed["heal_params"] > 0 and healed["ppl_wikitext2"] != free["ppl_wikitext2"]
    plan = json.loads((tmp_path / "healed" / "plan.json").read_text())
    assert plan["heal"] == {"mode": "layerwise", "source": "wiki", "n_samples": 4, "seqlen": 32, "steps": 10,
                            "batch_size": 2, "lr": 0.001}
    curves = json.loads((tmp_path / "healed" / "per_sample.json").read_text())["heal"]["loss"]
    assert len(curves) == 2 and all(len(c) == 10 for c in curves)
    # The saved healed plan, given with its heal settings, reproduces the healed job's perplexity without healing
    # again, and says it is healed; given with other settings (or none) it is refused, never labelled training-free.
    given = f"plan={tmp_path / 'healed' / 'plan.json'}"
    replay = run_job(compose(*common, *heal, given), tmp_path / "replay")
    assert replay["ppl_wikitext2"] == healed["ppl_wikitext2"] and "time_heal_s" not in replay
    # It records what training the plan cost and achieved, marked as replayed; the training run is not so marked.
    outcome = ("heal_params", "heal_time_s", "heal_loss_before", "heal_loss_after")
    assert {k: replay[k] for k in outcome} == {k: healed[k] for k in outcome}
    assert replay["heal_replayed"] is True and "heal_replayed" not in healed
    assert {k: replay[k] for k in ("heal", "heal_steps", "heal_tokens")} == {"heal": "layerwise", "heal_steps": 10,
                                                                              "heal_tokens": 128}
    for other in ((), (*heal, "heal.steps=20")):
        with pytest.raises(ConfigError, match=r"was healed with heal=layerwise \(source=wiki, .*steps=10"):
            run_job(compose(*common, *other, given), tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.json").exists()


def test_e2e_healing_distils_the_uncompressed_model_without_changing_shapes():
    model, _ = build_tiny("tiny-llama")
    originals = [layer.self_attn for layer in model.model.layers]
    compress(model, "rap", 0.25, criterion="weight_norm")
    before_shapes = shapes(model)
    batch = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    out = heal_e2e(model, originals, batch, steps=20, lr=1e-3, batch_size=2)
    assert out["after"][0] < out["before"][0] and len(out["loss"][0]) == 20 and originals == []
    assert shapes(model) == before_shapes
    assert all(p.requires_grad for p in model.parameters())  # left as they were
    curve = out["loss"][0]
    assert sum(curve[-5:]) < sum(curve[:5])


def test_auto_learning_rate_is_picked_per_layer_from_one_grid_by_held_out_calibration_loss():
    """``lr="auto"``: each layer's rate comes from LR_GRID, chosen by the loss on held-out calibration rows (the same
    grid for every method), and healing with it still lowers each layer's error."""
    from rap.heal import LR_GRID

    model, _ = build_tiny("tiny-llama")
    originals = [layer.self_attn for layer in model.model.layers]
    compress(model, "rap", 0.25, **OPTIONS["rap"])
    batch = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    out = heal_layerwise(model, originals, batch, steps=10, lr="auto", batch_size=3)
    assert len(out["lr"]) == 2 and set(out["lr"]) <= set(LR_GRID)
    assert all(a < b for a, b in zip(out["after"], out["before"]))


def test_auto_learning_rate_needs_layerwise_healing():
    from rap.harness.settings import read_settings

    with pytest.raises(ConfigError, match="heal.lr=auto picks each layer's learning rate"):
        read_settings(compose("model=tiny-llama", "ratio=0.25", "heal=e2e", "heal.lr=auto"))
