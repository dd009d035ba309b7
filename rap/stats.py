"""Paired comparisons of two runs evaluated on the same documents and perplexity windows.

Every job of a sweep sees the same seeded documents and the same windows, so a method is compared with its
baseline document by document and window by window. That cancels the between-document variance that dominates the
unpaired standard error (0.06-0.09 at 30 documents per task).

Both intervals are Student-t intervals on the paired differences: per window the difference of mean NLL (the log of
the perplexity ratio), per document the difference of scores. Neighbouring perplexity windows share an article, so
their differences are correlated (lag-1 autocorrelation +0.35 in the median pairing of the committed contiguous
windows): the window interval widens its variance by the AR(1) factor (1 + r) / (1 - r) and takes its t quantile at
the effective number of windows, r being the lag-1 autocorrelation corrected for its small-sample bias. Both were
checked by simulation at the sample sizes rap uses (``tests/test_stats.py``; ``python -m rap.stats`` prints the
table): at 6 and 40 windows spread over the text, with AR(1) dependence at 0, 0.35 and 0.7 between neighbouring
windows and with the committed per-window differences resampled in blocks, and at 5, 10, 30 and 200 documents per
task, the nominal 95% interval covers the true difference in at least 93% of repeats. The plain t-interval on the
first contiguous windows covers it in 87% (6 windows) and 83% (40) at 0.35.
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


def t_interval(estimate: float, se: float, df: float, level: float) -> tuple[float, float]:
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
    return Interval(estimate, *t_interval(estimate, float(np.sqrt(var)) / len(diffs), df, level))


MAX_AUTOCORRELATION = 0.9  # beyond it a handful of windows cannot tell the mean at all; the cap keeps df >= 1


def lag1_autocorrelation(d: np.ndarray) -> float:
    """The lag-1 autocorrelation of ``d`` in its order, with Marriott and Pope's small-sample bias correction
    (+(1 + 3r)/n), clipped to [0, ``MAX_AUTOCORRELATION``]: never narrower than the independent-window interval."""
    e = d - d.mean()
    ss = float(e @ e)
    if d.size < 3 or ss == 0.0:
        return 0.0
    r = float(e[1:] @ e[:-1]) / ss
    return min(max(r + (1 + 3 * r) / d.size, 0.0), MAX_AUTOCORRELATION)


def dependent_mean_interval(d, level: float = 0.95) -> tuple[float, float]:
    """A t-interval for the mean of a series whose neighbours are correlated: the variance of the mean times the AR(1)
    long-run factor (1 + r) / (1 - r), and the t quantile at the effective sample size n (1 - r) / (1 + r)."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    r = lag1_autocorrelation(d)
    inflation = (1 + r) / (1 - r)
    se = float(d.std(ddof=1) / np.sqrt(d.size) * np.sqrt(inflation))
    return t_interval(float(d.mean()), se, max(2.0, d.size / inflation) - 1, level)


def paired_perplexity_ratio(base_nll, other_nll, level: float = 0.95) -> Interval:
    """``ppl(other) / ppl(base)`` from each window's mean NLL (every window predicts the same number of tokens, so the
    corpus NLL is the mean over windows), with ``dependent_mean_interval`` on the per-window differences in the
    windows' order in the text."""
    b, o = np.asarray(base_nll, dtype=float), np.asarray(other_nll, dtype=float)
    if b.shape != o.shape or b.size == 0:
        raise ValueError(f"perplexity windows differ ({b.size} against {o.size}); pair only runs of one eval profile")
    d = o - b
    low, high = dependent_mean_interval(d, level)
    return Interval(float(np.exp(d.mean())), float(np.exp(low)), float(np.exp(high)), null=1.0)


def wilson_lower_bound(scores, level: float = 0.95) -> float:
    """The lower end of the Wilson score interval for the mean of 0/1 ``scores``."""
    n = len(scores)
    if n == 0:
        return float("nan")
    p, z = float(np.mean(scores)), float(_dist.norm.ppf(0.5 + level / 2))
    centre = p + z * z / (2 * n)
    return (centre - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def above_chance(scores, chance: float, level: float = 0.95) -> bool:
    """Whether 0/1 ``scores`` are resolved above ``chance`` accuracy: the Wilson interval's lower end is above it."""
    return wilson_lower_bound(scores, level) > chance


def detectable_difference(discordance: float, docs_per_task: int, n_tasks: int, z: float = 1.96) -> float:
    """The smallest average-accuracy difference a paired test resolves at ``z`` (1.96: 95%), when a fraction
    ``discordance`` of documents is scored differently by the two runs: each document's difference is -1, 0
    or +1, so its variance is at most ``discordance``, and the mean over ``n_tasks`` tasks divides it."""
    return z * float(np.sqrt(discordance / (docs_per_task * n_tasks)))
