"""Token eviction: a press that keeps everything changes nothing; an evicting press frees the evicted entries (the
cache's tensors hold only what is kept, in closed form too, and with RAP the savings multiply); decoding after it with
the tokens' own positions equals attending over the full cache with the evicted tokens masked out; each sequence of a
batch evicts its own tokens; and what cannot be pressed faithfully is refused in one sentence."""
import copy

import pytest
import torch
from default_presses import default_presses
from transformers import DynamicCache

from rap import compress, costs, get_plan
from rap.cache import cache_bytes
from rap.compat import cache_kwargs
from rap.errors import ConfigError
from rap.models import build_tiny, byte_tokenizer
from rap.presses import kept_fraction, make_press, next_positions
from rap.presses.base import gather_tokens

CONTEXT = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
QUESTION = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1))
IDS = [f"{cls.name}" for cls, _ in default_presses]


def prefill(model, ids=CONTEXT):
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(cache))
    return cache


def pressed(model, press, ids=CONTEXT):
    """The context encoded (with the press capturing what it scores with) and pressed."""
    if hasattr(press, "bind"):
        press.bind(byte_tokenizer())
    with press.capture(model):
        cache = prefill(model, ids)
    press.compress(model, cache, ids)
    return cache


def answer(model, cache, ids=QUESTION, **extra):
    with torch.no_grad():
        return model(ids, use_cache=True, **cache_kwargs(cache), **extra).logits


@pytest.mark.parametrize("press_cls, options", default_presses, ids=IDS)
def test_a_press_that_keeps_everything_changes_nothing(press_cls, options):
    model, _ = build_tiny("tiny-llama")
    ref = answer(model, prefill(model))
    cache = pressed(model, press_cls(ratio=0.0, **options))
    assert cache.layers[0].keys.shape[-2] == CONTEXT.shape[1] and kept_fraction(cache) == 1.0
    assert torch.equal(answer(model, cache, position_ids=next_positions(cache, QUESTION.shape[1])), ref)


def masked_reference(model, kept: torch.Tensor):
    """The question answered over the full cache, with the context tokens outside ``kept`` masked out."""
    mask = torch.zeros(1, CONTEXT.shape[1] + QUESTION.shape[1], dtype=torch.long)
    mask[0, kept] = 1
    mask[0, CONTEXT.shape[1]:] = 1
    return answer(model, prefill(model), attention_mask=mask)


@pytest.mark.parametrize("arch, method", [("tiny-llama", None), ("tiny-qwen3", None), ("tiny-qwen2", "rap")])
def test_decoding_after_eviction_equals_attending_with_the_evicted_tokens_masked(arch, method):
    model, _ = build_tiny(arch)
    if method:
        compress(model, method, 0.3, criterion="weight_norm")
    press = make_press("streaming", ratio=0.5, sinks=2)
    cache = prefill(model)
    press.compress(model, cache)
    n = CONTEXT.shape[1]
    kept = torch.tensor([0, 1, *range(n - (press.keep_count(n) - 2), n)])
    out = answer(model, cache, position_ids=next_positions(cache, QUESTION.shape[1]))
    torch.testing.assert_close(out, masked_reference(model, kept), atol=1e-5, rtol=1e-5)
    # without the tokens' own positions RoPE would rotate the question as if it came right after the kept entries
    wrong = answer(model, prefill_and_press(model, press))
    assert not torch.allclose(wrong, out, atol=1e-4)


def prefill_and_press(model, press):
    return pressed(model, copy.deepcopy(press))


@pytest.mark.parametrize("press_cls, options", default_presses, ids=IDS)
@pytest.mark.parametrize("method", [None, "rap"])
def test_evicted_entries_leave_the_cache_and_the_savings_multiply_with_rap(press_cls, options, method):
    model, _ = build_tiny("tiny-llama")
    full = cache_bytes(prefill(model))["total"]
    if method:
        compress(model, method, 0.3, criterion="weight_norm")
    press = press_cls(ratio=0.5, **options)
    cache = pressed(model, press)
    n, kept = CONTEXT.shape[1], press.keep_count(CONTEXT.shape[1])
    measured = cache_bytes(cache)["total"]
    plan = get_plan(model) if method else None
    assert measured == costs.kv_bytes(model.config, kept, plan)  # the closed form at the kept count
    channel = costs.kv_bytes_per_token(model.config, plan) / costs.kv_bytes_per_token(model.config)
    assert measured == pytest.approx(full * channel * kept / n) and measured < full * channel
    assert kept_fraction(cache) == kept / n


