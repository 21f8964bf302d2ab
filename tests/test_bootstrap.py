"""Bootstrap intervals (``gradgraph.bootstrap``) and the agreement rows built on them: each number
checked against a direct computation (numpy's quantiles, scipy's Spearman ρ), the interval's
coverage measured, and the figure drawing whatever interval it is given."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gradgraph.bootstrap import MIN_ITEMS, basic, cell, format_interval, intervals_note, resample_weights
from gradgraph.labels import Registry
from gradgraph.studies.compare import agreement


def test_resample_weights_are_the_multiplicities_of_the_draws_over_n():
    w = resample_weights(7, 300, seed=3)
    draws = np.random.default_rng(3).integers(0, 7, size=(300, 7))
    counts = np.stack([np.bincount(d, minlength=7) for d in draws])
    assert np.array_equal(np.round(w * 7), counts) and np.allclose(w.sum(1), 1)


def test_basic_interval_is_the_percentile_interval_reflected_about_the_estimate():
    x = np.random.default_rng(0).exponential(size=30)
    interval = basic(lambda w: w @ x, 30, resamples=2000, seed=1)
    below, above = np.quantile(resample_weights(30, 2000, 1) @ x, [0.025, 0.975])
    assert interval.estimate == pytest.approx(x.mean())
    assert interval.low == pytest.approx(2 * x.mean() - above) and interval.high == pytest.approx(2 * x.mean() - below)
    assert interval.note == "basic bootstrap 95 %"


def test_basic_interval_of_a_mean_covers_it_at_about_its_level():
    rng = np.random.default_rng(5)
    covered = 0
    for s in range(300):
        x = rng.normal(2.0, 1.0, size=40)
        interval = basic(lambda w: w @ x, 40, resamples=400, seed=s)
        covered += interval.low <= 2.0 <= interval.high
    assert 0.88 <= covered / 300 <= 0.99  # nominal 0.95; the bootstrap runs a little narrow at n = 40


def test_no_interval_below_the_minimum_and_the_note_says_why():
    x = np.linspace(0, 1, MIN_ITEMS - 1)
    interval = basic(lambda w: w @ x, MIN_ITEMS - 1)
    assert interval.estimate == pytest.approx(0.5) and math.isnan(interval.low) and math.isnan(interval.high)
    assert not interval.shown
    assert format_interval(interval) == f"+0.50 (no intervals: {MIN_ITEMS - 1} items, they need {MIN_ITEMS})"
    one = basic(lambda w: w @ np.ones(1), 1, min_items=1)  # one item never has an interval
    assert math.isnan(one.low) and "1 item," in one.note


def test_bounds_clip_the_interval_to_the_statistic_range():
    x = np.r_[np.ones(18), 0.0, 0.2]  # a share near 1: the reflected interval would pass 1
    interval = basic(lambda w: w @ x, 20, bounds=(0.0, 1.0))
    assert interval.high == 1.0 and 0.0 <= interval.low < interval.estimate


def _labels(n_layers=3, n_heads=4):
    """Head outputs, query inputs and MLPs of a 3-layer, 4-head model, parsed."""
    registry = Registry(n_layers=n_layers, n_heads=n_heads, n_key_value_heads=n_heads, embeds=("hook_embed",))
    labels = ([f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
              + [f"L{layer}H{h}.q" for layer in range(n_layers) for h in range(n_heads)]
              + [f"MLP{layer}" for layer in range(n_layers)])
    return [registry.parse(label) for label in labels]


@pytest.mark.parametrize("items", [1, 2, 3, 5, MIN_ITEMS - 1, MIN_ITEMS, 16])
def test_agreement_rows_at_every_size(items):
    labels = _labels()
    g = torch.Generator().manual_seed(items)
    truth = torch.randn(items, len(labels), generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, len(labels))
    method = truth + 0.8 * torch.randn(items, len(labels), generator=g, dtype=torch.float64)
    rows = agreement(method, truth, labels, resamples=200)
    assert [r["group"] for r in rows] == ["heads", "q/k/v inputs", "MLPs", "all"]
    heads = rows[0]
    reference = spearmanr(method[:, :12].abs().mean(0), truth[:, :12].abs().mean(0)).statistic
    assert heads["spearman"] == pytest.approx(reference, abs=1e-12) and heads["n_items"] == items
    for r in rows:
        if items < MIN_ITEMS:
            assert math.isnan(r["spearman_low"]) and math.isnan(r["overlap_high"])
            assert r["interval"] == f"no intervals: {items} item{'s' if items > 1 else ''}, they need {MIN_ITEMS}"
        else:
            assert -1 <= r["spearman_low"] <= r["spearman_high"] <= 1
            assert 0 <= r["overlap_low"] <= r["overlap_high"] <= 1 and r["interval"] == "basic bootstrap 95 %"
    assert (intervals_note(rows) is None) == (items >= MIN_ITEMS)
    assert ("[" in cell(heads)) == (items >= MIN_ITEMS)


def test_agreement_refuses_different_items():
    from gradgraph import GradGraphError

    with pytest.raises(GradGraphError, match="same items"):
        agreement(torch.zeros(3, 12), torch.zeros(4, 12), _labels()[:12])


def test_agreement_figure_draws_an_interval_that_excludes_its_estimate(tmp_path):
    """The crash of `gradgraph sva --limit 24`: an interval entirely below (or above) its estimate."""
    from matplotlib.lines import Line2D

    from gradgraph import plot

    rows = [dict(group="heads", method="flow", truth="activation patching", spearman=0.68, spearman_low=0.70,
                 spearman_high=0.78),
            dict(group="heads", method="flow", truth="mean ablation", spearman=0.56, spearman_low=0.40,
                 spearman_high=0.50),
            dict(group="heads", method="udig", truth="mean ablation", spearman=0.3, spearman_low=math.nan,
                 spearman_high=math.nan)]
    drawn = []
    original = plot._save

    def keep(fig, path, **options):
        drawn.extend(line.get_xdata() for ax in fig.axes for line in ax.get_children() if isinstance(line, Line2D))
        return original(fig, path, **options)

    plot._save = keep
    try:
        path = plot.agreement_plot(rows, tmp_path / "a.png", title="t")
    finally:
        plot._save = original
    assert path.stat().st_size > 0
    segments = sorted(tuple(np.round(x, 2)) for x in drawn if len(x) == 2)
    assert (0.4, 0.5) in segments and (0.7, 0.78) in segments  # the intervals as given, not around ρ
    points = sorted(float(x[0]) for x in drawn if len(x) == 1)
    assert points == [0.3, 0.56, 0.68]  # the undefined interval: its estimate alone
