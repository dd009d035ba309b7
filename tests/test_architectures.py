"""The architecture gate and the models people use now: Llama (with Llama 3.1's RoPE scaling), Mistral, Qwen2, Qwen3
(QK-norm) and Gemma 3 (QK-norm, sliding-window layers beside global ones, two RoPE bases, its own softmax scale)."""
import json

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from rap import costs, measure
from rap.architecture import check_config, sliding_layers
from rap.errors import ConfigError, ModelError, PlanError
from rap.methods.rap import qk_rho
from rap.models import build_tiny, tiny_config
from rap.plans import apply_plan, compress, get_plan, load_plan, save_plan

ARCHS = ("tiny-llama", "tiny-llama31", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3")
QK_NORM_ARCHS = ("tiny-qwen3", "tiny-gemma3")
# RAP in both QK-norm modes (ignored without QK-norm) and Palu: exact at ratio 0 on every architecture.
EXACT = [("rap", {"qk_norm": "exact"}), ("rap", {"qk_norm": "kept"}), ("palu", {})]


def calibration():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def ids(n=30, seed=2):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("qk_norm", ["exact", "kept"])
@pytest.mark.parametrize("name", QK_NORM_ARCHS)
def test_rap_compresses_qk_norm_models_and_their_cache_shrinks_by_the_ratio(name, qk_norm):
    model, _ = build_tiny(name)
    x = ids()
    ref = model(x).logits
    base = measure.measure_costs(model, 24)
    compress(model, "rap", 0.3, calibration=calibration(), qk_norm=qk_norm)
    plan = get_plan(model)
    assert plan["qk_norm"] == qk_norm
    out = model(x).logits
    assert torch.isfinite(out).all() and rel(out, ref) > 1e-4
    m = measure.measure_costs(model, 24)
    cfg = model.config
    # head_dim 16 at 0.3: 6 of 8 pairs (12 key dims) and 11 of 16 value channels
    assert m["kv_bytes"] == costs.kv_bytes(cfg, 24, plan) == base["kv_bytes"] * (12 + 11) / 32
    assert abs(m["kv_bytes"] / base["kv_bytes"] - 0.7) < 1 / 16
    assert m["params_attention"] == costs.attention_params(cfg, plan) < base["params_attention"]
    assert m["params_total"] == costs.total_params(cfg, plan)
    assert m["flops_decode"] == costs.decode_flops(cfg, 24, plan) < base["flops_decode"]
    assert m["flops_decode_attention"] == costs.attention_decode_flops(cfg, 24, plan)


def test_exact_qk_norm_keeps_full_width_projections_and_kept_shrinks_them():
    params = {}
    for mode in ("exact", "kept"):
        model, _ = build_tiny("tiny-qwen3")
        compress(model, "rap", 0.5, calibration=calibration(), qk_norm=mode)
        attn = model.model.layers[0].self_attn
        params[mode] = measure.count_params(model)["params_attention"]
        assert params[mode] == costs.attention_params(model.config, get_plan(model))
        rows = attn.k_proj.weight.shape[0]
        assert rows == (2 * 16 if mode == "exact" else 2 * 8)  # 2 KV heads x (head_dim 16 | 4 kept pairs = 8 dims)
    assert params["kept"] < params["exact"]


def test_kept_qk_norm_correction_is_calibrated_and_one_when_all_channels_stay():
    energy = torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0, 1.0, 1.0, 1.0])  # two heads of 4 channels
    assert torch.allclose(qk_rho(energy, [[0, 1, 2, 3], [0, 1, 2, 3]]), torch.ones(2))
    # head 0: full mean 2.5, kept (2, 3) mean 4; head 1: full mean 3, kept (0, 1) mean 5
    assert torch.allclose(qk_rho(energy, [[2, 3], [0, 1]]), torch.tensor([2.5 / 4, 3 / 5]))
    model, _ = build_tiny("tiny-gemma3")
    compress(model, "rap", 0.3, calibration=calibration(), qk_norm="kept")
    t = get_plan(model)["tensors"]
    assert t["q_rho.0"].shape == (4,) and t["k_rho.2"].shape == (2,)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in t.values())


@pytest.mark.parametrize("method, options", EXACT[:2] + [("palu", {}), ("palu", {"group_size": 1})],
                         ids=["rap-exact", "rap-kept", "palu", "palu-per-head"])
def test_gemma3_cached_decode_equals_a_full_forward_across_the_sliding_window(method, options):
    model, _ = build_tiny("tiny-gemma3")  # window 8 on layers 0 and 1
    compress(model, method, 0.3, calibration=calibration(), **options)
    x = ids(30)
    full = model(x).logits
    cache = DynamicCache(config=model.config)
    steps = [model(x[:, :12], cache=cache, use_cache=True).logits]
    steps += [model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(12, 30)]
    assert rel(torch.cat(steps, 1), full) < 1e-4
    # the sliding layers hold window - 1 tokens, the global one all 30
    assert [layer.keys.shape[2] for layer in cache.layers] == [7, 7, 30]
    chunks = DynamicCache(config=model.config)
    out = torch.cat([model(x[:, i:i + 7], cache=chunks, use_cache=True).logits for i in range(0, 30, 7)], 1)
    assert rel(out, full) < 1e-4