def test_key_norm_keeps_each_heads_lowest_norm_keys_in_their_order():
    model, _ = build_tiny("tiny-llama")
    before = prefill(model).layers[1].keys
    cache = prefill(model)
    make_press("knorm", ratio=0.5).compress(model, cache)
    keep = cache.layers[1].keys.shape[-2]
    for h in range(before.shape[1]):
        idx = before[0, h].norm(dim=-1).topk(keep, largest=False).indices.sort().values
        assert torch.equal(cache.layers[1].keys[0, h], before[0, h, idx])


@pytest.mark.parametrize("press_cls, options", default_presses, ids=IDS)
def test_each_sequence_of_a_batch_evicts_its_own_tokens(press_cls, options):
    model, _ = build_tiny("tiny-llama")
    batch = torch.cat([CONTEXT, CONTEXT.flip(1)])
    together = pressed(model, press_cls(ratio=0.5, **options), batch)
    for i in range(2):
        alone = pressed(model, press_cls(ratio=0.5, **options), batch[i:i + 1])
        for a, b in zip(together.layers, alone.layers):
            torch.testing.assert_close(a.keys[i:i + 1], b.keys)
            torch.testing.assert_close(a.values[i:i + 1], b.values)


def test_gathering_copies_only_the_kept_entries():
    x = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    idx = torch.tensor([[[0, 4]] * 3] * 2)
    out = gather_tokens(x, idx)
    assert out.shape == (2, 3, 2, 4) and torch.equal(out[:, :, 1], x[:, :, 4])
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


@pytest.mark.parametrize("setup, message", [
    (lambda: (build_tiny("tiny-gemma3")[0], "streaming", {}), "has sliding-window layers"),
    (lambda: (compress(build_tiny("tiny-llama")[0], "palu", 0.3, decomposition="svd", rank_allocation="uniform"),
              "knorm", {}), "palu caches a low-rank latent"),
    (lambda: (build_tiny("tiny-llama")[0], "streaming", {"ratio": 1.5}), r"press.ratio=1.5 is outside \[0, 1\)"),
    (lambda: (build_tiny("tiny-llama")[0], "nope", {}), "Unknown press 'nope'; choose one of none, "),
    (lambda: (compress(build_tiny("tiny-llama")[0], "elitekv", 0.3, elite_pairs=2, selection="uniform"), "snapkv", {}),
     "elitekv caches a low-rank latent"),
])
def test_what_cannot_be_pressed_faithfully_is_refused_in_one_sentence(setup, message):
    model, name, options = setup()
    with pytest.raises(ConfigError, match=message) as err:
        press = make_press(name, **{"ratio": 0.5, **options})
        pressed(model, press)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_a_cache_is_pressed_once():
    model, _ = build_tiny("tiny-llama")
    cache = prefill(model)
    make_press("streaming", ratio=0.5).compress(model, cache)
    with pytest.raises(ConfigError, match="pressed already"):
        make_press("streaming", ratio=0.5).compress(model, cache)


