"""Scale: statistics layer by layer with bounded memory, gradient statistics that keep only what they need, and
factorisations without a Cholesky. Memory is measured (``rap.memory.TensorMemory``), never timed."""
import pytest
import torch
from conftest import TINY, compose

from rap import calibration
from rap.errors import ConfigError
from rap.memory import TensorMemory, recording, stage
from rap.methods import make_method
from rap.methods.lowrank import factorize
from rap.models import build_tiny


def _reference_grams(model, batch):
    """XᵀX of each layer's attention input from one full forward per sequence (hooks on every layer)."""
    grams = [0] * len(model.model.layers)
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(_m, args, i=i):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            grams[i] = grams[i] + x.T @ x
        handles.append(layer.self_attn.k_proj.register_forward_pre_hook(pre))
    with torch.no_grad():
        for row in batch:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("arch", TINY)
def test_layer_by_layer_grams_equal_a_full_forward(arch):
    model, _ = build_tiny(arch)
    batch = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    expected = _reference_grams(model, batch)
    got = list(calibration.attention_input_grams(model, batch))
    assert [i for i, _ in got] == list(range(len(expected)))
    for (_, g), e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_tensor_memory_counts_allocations_not_views_and_frees():
    x = torch.randn(1000, 1000)  # before the mode: not counted
    with TensorMemory() as mem:
        y = x @ x.T  # 4 MB
        x.add_(1)  # in place on an older tensor: no allocation
        view = y.view(-1)
        z = torch.empty(500, 1000)  # 2 MB
        assert mem.live == 6_000_000
        del z, view
        assert mem.live == 4_000_000
        del y
        assert mem.live == 0 and mem.peak == 6_000_000