def test_gemma3_layers_keep_their_window_scale_and_rope_base():
    model, _ = build_tiny("tiny-gemma3")
    compress(model, "palu", 0.3, calibration=calibration())
    rotary = model.model.rotary_emb
    layers = [layer.self_attn for layer in model.model.layers]
    assert [a.sliding_window for a in layers] == [8, 8, None]
    assert all(a.scaling == 24 ** -0.5 for a in layers)  # query_pre_attn_scalar, not head_dim
    assert torch.equal(layers[0].inv_freq, rotary.sliding_attention_inv_freq)
    assert torch.equal(layers[2].inv_freq, rotary.full_attention_inv_freq)
    assert not torch.equal(layers[0].inv_freq, layers[2].inv_freq)


@pytest.mark.parametrize("name", ARCHS)
def test_kv_bytes_closed_form_counts_what_sliding_layers_hold(name):
    model, _ = build_tiny(name)
    for context in (5, 24):
        cache = measure.prefill(model, ids(context))
        assert measure.kv_bytes(cache) == costs.kv_bytes(model.config, context)
    held = costs.tokens_held(model.config, 24)
    assert held == ([7, 7, 24] if name == "tiny-gemma3" else [24] * model.config.num_hidden_layers)


def test_qk_norm_plan_replays_to_identical_logits(tmp_path):
    model, _ = build_tiny("tiny-gemma3")
    compress(model, "rap", 0.3, calibration=calibration(), qk_norm="kept")
    save_plan(model, tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["qk_norm"] == "kept"
    fresh, _ = build_tiny("tiny-gemma3")
    apply_plan(fresh, load_plan(tmp_path / "plan.json"))
    assert torch.equal(fresh(ids()).logits, model(ids()).logits)
    other, _ = build_tiny("tiny-gemma3")
    plan = load_plan(tmp_path / "plan.json")
    plan["qk_norm"] = None
    with pytest.raises(PlanError, match="qk_norm"):
        apply_plan(other, plan)


def test_elitekv_refuses_qk_norm_in_one_sentence_and_leaves_the_model_unchanged():
    model, _ = build_tiny("tiny-qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="EliteKV .* k_norm of qwen3"):
        compress(model, "elitekv", 0.3, calibration=torch.randint(0, 256, (12, 32)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert get_plan(model) is None


class FusedAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.qkv_proj, self.head_dim = nn.Linear(4, 4), attn.head_dim


class CustomAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, n, getattr(attn, n))
        self.head_dim = attn.head_dim


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m.model.layers[1], "self_attn", FusedAttention(m.model.layers[1].self_attn)), "fused"),
    (lambda m: setattr(m.model.layers[0], "self_attn", CustomAttention(m.model.layers[0].self_attn)),
     "attention class CustomAttention"),
    (lambda m: m.model.layers[0].self_attn.register_parameter("sinks", nn.Parameter(torch.zeros(4))), "sinks"),
])
def test_unsupported_attention_is_refused_before_anything_changes(change, message):
    model, _ = build_tiny("tiny-llama")
    change(model)
    for attempt in (lambda: compress(model, "rap", 0.3, criterion="weight_norm"),
                    lambda: apply_plan(model, {"method": "rap", "ratio": 0.3})):
        with pytest.raises(ModelError, match=message):
            attempt()
    assert get_plan(model) is None


@pytest.mark.parametrize("overrides, message", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"kv_lora_rank": 64}, "MLA"),
])
def test_unsupported_configs_are_refused_in_one_sentence(overrides, message):
    cfg = tiny_config("tiny-llama")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with pytest.raises(ModelError, match=message):
        check_config(cfg)


def test_gemma3_multimodal_wrapper_and_softcapping_are_refused():
    from transformers import Gemma3Config

    with pytest.raises(ModelError, match="multimodal .* gemma3_text"):
        check_config(Gemma3Config())
    cfg = tiny_config("tiny-gemma3", attn_logit_softcapping=50.0)
    with pytest.raises(ModelError, match="soft-caps"):
        check_config(cfg)


def test_sliding_layers_follow_the_config():
    assert sliding_layers(tiny_config("tiny-gemma3")) == [True, True, False]
    assert sliding_layers(tiny_config("tiny-llama")) == [False, False]


def test_quantized_cache_on_sliding_layers_is_refused():
    from rap.cache import CacheSpec, make_cache

    model, _ = build_tiny("tiny-gemma3")
    with pytest.raises(ConfigError, match="sliding-window layers"):
        make_cache(CacheSpec(kind="quantized", backend="hqq", nbits=4, q_group_size=8), model)


