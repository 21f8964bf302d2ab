"""Bootstrap intervals over items: the basic (reverse-percentile) bootstrap interval, with no interval
at all below ``MIN_ITEMS``.

A statistic is a function of item weights, ``statistic(w) -> [R]`` for ``w: [R, n]`` rows that sum
to 1 (the sample itself: every weight 1/n; a bootstrap resample: its multiplicities / n), so that a
mean over items is one matrix product and a thousand resamples cost one BLAS call.

The basic interval (Davison & Hinkley 1997, eq. 5.6) is [2θ̂ − θ*₍₉₇.₅₎, 2θ̂ − θ*₍₂.₅₎]: it takes the
spread of θ − θ̂ to be that of θ̂ − θ*. The studies' statistic, a rank correlation of mean |score|
over few items, is biased towards 0 (noise in each component's mean shuffles the ranks), and a
resample, with its repeated items, is noisier still: its replicates lie *below* θ̂ by about as much
as θ̂ lies below the value over infinitely many items. The percentile interval [θ*₍₂.₅₎, θ*₍₉₇.₅₎]
then seldom covers that value (0–56 % of simulated studies at 3–64 items,
``benchmarks/interval_coverage.py``), nor does BCa, whose bias correction saturates (0–77 %); the
basic interval reflects the shift and covers it in 84–100 % from 12 items on (69–100 % below). It
need not contain θ̂ (it lies above θ̂ when the shift exceeds the spread: in up to 46 % of studies
at 8–16 items), and it is reported as it is: figures draw it as a segment, never as error bars
around θ̂. It is clipped to the statistic's range (``bounds``).

``MIN_ITEMS`` = 10: about where the worst of the benchmark's three noise models (log-normal) reaches
80 % coverage of a nominal 95 % (79 % at 10 items, 84 % at 12–16; 69–70 % at 3–5), the other two
being above 90 % throughout. Below it no interval is shown, and ``Interval.note`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

MIN_ITEMS = 10
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval; ``low``/``high`` are NaN when there is none, and ``note`` says why."""

    estimate: float
    low: float
    high: float
    note: str  # "basic bootstrap 95 %" or why there is no interval

    @property
    def shown(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def no_interval_note(n: int) -> str:
    return f"no intervals: {n} item{'s' if n != 1 else ''}, they need {MIN_ITEMS}"


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]``: each row a bootstrap resample's multiplicities / n."""
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts / n


def basic(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = 1000, seed: int = 0,
          level: float = LEVEL, bounds: tuple[float, float] = (-math.inf, math.inf),
          weights: np.ndarray | None = None, min_items: int = MIN_ITEMS) -> Interval:
    """θ̂ and its basic bootstrap interval for ``statistic`` of ``n`` items (module docstring).
    ``weights``: the resamples' (``resample_weights``), when several statistics share one set;
    below ``min_items`` items (and below 2) no interval."""
    estimate = float(statistic(np.full((1, n), 1.0 / n))[0])
    if n < max(min_items, 2):
        return Interval(estimate, math.nan, math.nan, no_interval_note(n))
    if math.isnan(estimate):
        return Interval(estimate, math.nan, math.nan, "no interval: the estimate is undefined")
    weights = resample_weights(n, resamples, seed) if weights is None else weights
    replicates = statistic(weights)
    replicates = replicates[~np.isnan(replicates)]
    if len(replicates) < 0.9 * len(weights):
        return Interval(estimate, math.nan, math.nan, "no interval: the statistic is undefined on most resamples")
    below, above = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    low, high = (float(min(max(v, bounds[0]), bounds[1])) for v in (2 * estimate - above, 2 * estimate - below))
    return Interval(estimate, low, high, f"basic bootstrap {round(100 * level)} %")


def format_interval(interval: Interval | dict, *, signed: bool = True, digits: int = 2) -> str:
    """``+0.53 [+0.41, +0.61]``, or ``+0.53 (no interval: 3 items, intervals need 10)`` (``+0.53`` when
    the note is empty): what the terminal, the tables and the report print. A dict needs ``estimate``,
    ``low``, ``high``, ``note``."""
    if isinstance(interval, dict):
        interval = Interval(interval["estimate"], interval["low"], interval["high"], interval["note"])
    spec = f"{'+' if signed else ''}.{digits}f"
    if math.isnan(interval.estimate):
        return "undefined"
    text = format(interval.estimate, spec)
    if interval.shown:
        return f"{text} [{format(interval.low, spec)}, {format(interval.high, spec)}]"
    return f"{text} ({interval.note})" if interval.note else text


def cell(row: dict, key: str = "spearman", digits: int = 2) -> str:
    """A row's ``key`` (``spearman`` or ``overlap``) with its interval: ``+0.53 [+0.41, +0.61]``;
    ``+0.53`` alone where there is none (``intervals_note`` says why, once per table)."""
    return format_interval(dict(estimate=row[key], low=row[f"{key}_low"], high=row[f"{key}_high"], note=""),
                           signed=key == "spearman", digits=digits)


def intervals_note(rows: list[dict]) -> str | None:
    """Why some ``rows`` have no interval (their first such note), or None."""
    return next((r["interval"] for r in rows if not r["interval"].startswith("basic")), None)


__all__ = ["Interval", "LEVEL", "MIN_ITEMS", "basic", "cell", "format_interval", "intervals_note", "no_interval_note",
           "resample_weights"]
