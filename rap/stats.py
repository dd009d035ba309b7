"""Paired comparisons of two runs evaluated on the same documents and perplexity windows.

Every job of a sweep sees the same seeded documents and the same windows, so a method is compared with its
baseline document by document and window by window. That cancels the between-document variance that dominates the
unpaired standard error (0.06-0.09 at 30 documents per task).

Both intervals are Student-t intervals on the paired differences: per window the difference of mean NLL (the log of
the perplexity ratio), per document the difference of scores. They were chosen by simulation at the sample sizes
rap uses (``docs/usage.md#paired-statistics``; ``tests/test_stats.py`` repeats it): at 6 and 40 windows, and at 5,
10, 30 and 200 documents per task, the nominal 95% interval covers the true difference in at least 93% of repeats,
where a percentile bootstrap over 6 windows covers it in only 83-85%.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _dist


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval; ``null`` is the no-difference value."""

    estimate: float
    low: float
    high: float
    null: float = 0.0

    @property
    def significant(self) -> bool:
        """The interval excludes the no-difference value (an end that only rounding separates from it does not)."""
        eps = 1e-9 * max(1.0, abs(self.null))
        return self.low > self.null + eps or self.high < self.null - eps


def _aligned(base: dict, other: dict, metric: str) -> np.ndarray:
    """``other - base`` per document of one task, matched by document id."""
    b = dict(zip(base["doc_id"], base[metric]))
    o = dict(zip(other["doc_id"], other[metric]))
    if set(b) != set(o):
        raise ValueError("the two runs were evaluated on different documents; pair only runs of one sweep (same eval "
                         "profile and seed)")
    return np.array([o[d] - b[d] for d in sorted(b)], dtype=float)


def _t_interval(estimate: float, se: float, df: int, level: float) -> tuple[float, float]:
    """``estimate`` ± the Student-t quantile at ``level`` times ``se``; NaN ends where ``df`` < 1 (one sample)."""
    if df < 1:
        return float("nan"), float("nan")
    q = float(_dist.t.ppf(0.5 + level / 2, df))
    return estimate - q * se, estimate + q * se


def paired_accuracy_difference(base: dict, other: dict, metric: str = "acc", tasks=None,
                               level: float = 0.95) -> Interval:
    """Difference in average accuracy (``other - base``; the mean over tasks of each task's mean, as ``acc_avg``),
    with a paired t-interval: the variance of each task's mean difference over its documents, summed over tasks.

    Each task's sum of squares gets one discordant pair's worth (+1: half a document flipped each way, Agresti and
    Min's 0.5 per cell). Without it, a task whose few documents all agree gives a zero-width interval, which covers a
    real difference in as few as a quarter of repeats at 5-10 documents (and 82-89% at 30 where 1-5% of them differ);
    with it, coverage holds at 93% or more at 5, 10, 30 and 200 documents per task.

    ``base`` and ``other`` are ``per_sample.json["zeroshot"]``: ``{task: {"doc_id": [...], metric: [...]}}``.
    A task without ``metric`` (acc_norm on winogrande, boolq) uses ``acc``, as ``acc_norm_avg`` does.
    """
    tasks = sorted(tasks or set(base) & set(other))
    if not tasks:
        raise ValueError("the two runs share no zero-shot task")
    diffs = [_aligned(base[t], other[t], metric if metric in base[t] else "acc") for t in tasks]
    estimate = float(np.mean([d.mean() for d in diffs]))
    var = sum((np.sum((d - d.mean()) ** 2) + 1.0) / ((d.size - 1) * d.size) for d in diffs if d.size > 1)
    df = sum(d.size - 1 for d in diffs)
    return Interval(estimate, *_t_interval(estimate, float(np.sqrt(var)) / len(diffs), df, level))


def paired_perplexity_ratio(base_nll, other_nll, level: float = 0.95) -> Interval:
    """``ppl(other) / ppl(base)`` from each window's mean NLL, with a t-interval on the per-window differences
    (every window predicts the same number of tokens, so the corpus NLL is the mean over windows)."""
    b, o = np.asarray(base_nll, dtype=float), np.asarray(other_nll, dtype=float)
    if b.shape != o.shape or b.size == 0:
        raise ValueError(f"perplexity windows differ ({b.size} against {o.size}); pair only runs of one eval profile")
    d = o - b
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    low, high = _t_interval(float(d.mean()), se, d.size - 1, level)
    return Interval(float(np.exp(d.mean())), float(np.exp(low)), float(np.exp(high)), null=1.0)


def detectable_difference(discordance: float, docs_per_task: int, n_tasks: int, z: float = 1.96) -> float:
    """The smallest average-accuracy difference a paired test resolves at ``z`` (1.96: 95%), when a fraction
    ``discordance`` of documents is scored differently by the two runs: each document's difference is -1, 0
    or +1, so its variance is at most ``discordance``, and the mean over ``n_tasks`` tasks divides it."""
    return z * float(np.sqrt(discordance / (docs_per_task * n_tasks)))
