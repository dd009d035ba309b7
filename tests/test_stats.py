"""Paired bootstrap intervals: exact estimates, the same-run null, shrinking with more documents, alignment."""
import math

import numpy as np
import pytest

from rap.stats import detectable_difference, paired_accuracy_difference, paired_perplexity_ratio


def runs(n, flip_up, flip_down, seed=0, tasks=("piqa", "arc_easy")):
    """A base run and another that turns ``flip_up`` of its wrong docs right and ``flip_down`` of its right ones
    wrong."""
    rng = np.random.default_rng(seed)
    base, other = {}, {}
    for t in tasks:
        acc = (rng.random(n) < 0.5).astype(float)
        new = acc.copy()
        u = rng.random(n)
        new[(acc == 0) & (u < flip_up)] = 1
        new[(acc == 1) & (u < flip_down)] = 0
        ids = sorted(rng.choice(10 * n, n, replace=False).tolist())
        base[t] = {"doc_id": ids, "acc": acc.tolist()}
        other[t] = {"doc_id": ids[::-1], "acc": new[::-1].tolist()}  # another order: aligned by id
    return base, other


def test_same_run_has_zero_difference_and_is_not_significant():
    base, _ = runs(50, 0, 0)
    iv = paired_accuracy_difference(base, base)
    assert iv.estimate == 0.0 and iv.low < 0.0 < iv.high and not iv.significant
    # no document differs: the interval is one discordant pair's width per task, not zero
    assert iv.high == pytest.approx(-iv.low) and iv.high < 0.03


def test_estimate_is_the_acc_avg_difference_and_the_interval_covers_it():
    base, other = runs(200, 0.3, 0.05)
    iv = paired_accuracy_difference(base, other)
    mean = lambda run: np.mean([np.mean(run[t]["acc"]) for t in run])  # noqa: E731
    assert iv.estimate == pytest.approx(mean(other) - mean(base))
    assert iv.low < iv.estimate < iv.high and iv.significant and iv.low > 0


def test_interval_narrows_with_more_documents():
    widths = []
    for n in (30, 120, 480):
        iv = paired_accuracy_difference(*runs(n, 0.2, 0.2, seed=1))
        widths.append(iv.high - iv.low)
    assert widths[0] > widths[1] > widths[2]


def test_paired_is_narrower_than_unpaired_spread():
    base, other = runs(100, 0.1, 0.05)
    iv = paired_accuracy_difference(base, other)
    unpaired_se = math.sqrt(2 * 0.25 / 100 / 2)  # two independent samples of p=0.5, averaged over 2 tasks
    assert (iv.high - iv.low) / 2 < 1.96 * unpaired_se


def test_acc_norm_falls_back_to_acc_where_a_task_has_none():
    base = {"piqa": {"doc_id": [0, 1], "acc": [0.0, 0.0], "acc_norm": [0.0, 1.0]},
            "boolq": {"doc_id": [3], "acc": [1.0]}}
    other = {"piqa": {"doc_id": [0, 1], "acc": [0.0, 0.0], "acc_norm": [1.0, 1.0]},
             "boolq": {"doc_id": [3], "acc": [0.0]}}
    assert paired_accuracy_difference(base, other, metric="acc_norm").estimate == pytest.approx((0.5 - 1.0) / 2)


def test_different_documents_are_refused():
    base, other = runs(20, 0.1, 0.1)
    other["piqa"]["doc_id"][0] += 1_000_000
    with pytest.raises(ValueError, match="different documents"):
        paired_accuracy_difference(base, other)


def test_perplexity_ratio():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.2, 12)
    iv = paired_perplexity_ratio(base, base + 0.1)  # every window 0.1 nats worse
    assert iv.estimate == pytest.approx(math.exp(0.1)) and iv.low == pytest.approx(iv.high) and iv.significant
    noisy = paired_perplexity_ratio(base, base + rng.normal(0, 0.05, 12))
    assert noisy.low < 1.0 < noisy.high and not noisy.significant
    with pytest.raises(ValueError, match="windows differ"):
        paired_perplexity_ratio(base, base[:-1])


def test_detectable_difference_falls_with_documents():
    assert detectable_difference(0.2, 30, 7) > detectable_difference(0.2, 200, 7)
    assert detectable_difference(0.2, 200, 7) == pytest.approx(1.96 * math.sqrt(0.2 / 1400))


def test_an_interval_touching_zero_up_to_rounding_is_not_significant():
    from rap.stats import Interval

    assert not Interval(0.04, 2e-18, 0.08).significant and Interval(0.04, 1e-6, 0.08).significant
    assert not Interval(1.1, 1.0 - 1e-15, 1.2, null=1.0).significant


def _coverage(interval, sample, truth: float, repeats: int) -> float:
    """The fraction of ``repeats`` fresh samples whose interval holds ``truth``."""
    hits = 0
    for _ in range(repeats):
        iv = interval(sample())
        hits += iv.low <= truth <= iv.high
    return hits / repeats


