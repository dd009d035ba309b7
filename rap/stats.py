"""Paired comparisons of two runs evaluated on the same documents and perplexity windows.

Every job of a sweep sees the same seeded documents and the same windows, so a method is compared with its
baseline document by document: the bootstrap resamples documents (within each task) or windows, and takes
the same resample from both runs. That cancels the between-document variance that dominates the unpaired
standard error (0.06-0.09 at 30 documents per task).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap percentile interval; ``null`` is the no-difference value."""

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


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_accuracy_difference(base: dict, other: dict, metric: str = "acc", tasks=None, n_boot: int = 2000,
                               seed: int = 0, level: float = 0.95) -> Interval:
    """Difference in average accuracy (``other - base``; the mean over tasks of each task's mean, as ``acc_avg``).

    ``base`` and ``other`` are ``per_sample.json["zeroshot"]``: ``{task: {"doc_id": [...], metric: [...]}}``.
    A task without ``metric`` (acc_norm on winogrande, boolq) uses ``acc``, as ``acc_norm_avg`` does.
    Documents are resampled with replacement within each task, the same resample for both runs.
    """
    tasks = sorted(tasks or set(base) & set(other))
    if not tasks:
        raise ValueError("the two runs share no zero-shot task")
    diffs = [_aligned(base[t], other[t], metric if metric in base[t] else "acc") for t in tasks]
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for d in diffs:
        boot += d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    boot /= len(diffs)
    return Interval(float(np.mean([d.mean() for d in diffs])), *_percentiles(boot, level))


def paired_perplexity_ratio(base_nll, other_nll, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """``ppl(other) / ppl(base)`` from each window's mean NLL, windows resampled together (every window predicts
    the same number of tokens, so the corpus NLL is the mean over windows)."""
    b, o = np.asarray(base_nll, dtype=float), np.asarray(other_nll, dtype=float)
    if b.shape != o.shape or b.size == 0:
        raise ValueError(f"perplexity windows differ ({b.size} against {o.size}); pair only runs of one eval profile")
    d = o - b
    boot = d[np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))].mean(1)
    lo, hi = _percentiles(np.exp(boot), level)
    return Interval(float(np.exp(d.mean())), lo, hi, null=1.0)


def detectable_difference(discordance: float, docs_per_task: int, n_tasks: int, z: float = 1.96) -> float:
    """The smallest average-accuracy difference a paired test resolves at ``z`` (1.96: 95%), when a fraction
    ``discordance`` of documents is scored differently by the two runs: each document's difference is -1, 0
    or +1, so its variance is at most ``discordance``, and the mean over ``n_tasks`` tasks divides it."""
    return z * float(np.sqrt(discordance / (docs_per_task * n_tasks)))
