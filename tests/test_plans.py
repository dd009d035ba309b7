"""Plans are untrusted input: a truncated file, a hand edit or a plan made for another model ends in one sentence
naming the file and what is wrong, and the model is not touched. And one config gives one plan, byte for byte."""
import json
import re

import pytest
import torch

from rap.errors import PlanError
from rap.models import build_tiny
from rap.plans import apply_plan, compress, load_plan, save_plan

OPTIONS = {"rap": {"criterion": "weight_norm"}, "palu": {"rank_allocation": "uniform", "decomposition": "svd"},
           "elitekv": {"elite_pairs": 2, "selection": "uniform", "decomposition": "svd"}}


def saved_plan(tmp_path, method, ratio=0.25, **extra):
    model, _ = build_tiny("tiny-llama")
    compress(model, method, ratio, **{**OPTIONS[method], **extra})
    save_plan(model, tmp_path / "plan.json")
    return tmp_path / "plan.json"


def edit(path, change):
    plan = json.loads(path.read_text())
    change(plan)
    path.write_text(json.dumps(plan))


def refused(path, pattern, model=None):
    """Applying ``path`` fails with one sentence naming the file and matching ``pattern``; the model is untouched."""
    model = model or build_tiny("tiny-llama")[0]
    before = [type(layer.self_attn) for layer in model.model.layers]
    with pytest.raises(PlanError) as err:
        apply_plan(model, path)
    message = str(err.value)
    assert str(path.parent) in message and re.search(pattern, message), message
    assert "\n" not in message and message.endswith(".")
    assert [type(layer.self_attn) for layer in model.model.layers] == before and not hasattr(model, "rap_plan")
    return message


def test_a_saved_plan_records_the_models_signature(tmp_path):
    plan = json.loads(saved_plan(tmp_path, "rap").read_text())
    assert plan["model"] == {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 16}


@pytest.mark.parametrize("method", ["rap", "palu", "elitekv"])
def test_truncated_files_are_refused(tmp_path, method):
    path = saved_plan(tmp_path, method)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    refused(path, r"plan.json is not readable JSON")
    path.write_text(text)
    if method != "rap":
        tensors = tmp_path / "plan.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:200])
        refused(path, r"plan.safetensors cannot be read as safetensors")
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


@pytest.mark.parametrize("change, pattern", [
    (lambda p: p["layers"][1]["k_channels"][0].__setitem__(0, 99),
     r"layer 1 k_channels of KV head 0 has index 99 outside \[0, 16\)"),
    (lambda p: p["layers"][0]["v_channels"][1].__setitem__(1, p["layers"][0]["v_channels"][1][0]),
     r"layer 0 v_channels of KV head 1 repeats index"),
    (lambda p: p["layers"][0]["k_channels"][0].__setitem__(0, 7 if p["layers"][0]["k_channels"][0][0] != 7 else 6),
     r"not whole RoPE pairs|repeats index"),
    (lambda p: p["layers"][0]["v_channels"][0].pop(), r"keeps \[\d+, \d+\] indices per KV head"),
    (lambda p: p["layers"][0]["k_channels"].pop(), r"lists 1 heads, but the model has 2 KV heads"),
    (lambda p: p["layers"].pop(), r"has 1 layers, but the model has 2"),
    (lambda p: p.__setitem__("method", "pickle"), r"its method 'pickle' is not one of rap, palu, elitekv"),
    (lambda p: p.__setitem__("ratio", 2), r"ratio=2 is not a number in \[0, 1\)"),
    (lambda p: p["layers"][0].pop("v_channels"), r"layer 0 has no 'v_channels'"),
    (lambda p: p["layers"][0].__setitem__("k_channels", "0-7"), r"lists str heads"),
])
def test_hand_edited_rap_plans_are_refused(tmp_path, change, pattern):
    path = saved_plan(tmp_path, "rap")
    edit(path, change)
    refused(path, pattern)


def test_rope_blind_plans_may_keep_single_channels(tmp_path):
    path = saved_plan(tmp_path, "rap", criterion="rope_blind", calibration=torch.randint(0, 256, (2, 16)))
    apply_plan(build_tiny("tiny-llama")[0], path)  # single channels are its point: no pair check