def test_a_pressed_job_records_kept_fraction_and_allocated_bytes_below_the_unpressed_ones(tmp_path, data_dir):
    """``press=streaming`` in a job: cached perplexity reads the pressed context, and metrics.json carries the kept
    fraction and the bytes the cache's tensors hold, measured and in closed form, below the unpressed run's; the
    report pairs the pressed run against the unpressed baseline and names the press in its label."""
    from conftest import compose

    from analysis.report import add_paired_intervals, load_runs
    from rap.harness.job import run_job

    common = ["model=tiny-llama", "tracking=none", "eval=smoke", "eval.zeroshot.tasks=[]", "eval.ppl.mode=cached",
              "eval.ppl.chunk=8", "eval.measure.context_len=32", f"out_dir={tmp_path}"]
    plain = run_job(compose(*common), tmp_path / "plain")
    pressed_cfg = compose(*common, "press=streaming", "press.ratio=0.5", "press.sinks=2")
    assert "-press-streaming-r0.5-s2" in pressed_cfg.run_name
    pressed = run_job(pressed_cfg, tmp_path / "pressed")
    assert plain["press_kept_fraction"] == 1.0 and pressed["press_kept_fraction"] == 0.5
    assert pressed["kv_bytes"] == pressed["kv_bytes_allocated"] == pressed["kv_bytes_formula"]
    assert pressed["kv_bytes"] == plain["kv_bytes"] / 2 and pressed["kv_bytes_per_token_ratio"] == 0.5
    assert pressed["flops_decode_attention"] == pressed["flops_decode_attention_formula"]
    assert pressed["ppl_wikitext2"] != plain["ppl_wikitext2"]  # the second half of each window read less context
    df = add_paired_intervals(load_runs(tmp_path / "plain", tmp_path / "pressed"))
    row = df[df["variant"].str.contains("press")].iloc[0]
    assert row["variant"] == "baseline + streaming press 0.5" and row["reference_path"] == str(tmp_path / "plain")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_snapkv_scores_equal_the_last_queries_attention_from_eager_weights(arch):
    """SnapKV's scores, from queries recomputed out of the captured window inputs, equal the eager attention weights
    of the context's last queries: averaged over them, pooled over neighbours and over each KV head's query heads."""
    import torch.nn.functional as F

    model, _ = build_tiny(arch)
    press = make_press("snapkv", ratio=0.5, window=4, kernel=3)
    with press.capture(model):
        cache = prefill(model)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(CONTEXT, output_attentions=True).attentions
    n, rep = CONTEXT.shape[1], model.config.num_attention_heads // model.config.num_key_value_heads
    for i, layer in enumerate(cache.layers):
        got = press.layer_scores(model.model.layers[i].self_attn, layer.keys, press._captured[i])
        mean = weights[i][:, :, -4:].float().mean(2)
        pooled = F.avg_pool1d(mean, 3, stride=1, padding=1, count_include_pad=False)
        want = pooled.view(1, -1, rep, n).mean(2)
        torch.testing.assert_close(got[..., :n - 4], want[..., :n - 4], atol=1e-5, rtol=1e-4)
        assert (got[..., n - 4:] > got[..., :n - 4].max()).all()  # the window itself is always kept


def test_snapkv_needs_the_context_encoded_inside_its_capture():
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(ConfigError, match="inside press.capture"):
        make_press("snapkv", ratio=0.5).compress(model, prefill(model))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_kvzip_scores_equal_the_repetitions_attention_from_eager_weights(arch):
    """KVzip's score of a context token is the largest eager attention weight any query of the repeated context (after
    the instruction) gives it, over the query heads of its KV head; the repetition pass leaves the cache as it was."""
    model, tok = build_tiny(arch)
    press = make_press("kvzip", ratio=0.5).bind(tok)
    n = CONTEXT.shape[1]
    cache = prefill(model)
    keys = [layer.keys.clone() for layer in cache.layers]
    press.prepare(model, cache, CONTEXT)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys))  # the repetition is cut off again
    full = torch.cat([CONTEXT, press._instruction_ids, CONTEXT], 1)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(full, output_attentions=True).attentions
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    for i in range(len(cache.layers)):
        want = weights[i][:, :, n:, :n].float().amax(2).view(1, -1, rep, n).amax(2)
        torch.testing.assert_close(press._captured[i], want, atol=1e-5, rtol=1e-4)