def test_hub_preset_is_named_after_the_checkpoint_and_needs_a_path(tmp_path):
    from conftest import REPO, compose

    from rap.harness.resolvers import unknown_model_presets
    from rap.harness.settings import model_spec
    from rap.models import load_config

    cfg = compose("model=hub", "model.path=Qwen/Qwen3-8B")
    assert cfg.model.name == "qwen3-8b" and cfg.run_name.startswith("qwen3-8b_")
    with pytest.raises(ModelError, match="model=hub needs the checkpoint"):
        load_config(model_spec(compose("model=hub")))
    message = unknown_model_presets(["ratio=0.2", "model=Qwen/Qwen3-8B"], REPO / "conf")
    assert "model=hub model.path=Qwen/Qwen3-8B" in message and "qwen3-8b" in message
    assert unknown_model_presets(["model=gemma3-270m,smollm2-135m"], REPO / "conf") is None
    with pytest.raises(ModelError, match="model=hub model.path=Qwen/Qwen3-8B"):
        load_config(model_spec(compose("model.path=Qwen/Qwen3-8B")))


def test_run_py_names_the_hub_preset_for_an_unknown_model(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "run.py", "model=Qwen/Qwen3-8B", f"out_dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        next(line for line in out.stderr.splitlines() if line.startswith("error:"))]
    assert "use model=hub model.path=Qwen/Qwen3-8B" in out.stderr


def test_gemma3_job_records_qk_norm_and_kv_bytes_at_its_context(tmp_path, data_dir):
    from conftest import compose

    from rap.harness.job import run_job

    cfg = compose("model=tiny-gemma3", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", "method=rap-qk-kept",
                  "ratio=0.3", "eval.zeroshot.tasks=[]", "calibration.n_samples=2", "calibration.seqlen=32")
    m = run_job(cfg, tmp_path / "job")
    assert m["qk_norm"] == "kept" and m["context_len"] == 32
    assert m["kv_bytes"] == m["kv_bytes_formula"] and m["kv_bytes_per_token"] == m["kv_bytes_per_token_formula"]
    assert m["params_attention"] == m["params_attention_formula"] and m["flops_decode"] == m["flops_decode_formula"]
    # 2 sliding layers hold 7 of the 32 tokens, the global one all 32
    shapes = costs.attention_shapes(tiny_config("tiny-gemma3"), load_plan(tmp_path / "job" / "plan.json"))
    assert m["kv_bytes"] == 4 * sum(s.cache_elements * n for s, n in zip(shapes, (7, 7, 32)))
    assert json.loads((tmp_path / "job" / "plan.json").read_text())["qk_norm"] == "kept"


@pytest.mark.parametrize("heal", ["layerwise", "e2e"])
@pytest.mark.parametrize("method, options", [("rap", {"qk_norm": "kept"}), ("palu", {})], ids=["rap-kept", "palu"])
def test_gemma3_heals_and_its_healed_plan_rebuilds_the_healed_model(tmp_path, method, options, heal):
    from rap.heal import HEALERS, healed_tensors

    model, _ = build_tiny("tiny-gemma3")
    originals = [layer.self_attn for layer in model.model.layers]
    compress(model, method, 0.3, calibration=calibration(), **options)
    batch = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    out = HEALERS[heal](model, originals, batch, steps=8, lr=1e-3, batch_size=2)
    assert sum(out["after"]) < sum(out["before"])
    plan = get_plan(model)
    plan["tensors"] = {**(plan.get("tensors") or {}), **healed_tensors(model)}
    plan["heal"] = {"mode": heal, "steps": 8}
    save_plan(model, tmp_path / "plan.json")
    rebuilt = apply_plan(build_tiny("tiny-gemma3")[0], tmp_path / "plan.json")
    with torch.no_grad():
        assert torch.equal(rebuilt(ids()).logits, model(ids()).logits)



def test_phi3s_fused_qkv_is_split_at_load_without_changing_the_model():
    """Phi-3 projects q, k and v in one matrix; its family adapter splits it into separate projections (views, no
    copy) of an attention that computes the same, and rap refuses the unsplit model in one sentence naming it."""
    import copy

    from transformers import AutoModelForCausalLM

    from rap.families import adapt

    torch.manual_seed(0)
    raw = AutoModelForCausalLM.from_config(tiny_config("tiny-phi3"), dtype=torch.float32,
                                           attn_implementation="sdpa").eval()
    x = ids()
    ref = raw(x).logits
    with pytest.raises(ModelError, match=r"projects q, k and v fused \(Phi3Attention\).*rap.families.adapt"):
        compress(copy.deepcopy(raw), "rap", 0.3, criterion="weight_norm")
    fused = raw.model.layers[0].self_attn.qkv_proj.weight
    adapted = adapt(raw)
    attn = adapted.model.layers[0].self_attn
    assert type(attn).__name__ == "MistralAttention" and attn.q_proj.weight.data_ptr() == fused.data_ptr()
    assert torch.equal(adapted(x).logits, ref)


@pytest.mark.parametrize("model_type, extra", [("smollm3", {}), ("llama", {"no_rope_layers": [1, 0]})])
def test_families_with_layers_without_rope_are_refused_in_one_sentence(model_type, extra):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=2, **extra)
    with pytest.raises(ModelError, match=r"has layers that attend without RoPE \(NoPE\)"):
        check_config(cfg)