def _wide_tiny(layers=8):
    """A tiny Llama whose Gram (hidden 256: 512 KiB in float64) outweighs its activations."""
    model, _ = build_tiny("tiny-llama", num_hidden_layers=layers, hidden_size=256, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return model


@pytest.mark.parametrize("method, options, rows", [
    ("palu", {"rank_allocation": "uniform"}, 128),  # a latent per group of 2 KV heads x 64
    ("elitekv", {"elite_pairs": 2}, 2 * (64 - 4) + 2 * 64),  # non-elite K and all V rows, factored jointly
    ("rap", {"v_path": "lowrank", "group_size": 1}, 64),  # V per KV head
])
def test_whitened_plans_hold_one_layers_statistics_at_a_time(method, options, rows):
    """Peak working memory of a whitened plan stays near one layer's Gram, not all 8 layers'."""
    model = _wide_tiny()
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gram_bytes = 256 * 256 * 8
    with recording() as stages:
        plan = make_method(method, 0.3, decomposition="whiten", **options).make_plan(model, batch)
        mem = stages.memory
        kept = sum(t.numel() * t.element_size() for t in plan["tensors"].values())
        working = mem.peak - kept  # the plan's factors are the result, kept for every layer
    # One Gram, and the float64 working copies of one factorisation (the block W and W·G, rows x 256; W·G·Wᵀ).
    one_layer = gram_bytes + 2 * rows * 256 * 8 + rows * rows * 8
    assert working < 2 * one_layer < 8 * gram_bytes
    assert stages.rows["calibration (attention inputs)"]["calls"] == 8


def test_grams_held_together_are_seen():
    """The contrast: the tracker sees every layer's Gram when they are kept, 8 of them."""
    model = _wide_tiny()
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    gram_bytes = 256 * 256 * 8
    with TensorMemory() as mem:
        grams = [g for _, g in calibration.attention_input_grams(model, batch)]
        assert mem.live >= 8 * gram_bytes
    del grams


def test_stages_record_time_and_peak_of_nested_blocks():
    with recording() as stages:
        with stage("outer"):
            a = torch.zeros(1000, 250)  # 1 MB
            with stage("inner"):
                b = torch.zeros(1000, 500)  # 2 MB
                del b
            del a
    assert stages.rows["inner"]["peak_bytes"] == 2_000_000
    assert stages.rows["outer"]["peak_bytes"] == 3_000_000
    assert all(r["calls"] == 1 and r["seconds"] >= 0 for r in stages.rows.values())


def _autograd_reference(model, batch):
    """Per-element E[g²] and E|w·g| of every k/v weight, with plain autograd and the model's own loss."""
    ws = {(i, n): getattr(layer.self_attn, f"{n}_proj").weight
          for i, layer in enumerate(model.model.layers) for n in "kv"}
    acc = {(kind, key): torch.zeros_like(w) for key, w in ws.items() for kind in ("fisher", "taylor")}
    for row in batch:
        ids = row[None]
        grads = torch.autograd.grad(model(ids, labels=ids).loss, list(ws.values()))
        for (key, w), g in zip(ws.items(), grads):
            acc[("fisher", key)] += g.pow(2) / len(batch)
            acc[("taylor", key)] += (w.detach() * g).abs() / len(batch)
    return acc


@pytest.mark.parametrize("checkpointing, chunk", [(False, 1024), (True, 7)])
def test_gradient_statistics_keep_only_what_is_read(checkpointing, chunk):
    model, _ = build_tiny("tiny-llama")
    batch = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = _autograd_reference(model, batch)
    settings = calibration.GradientSettings(checkpointing=checkpointing, loss_chunk=chunk)
    rows = calibration.weight_gradients(model, batch, kinds=("fisher", "taylor"), rows=True, settings=settings)
    full = calibration.weight_gradients(model, batch, kinds=("fisher",), rows=False, settings=settings)
    assert set(full) == {"fisher_k", "fisher_v"}
    for i in range(2):
        for n in "kv":
            w = getattr(model.model.layers[i].self_attn, f"{n}_proj").weight
            assert rows[f"fisher_{n}"][i].shape == (w.shape[0],)  # a sum per row, not a copy of the weight
            torch.testing.assert_close(rows[f"fisher_{n}"][i], ref[("fisher", (i, n))].sum(1), rtol=1e-4, atol=1e-10)
            torch.testing.assert_close(rows[f"taylor_{n}"][i], ref[("taylor", (i, n))].sum(1), rtol=1e-4, atol=1e-10)
            torch.testing.assert_close(full[f"fisher_{n}"][i], ref[("fisher", (i, n))], rtol=1e-4, atol=1e-10)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # as build_tiny left them


def test_chunked_loss_is_the_models_loss():
    model, _ = build_tiny("tiny-qwen2")
    ids = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(calibration.lm_loss(model, ids, chunk=5), model(ids, labels=ids).loss)


def _cholesky_reference(w, gram, rank):
    """SVD-LLM as written: SVD of W·S, S the Cholesky factor of the Gram."""
    s = torch.linalg.cholesky(gram)
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
    return u[:, :rank] @ torch.diag(sig[:rank]) @ vh[:rank] @ torch.linalg.inv(s)


def test_whitened_factors_match_svd_llm_and_need_no_jitter():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    gram = x.T @ x
    for rank in (4, 20, 48):
        down, up = factorize(w, rank, gram)
        assert down.shape == (rank, 64) and up.shape == (48, rank)
        torch.testing.assert_close(up @ down, _cholesky_reference(w, gram, rank), rtol=1e-6, atol=1e-8)
    x = x[:10]  # 10 tokens for 64 inputs: a singular Gram, which a Cholesky refuses
    down, up = factorize(w, 8, x.T @ x)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    best = torch.linalg.svdvals(w @ x.T)[8:].pow(2).sum().sqrt()  # Eckart-Young on W·Xᵀ
    torch.testing.assert_close(((w - up @ down) @ x.T).norm(), best, rtol=1e-6, atol=1e-8)


def test_loss_chunk_must_be_positive():
    from rap.harness.settings import read_settings

    with pytest.raises(ConfigError, match="loss_chunk=0"):
        read_settings(compose("model=tiny-llama", "loss_chunk=0"))


def test_scale_benchmark_writes_stages_and_extrapolation(tmp_path):
    import csv
    import sys

    sys.path.insert(0, str(__import__("conftest").REPO / "experiments"))
    import scale

    scale.main(["--shapes", "tiny", "--vocab", "259", "--samples", "6", "--seqlen", "16", "--runs", "palu",
                "rap:fisher+checkpointing", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "scale.csv")))
    assert {(r["layers"], r["run"]) for r in rows} == {(str(n), run) for n in (1, 2)
                                                       for run in ("palu", "rap:fisher+checkpointing")}
    palu = {r["stage"] for r in rows if r["run"] == "palu"}
    assert {"calibration (gradients)", "calibration (attention inputs)", "low-rank factorisation", "apply plan",
            "total"} <= palu
    est = list(csv.DictReader(open(tmp_path / "scale_extrapolated.csv")))
    assert {e["layers_real"] for e in est} == {"2"} and all(float(e["est_s"]) >= 0 for e in est)
    assert (tmp_path / "scale.md").read_text().count("\n") == len(est) + 2


def test_value_path_errors_are_zero_for_what_keeps_every_value_and_grow_with_the_ratio():
    import sys

    sys.path.insert(0, str(__import__("conftest").REPO / "experiments"))
    from value_path_error import layer_errors

    from rap.methods.rap import RAP
    from rap.models import build_tiny

    model, _ = build_tiny("tiny-llama")
    batch = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    fit, held = batch[:3], batch[3:]
    plans = {f"{path} {ratio}": RAP(ratio=ratio, round_to=1, v_path=path, prune_k=False).make_plan(model, fit)
             for path in ("channels", "lowrank") for ratio in (0.0, 0.25, 0.5)}
    errors = layer_errors(model, plans, held)
    for err in errors:
        assert err["channels 0.0"] == 0.0 and err["lowrank 0.0"] < 1e-5  # every channel, or a full-rank latent
        for path in ("channels", "lowrank"):
            assert 0 < err[f"{path} 0.25"] < err[f"{path} 0.5"] < 1
