"""Models spread over devices: loading with a device_map, compressed modules on their own layer's device, inputs on
the input embedding's device, and the padding that lets CUDA's fused attention kernels run. CPU only: ``meta``
stands in for a second device (applying a plan only slices and copies tensors, which meta does)."""
import pytest
import torch
from conftest import compose

from rap import apply_plan, devices
from rap.errors import ModelError
from rap.methods import make_method
from rap.methods.attention import pad_widths
from rap.methods.rap import resolve_round_to
from rap.models import ModelSpec, build_tiny, check_resident, load_model

CALIB = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))


def split_model(name):
    """The tiny model with layer 0 on cpu and layer 1 on meta."""
    model, _ = build_tiny(name)
    model.model.layers[1].to("meta")
    return model


def test_palu_cos_sin_cache_moves_with_the_module():
    model, _ = build_tiny("tiny-llama")
    apply_plan(model, make_method("palu", 0.3, decomposition="svd", rank_allocation="uniform").make_plan(model))
    with torch.no_grad():
        model(CALIB[:1])  # fills the cos/sin cache
    attn = model.model.layers[0].self_attn
    assert attn.cos_table.shape[0] >= CALIB.shape[1]
    attn.to("meta")
    assert attn.cos_table.device.type == attn.sin_table.device.type == attn.inv_freq.device.type == "meta"
    assert not any("table" in k or "inv_freq" in k for k in attn.state_dict())  # derived, not saved


def test_model_devices_and_inputs_follow_the_layers():
    model = split_model("tiny-llama")
    assert [d.type for d in devices.model_devices(model)] == ["cpu", "meta"]
    model.model.embed_tokens.to("meta")
    assert devices.model_device(model).type == "meta"  # inputs go where the embedding is


@pytest.mark.parametrize("n_qk, n_v, multiple, width", [(90, 128, 8, 128), (128, 90, 8, 128), (90, 90, 8, 96),
                                                        (90, 90, 1, 90), (16, 360, 8, 360), (250, 250, 8, 256)])
def test_padding_changes_no_attention_output(n_qk, n_v, multiple, width):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, n_qk, generator=g), torch.randn(2, 4, 7, n_qk, generator=g)
    v = torch.randn(2, 4, 7, n_v, generator=g)
    pq, pk, pv = pad_widths(q, k, v, multiple)
    assert pq.shape[-1] == pk.shape[-1] == pv.shape[-1] == width
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, is_causal=True, scale=n_qk ** -0.5)
    got = sdpa(pq, pk, pv, is_causal=True, scale=n_qk ** -0.5)[..., :n_v]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_round_to_auto_is_1_on_cpu_and_8_on_cuda():
    assert (resolve_round_to("auto", "cpu") == 1 and resolve_round_to("auto", "cuda") == 8
            and resolve_round_to(4, "cuda") == 4)
    from rap.harness.settings import job_config

    cfg = compose("model=tiny-llama", "ratio=0.3", "device=cpu")
    assert cfg.method.round_to == "auto" and job_config(cfg)["method"]["round_to"] == 1
    model, _ = build_tiny("tiny-llama")
    assert make_method("rap", 0.3, criterion="weight_norm").make_plan(model)["round_to"] == 1


def test_device_map_loads_a_checkpoint_in_place(tmp_path):
    model, tok = build_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec(name="t", source="hub", path=str(tmp_path), device="cpu", dtype="float32", device_map="auto",
                     max_memory={"cpu": "1GiB"})
    loaded, _ = load_model(spec)
    ids = CALIB[:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert devices.model_devices(loaded) == [torch.device("cpu")]


@pytest.mark.parametrize("spec, message", [
    (dict(source="tiny", path="tiny-llama", device_map="auto"), "source=tiny models are built on one device"),
    (dict(source="hub", path="x", max_memory={0: "1GiB"}), "model.max_memory only bounds a model.device_map"),
    (dict(source="hub", path="x", device_map="everywhere"), "model.device_map='everywhere' is not auto"),
])
def test_placement_that_cannot_work_is_refused(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model(ModelSpec(name="x", device="cpu", **spec))


def test_offloaded_weights_are_refused():
    with pytest.raises(ModelError, match=r"offloaded \d+ weights to cpu or disk \(e\.g\. model\.layers\.1\."):
        check_resident(split_model("tiny-llama"))
