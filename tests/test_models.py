import pytest
import torch
from conftest import TINY

from rap.errors import ModelError
from rap.models import ModelSpec, build_tiny, byte_tokenizer, check_rope_model, load_model, tiny_config


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_with_gqa(name):
    model, tok = load_model(ModelSpec(name=name, source="tiny", path=name, device="cpu"))
    cfg = model.config
    assert cfg.num_attention_heads == 2 * cfg.num_key_value_heads  # GQA
    attn = model.model.layers[0].self_attn
    assert (attn.k_proj.bias is not None) == (name == "tiny-qwen2")
    ids = tok("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)


def test_tiny_models_are_seeded():
    a, _ = build_tiny("tiny-llama", seed=3)
    b, _ = build_tiny("tiny-llama", seed=3)
    c, _ = build_tiny("tiny-llama", seed=4)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "Grüße, world! 123"
    assert tok.decode(tok(text).input_ids) == text


def test_non_rope_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match="rotary"):
        check_rope_model(model)


def test_unknown_models_are_refused():
    with pytest.raises(ModelError, match="Unknown tiny model"):
        load_model(ModelSpec(name="x", source="tiny", path="tiny-gpt", device="cpu"))
    with pytest.raises(ModelError, match="Unknown model source"):
        load_model(ModelSpec(name="x", source="ftp", path="x", device="cpu"))
    with pytest.raises(ModelError, match="not installed"):
        load_model(ModelSpec(name="x", source="gguf_package", path="no_such_package_xyz", device="cpu"))


def test_remote_code_runs_only_when_the_model_config_asks(monkeypatch):
    import transformers
    from conftest import compose

    from rap.harness.settings import model_spec
    from rap.models import load_config

    seen = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: seen.append(k) or tiny_config("tiny-llama"))
    load_config(model_spec(compose("model=llama3-8b")))
    load_config(model_spec(compose("model=llama3-8b", "model.trust_remote_code=true")))
    assert [k["trust_remote_code"] for k in seen] == [False, True]
