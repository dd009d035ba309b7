"""How often the paired perplexity interval covers the truth, by simulation at the window counts rap uses, with the
dependence real windows have (``rap.stats``). Neighbouring windows of WikiText-2 test share an article, so their
per-window differences are simulated as an AR(1) series over every window of the text (148 of 2048 tokens with
SmolLM2's tokenizer), or resampled in blocks from the committed per-window differences; the windows a profile reads
are then taken from that series, spread over it or the first N, and the interval is computed on them.

    python -m analysis.coverage            # the table docs/usage.md shows (analysis.paper rebuilds it)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from rap.harness.perplexity import window_indices
from rap.harness.results import RunFolder
from rap.stats import dependent_mean_interval, t_interval

WINDOWS_IN_TEXT = 148  # WikiText-2 test in windows of 2048 tokens, SmolLM2's tokenizer (Gemma 3's: 142)
RHOS = (0.0, 0.35, 0.7)
COUNTS = (6, 40)  # eval=quick, eval=standard
REPEATS = 2000  # per AR(1) case (Monte Carlo standard error 0.005 at 95%)
REPEATS_PER_PAIRING = 500  # per committed pairing (0.01 each; their mean is over 14 pairings)
BLOCK = 5  # mean block length (windows) of the stationary bootstrap of committed differences
LEVEL = 0.95


def plain_t_interval(d) -> tuple[float, float]:
    """The interval rap used before: a t-interval that takes the windows as independent."""
    d = np.asarray(d, dtype=float)
    return t_interval(float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), d.size - 1, LEVEL)


INTERVALS = {"AR(1)-adjusted t (rap)": dependent_mean_interval, "plain t (before)": plain_t_interval}


def ar1_series(rho: float, repeats: int, rng, n: int = WINDOWS_IN_TEXT) -> np.ndarray:
    """(repeats, n) stationary AR(1) series of unit variance and mean 0."""
    e = rng.standard_normal((repeats, n))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho ** 2) * e[:, t]
    return x


def block_resampled(series: np.ndarray, repeats: int, rng, n: int = WINDOWS_IN_TEXT) -> np.ndarray:
    """(repeats, n) stationary-bootstrap series (Politis and Romano: blocks of geometric length, mean ``BLOCK``,
    wrapping around) of the centred ``series``: its own dependence and distribution, mean 0."""
    centred = np.asarray(series, dtype=float) - np.mean(series)
    out = np.empty((repeats, n))
    for r in range(repeats):
        t = 0
        while t < n:
            start, length = rng.integers(len(centred)), rng.geometric(1 / BLOCK)
            take = centred[(start + np.arange(length)) % len(centred)][: n - t]
            out[r, t:t + len(take)] = take
            t += len(take)
    return out


def coverage(interval, series: np.ndarray, windows: list[int]) -> float:
    """The fraction of rows of ``series`` (mean 0) whose interval over ``windows`` holds 0."""
    hits = 0
    for row in series:
        low, high = interval(row[windows])
        hits += low <= 0.0 <= high
    return hits / len(series)


def committed_differences(results: Path, source: str = "main_table") -> list[np.ndarray]:
    """Each committed compressed run's per-window NLL difference from its baseline, in the windows' order."""
    runs = {}
    for run in RunFolder.find(results / source, finished=True):
        runs[run.metrics()["method"], run.name] = np.asarray(run.per_sample()["ppl"]["window_nll"])
    base = [v for (method, _), v in runs.items() if method == "none"]
    if len(base) != 1:
        raise SystemExit(f"error: {results / source} holds {len(base)} baseline runs; one is needed to pair against.")
    return [v - base[0] for (method, _), v in runs.items() if method != "none"]


def coverage_table(results: Path, repeats: int = REPEATS, per_pairing: int = REPEATS_PER_PAIRING,
                   seed: int = 0) -> pd.DataFrame:
    """Coverage of each interval at each window count and choice: AR(1) series at each of ``RHOS``, and the committed
    main table's differences resampled in blocks (the mean over its pairings, and the worst)."""
    rng = np.random.default_rng(seed)
    rows = []
    sources = [(f"AR(1), rho {rho:g}", [ar1_series(rho, repeats, rng)]) for rho in RHOS]
    real = committed_differences(results)
    sources.append((f"committed differences ({len(real)} pairings)",
                    [block_resampled(d, per_pairing, rng) for d in real]))
    for label, series in sources:
        for n in COUNTS:
            for choice in ("spread", "first"):
                windows = window_indices(WINDOWS_IN_TEXT, n, choice)
                for name, interval in INTERVALS.items():
                    c = [coverage(interval, s, windows) for s in series]
                    rows.append({"dependence": label, "windows": n, "chosen": choice, "interval": name,
                                 "coverage": float(np.mean(c)), "worst": float(np.min(c))})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--repeats", type=int, default=REPEATS)
    a = ap.parse_args(argv)
    print(coverage_table(Path(a.results), a.repeats).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