@pytest.mark.parametrize("method, change, pattern", [
    ("palu", lambda p: p["layers"][0].__setitem__("k_rank", 999), r"layer 0 k_rank=999 is not an integer in \[1, 32\]"),
    ("palu", lambda p: p["layers"][1].__setitem__("v_rank", p["layers"][1]["v_rank"] - 1),
     r"tensor 'v_down.1' has shape"),
    ("palu", lambda p: p.__setitem__("group_size", 3), r"group_size=3 is not an integer in \[1, 2\]"),
    ("palu", lambda p: p.__setitem__("tensors_file", "../../etc/passwd"),
     r"names tensors file '../../etc/passwd', which is not a file beside it"),
    ("palu", lambda p: p.pop("tensors_file"), r"it has no tensors, but its method needs them"),
    ("elitekv", lambda p: p["layers"][0]["elite_pairs"][0].append(7),
     r"keeps \[3, 2\] indices per KV head|repeats index"),
    ("elitekv", lambda p: p["layers"][1]["elite_pairs"][1].__setitem__(0, 8),
     r"layer 1 elite_pairs of KV head 1 has index 8 outside \[0, 8\)"),
    ("elitekv", lambda p: p.__setitem__("elite_pairs", 3),
     r"keeps 2 elite pairs per KV head, but the plan says elite_pairs=3"),
    ("elitekv", lambda p: p.__setitem__("value_path", "auto"), r"its value_path='auto' is not fold or up"),
])
def test_hand_edited_latent_plans_are_refused(tmp_path, method, change, pattern):
    path = saved_plan(tmp_path, method)
    edit(path, change)
    refused(path, pattern)


def test_plan_tensors_are_checked_by_name_shape_and_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    path = saved_plan(tmp_path, "palu")
    tensors_path = tmp_path / "plan.safetensors"
    good = load_file(tensors_path)
    for tensors, pattern in [
        ({k: v for k, v in good.items() if k != "k_up.1"}, r"lacks tensor 'k_up.1'"),
        ({**good, "extra.0": torch.zeros(1)}, r"has unexpected tensor 'extra.0'"),
        ({**good, "k_down.0": good["k_down.0"][:, :-1].contiguous()},
         r"tensor 'k_down.0' has shape \(\d+, 63\), expected \(\d+, 64\)"),
        ({**good, "v_up.0": good["v_up.0"].to(torch.int64)},
         r"tensor 'v_up.0' has dtype torch.int64, expected a floating-point type"),
    ]:
        save_file(tensors, str(tensors_path))
        refused(path, pattern)


@pytest.mark.parametrize("other, pattern", [
    (dict(num_hidden_layers=3), r"made for a model with num_hidden_layers=2, but this model has num_hidden_layers=3"),
    (dict(num_key_value_heads=4),
     r"made for a model with num_key_value_heads=2, but this model has num_key_value_heads=4"),
    (dict(head_dim=8), r"made for a model with head_dim=16, but this model has head_dim=8"),
])
def test_a_plan_for_another_model_is_refused(tmp_path, other, pattern):
    path = saved_plan(tmp_path, "rap")
    refused(path, pattern, build_tiny("tiny-llama", **other)[0])
    edit(path, lambda p: p.pop("model"))  # a plan without its model record is still checked field by field
    refused(path, r"has \d+ layers|lists \d+ heads|head_dim=16", build_tiny("tiny-llama", **other)[0])


def test_a_plan_for_another_architecture_is_refused(tmp_path):
    path = saved_plan(tmp_path, "rap")
    refused(path, r"model_type=llama, but this model has model_type=qwen2", build_tiny("tiny-qwen2")[0])


TIMING = ("latency_", "base_latency_", "time_", "wall_time_s")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rap", "palu", "elitekv"])
def test_same_config_same_plan_and_metrics(tmp_path, data_dir, method):
    from conftest import compose

    from rap.harness.job import run_job

    cfg = compose("model=tiny-llama", "eval=smoke", "tracking=none", f"out_dir={tmp_path}", f"method={method}",
                  "ratio=0.25", "calibration.n_samples=3", "calibration.seqlen=32", "calibration.whiten=[2,40]",
                  *(["method.search_sequences=1"] if method == "elitekv" else []))
    runs = [tmp_path / "a", tmp_path / "b"]
    metrics = [run_job(cfg, out) for out in runs]
    files = ["plan.json", "per_sample.json"] + (["plan.safetensors"] if method != "rap" else [])
    for name in files:
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    untimed = [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in metrics]
    assert untimed[0] == untimed[1] and "ppl_wikitext2" in untimed[0] and "kv_bytes_per_token" in untimed[0]
