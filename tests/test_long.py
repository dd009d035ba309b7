"""RULER through lm-eval's locally generated tasks: per-length seeded samples, scores in [0, 1] from lm-eval's own
scorer, generation through the job's cache; hub-only tasks are refused in one sentence."""
import pytest

from rap.cache import CacheSpec, make_cache
from rap.errors import ConfigError
from rap.harness.ruler import check_tasks, evaluate_long, long_lengths
from rap.models import build_tiny

pytestmark = pytest.mark.slow  # RULER documents through a model


def test_ruler_runs_offline_through_the_given_cache():
    model, tok = build_tiny("tiny-llama")
    spec, made = CacheSpec("quantized", "hqq", 4, 4, 16), []
    r = evaluate_long(model, tok, ["niah_single_1"], [640, 768], limit=2, seed=0,
                      make_cache=lambda: made.append(1) or make_cache(spec, model))
    assert set(r) == {"ruler_niah_single_1_640", "ruler_niah_single_1_768", "n_ruler_niah_single_1_640",
                      "n_ruler_niah_single_1_768", "ruler_avg_640", "ruler_avg_768", "ruler_per_doc"}
    assert r["n_ruler_niah_single_1_640"] == r["n_ruler_niah_single_1_768"] == 2 and len(made) == 4
    docs = r["ruler_per_doc"]["niah_single_1"]
    assert sorted(docs["length"]) == [640, 640, 768, 768] and all(0 <= s <= 1 for s in docs["score"])
    assert r["ruler_avg_768"] == r["ruler_niah_single_1_768"]


def test_hub_only_and_unknown_tasks_fail_clearly():
    with pytest.raises(ConfigError, match="need a download"):
        check_tasks(["niah_single_2"])
    with pytest.raises(ConfigError, match="Unknown RULER task"):
        check_tasks(["niah_single_9"])


def test_lengths_default_and_bound_by_the_model_context():
    model, _ = build_tiny("tiny-llama")
    n = model.config.max_position_embeddings
    assert long_lengths([n, 64], model) == [64, n]
    with pytest.raises(ConfigError, match="within the model's context"):
        long_lengths([2 * n], model)