@pytest.mark.parametrize("windows", [6, 40])  # eval=quick and eval=standard
@pytest.mark.parametrize("shape", ["normal", "heavy tails", "skewed"])
def test_perplexity_interval_holds_its_level_at_the_window_counts_used(windows, shape):
    """Per-window NLL differences (compressed - baseline) of a mean 0.3 nats, drawn as normal, Student-t with 3
    degrees of freedom, or gamma with skewness 0.7; the nominal 95% interval covers exp(0.3) in >= 93% of repeats."""
    rng = np.random.default_rng(windows)
    noise = {"normal": lambda: rng.normal(0, 0.03, windows), "heavy tails": lambda: 0.03 * rng.standard_t(3, windows),
             "skewed": lambda: rng.gamma(8, 0.0106, windows) - 8 * 0.0106}[shape]
    base = rng.normal(3.0, 0.3, windows)
    cover = _coverage(lambda other: paired_perplexity_ratio(base, other), lambda: base + 0.3 + noise(), math.exp(0.3),
                      3000)
    print(f"coverage {cover:.3f}")
    assert cover >= 0.93


# (tasks, documents per task): eval=long's RULER (6 tasks x 5 per length), the kv_quant preset's one needle task at 10,
# eval=quick and eval=standard's zero-shot tasks
@pytest.mark.parametrize("tasks, docs", [(6, 5), (1, 10), (7, 30), (7, 200)])
@pytest.mark.parametrize("flip_up, flip_down", [(0.0, 0.05), (0.05, 0.05), (0.02, 0.08), (0.1, 0.1), (0.0, 0.4)])
def test_accuracy_interval_holds_its_level_at_the_document_counts_used(tasks, docs, flip_up, flip_down):
    """``tasks`` tasks of ``docs`` documents each; the other run turns ``flip_up`` of the base run's wrong documents
    right and ``flip_down`` of its right ones wrong: from 5% of documents scored differently (few flips, where a task's
    documents often all agree) through 5-15% (RAP at 0.2-0.3 on SmolLM2) to a large loss. The nominal 95% interval
    covers the expected difference in >= 93% of repeats."""
    rng = np.random.default_rng(docs)
    p = np.linspace(0.25, 0.75, tasks)
    truth = float(np.mean((1 - p) * flip_up - p * flip_down))
    ids = list(range(docs))

    def sample():
        base, other = {}, {}
        for t, pt in enumerate(p):
            right = rng.random(docs) < pt
            u = rng.random(docs)
            base[t] = {"doc_id": ids, "acc": right.astype(float)}
            other[t] = {"doc_id": ids, "acc": np.where(right, u >= flip_down, u < flip_up).astype(float)}
        return base, other

    cover = _coverage(lambda runs: paired_accuracy_difference(*runs), sample, truth, 2000)
    print(f"coverage {cover:.3f}")
    assert cover >= 0.93


@pytest.fixture(scope="module")
def coverage_rows():
    """The coverage simulation (``analysis.coverage``) at fewer repeats than the docs' table."""
    from conftest import REPO

    from analysis.coverage import coverage_table

    return coverage_table(REPO / "results", repeats=1500, per_pairing=150)


def test_the_perplexity_interval_holds_its_level_on_dependent_spread_windows(coverage_rows):
    """AR(1) dependence of 0, 0.35 and 0.7 between neighbouring windows, and the committed differences resampled in
    blocks: at 6 and 40 windows spread over the text, the interval covers the truth in >= 93% of repeats."""
    rap = coverage_rows[(coverage_rows["chosen"] == "spread") & coverage_rows["interval"].str.contains("rap")]
    assert len(rap) == 8
    print(rap.to_string())
    assert (rap["coverage"] >= 0.93).all(), rap


def test_the_old_interval_fails_on_the_first_contiguous_windows(coverage_rows):
    """The plain t-interval on the first N windows, as rap computed it before: well under its level once neighbours
    are correlated (0.35, the committed pairings' median), at both window counts."""
    old = coverage_rows[(coverage_rows["chosen"] == "first") & coverage_rows["interval"].str.contains("before")
                        & coverage_rows["dependence"].isin(["AR(1), rho 0.35", "AR(1), rho 0.7"])]
    assert len(old) == 4 and (old["coverage"] < 0.9).all(), old


def test_dependence_widens_the_interval_and_independence_leaves_it():
    from rap.stats import dependent_mean_interval, lag1_autocorrelation

    rng = np.random.default_rng(3)
    alternating = np.tile([1.0, -1.0], 20) + rng.normal(0, 0.01, 40)
    assert lag1_autocorrelation(alternating) == 0.0  # negative dependence never narrows the interval
    smooth = np.cumsum(rng.normal(0, 0.1, 40))
    assert lag1_autocorrelation(smooth) > 0.5
    low, high = dependent_mean_interval(smooth)
    half = 2.02 * smooth.std(ddof=1) / np.sqrt(40)  # the plain t-interval's half-width at 39 df
    assert (high - low) / 2 > 1.5 * half