def test_the_ridge_fit_from_running_sums_equals_the_closed_form_least_squares():
    from rap.presses.kvzap import RidgeSums

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(300, 2, generator=g, dtype=torch.float64)
    sums = RidgeSums(6, 2)
    for part in range(0, 300, 70):  # in chunks, as texts arrive
        sums.add(x[part:part + 70], y[part:part + 70])
    x1 = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    w, b = sums.solve(0.0)
    exact = torch.linalg.lstsq(x1, y).solution
    torch.testing.assert_close(w.double(), exact[:-1].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.double(), exact[-1], atol=1e-5, rtol=1e-5)
    w, b = sums.solve(5.0)  # ridge: (XᵀX + λI')⁻¹XᵀY with the bias unpenalised
    penalty = torch.eye(7, dtype=torch.float64) * 5.0
    penalty[-1, -1] = 0
    ridge = torch.linalg.solve(x1.T @ x1 + penalty, x1.T @ y)
    torch.testing.assert_close(w.double(), ridge[:-1].T, atol=1e-5, rtol=1e-5)


def test_kvzip_plus_targets_equal_a_direct_computation_from_eager_weights():
    """log max over the repetition queries j and the query heads h of a KV head of a_ji · ||W_o^h v_i|| / ||x_j||, from
    eager attention weights, the prefill's values and the attention inputs of one full forward."""
    from rap.presses.kvzap import _value_norms, kvzip_plus_targets

    model, tok = build_tiny("tiny-llama")
    instruction = tok("\\nRepeat.", add_special_tokens=False, return_tensors="pt").input_ids
    pairs = kvzip_plus_targets(model, CONTEXT, instruction)
    n, rep = CONTEXT.shape[1], 2
    assert len(pairs) == 2 and pairs[0][0].shape == (n, 64) and pairs[0][1].shape == (n, 2)
    cache = prefill(model)
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, k, i=i: inputs.__setitem__(i, k["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(torch.cat([CONTEXT, instruction, CONTEXT], 1), output_attentions=True).attentions
    for h in hooks:
        h.remove()
    for i, (x, y) in enumerate(pairs):
        a = weights[i][:, :, n:, :n].float()  # (1, heads, repetition, context)
        x_norm = inputs[i][:, n:].float().norm(dim=-1)  # (1, repetition)
        v = _value_norms(model.model.layers[i].self_attn, cache.layers[i].values)  # (1, heads, context)
        score = (a * v[:, :, None, :] / x_norm[:, None, :, None]).amax(2).view(1, 2, rep, n).amax(2)
        torch.testing.assert_close(y, score.log()[0].T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x, inputs[i][0, :n].float())


def test_a_kvzap_surrogate_is_saved_with_what_it_fits_and_refused_for_another_model(tmp_path):
    from default_presses import tiny_llama_surrogate

    from rap.presses.surrogates import load_surrogate, save_surrogate

    s = tiny_llama_surrogate()
    assert len(s["r2"]) == 2 and all(r <= 1.0 for r in s["r2"])
    path = save_surrogate(s, tmp_path / "kvzap.safetensors", {"model": "tiny-llama", "plan": None})
    loaded = load_surrogate(path)
    assert loaded["fitted_for"]["model"] == "tiny-llama" and loaded["r2"] == s["r2"]
    assert all(torch.equal(a, b) for a, b in zip(loaded["weight"], s["weight"]))
    other, _ = build_tiny("tiny-gemma3")
    with pytest.raises(ConfigError, match="was fitted for 2 layers"):
        make_press("kvzap", ratio=0.5, surrogate=str(path)).check_model(other)


def test_the_training_command_fits_and_saves_a_surrogate_a_press_runs_with(tmp_path, capsys):
    from rap.harness.train_kvzap import main
    from rap.presses.surrogates import load_surrogate

    out = tmp_path / "tiny.safetensors"
    main(["model=tiny-llama", "--texts", "3", "--seqlen", "32", "--held-out", "1", "--out", str(out)])
    assert "held-out R² per layer" in capsys.readouterr().out
    s = load_surrogate(out)
    assert s["fitted_for"]["model"] == "tiny-llama" and s["fitted_for"]["plan"] is None and len(s["r2"]) == 2
    model, _ = build_tiny("tiny-llama")
    cache = pressed(model, make_press("kvzap", ratio=0.5, surrogate=str(out), window=2))
    assert kept_fraction(cache) == 0.5
