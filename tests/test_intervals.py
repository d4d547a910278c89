"""The label-efficiency intervals (sslsky.eval.intervals) against plain NumPy loops and known statistics."""

import math

import numpy as np
import pytest

from sslsky.eval import intervals
from sslsky.eval.intervals import Cell
from sslsky.eval.metrics import delta_z, sigma_mad


def reference_draws(predictions, truth, metric, galaxies, seeds):
    """The two-level bootstrap written as loops over draws and seeds, with the metrics of sslsky.eval.metrics."""
    out = []
    for g, s in zip(galaxies, seeds):
        values = []
        for seed in s:
            p, t = predictions[seed][g], truth[g]
            if metric == "accuracy":
                values.append(float(np.mean(p == t)))
            elif metric == "sigma_mad":
                values.append(sigma_mad(delta_z(p, t)))
            else:
                values.append(float(np.mean(np.abs(delta_z(p, t)) > 0.05)))
        out.append(sum(values) / len(values))
    return np.array(out)


@pytest.mark.parametrize("metric", ["accuracy", "sigma_mad", "eta"])
def test_cell_draws_equal_a_loop_over_draws_and_seeds(metric):
    rng = np.random.default_rng(0)
    n_seeds, n_test = 3, 57
    if metric == "accuracy":
        truth = rng.integers(0, 4, n_test)
        predictions = np.where(rng.random((n_seeds, n_test)) < 0.6, truth, rng.integers(0, 4, (n_seeds, n_test)))
    else:
        truth = rng.uniform(0.02, 0.4, n_test)
        predictions = truth + rng.normal(0, 0.03, (n_seeds, n_test)) * (1 + truth)
    galaxies = intervals.galaxy_draws(n_test, 200, rng)
    seeds = intervals.seed_draws(n_seeds, 200, rng)
    got = intervals.cell_draws(Cell(100, predictions), truth, metric, galaxies, seeds)
    np.testing.assert_allclose(got, reference_draws(predictions, truth, metric, galaxies, seeds), rtol=1e-12)
    # the point value: the mean over seeds of the metric on every test galaxy
    every = np.tile(np.arange(n_test), (1, 1))
    point = reference_draws(predictions, truth, metric, every, np.arange(n_seeds)[None])[0]
    assert intervals.cell_value(Cell(100, predictions), truth, metric) == pytest.approx(point, rel=1e-12)


def test_interval_of_one_seed_matches_the_binomial_error():
    """One seed, T test galaxies each right with probability p: the 95 % interval is about p +- 1.96 sqrt(p(1-p)/T)."""
    rng = np.random.default_rng(1)
    n_test = 400
    truth = np.zeros(n_test, dtype=np.int64)
    predictions = (rng.random((1, n_test)) >= 0.7).astype(np.int64)  # right (0) with probability 0.7
    p = float(np.mean(predictions == truth))
    galaxies = intervals.galaxy_draws(n_test, intervals.DRAWS, rng)
    draws = intervals.cell_draws(Cell(10, predictions), truth, "accuracy", galaxies, np.zeros((len(galaxies), 1),
                                                                                             np.int64))
    low, high = intervals.percentile_interval(draws)
    half = 1.96 * math.sqrt(p * (1 - p) / n_test)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)
    assert np.percentile(draws, [2.5, 97.5]) == pytest.approx([low, high])


def test_interval_grows_with_the_seed_spread():
    """Seeds that disagree widen the interval beyond what the test galaxies alone give."""
    rng = np.random.default_rng(2)
    n_test = 300
    truth = np.zeros(n_test, dtype=np.int64)
    same = np.tile((rng.random(n_test) >= 0.6).astype(np.int64), (3, 1))
    apart = np.stack([(rng.random(n_test) >= p).astype(np.int64) for p in (0.4, 0.6, 0.8)])
    galaxies = intervals.galaxy_draws(n_test, 1000, rng)
    seeds = intervals.seed_draws(3, 1000, rng)
    width = {}
    for name, pred in (("same", same), ("apart", apart)):
        low, high = intervals.percentile_interval(intervals.cell_draws(Cell(10, pred), truth, "accuracy", galaxies,
                                                                       seeds))
        width[name] = high - low
    assert width["apart"] > 2 * width["same"]


def test_matching_labels_interpolates_in_log_n():
    series = [(100, 0.40), (1000, 0.60)]
    kind, n = intervals.matching_labels(series, 0.50, lower_better=False)
    assert kind == "=" and n == pytest.approx(math.sqrt(100 * 1000))
    assert intervals.matching_labels(series, 0.30, lower_better=False) == ("<=", 100.0)
    assert intervals.matching_labels(series, 0.70, lower_better=False) == (">", 1000.0)
    assert intervals.matching_labels([(10, 0.05), (100, 0.03)], 0.04, lower_better=True)[1] == \
        pytest.approx(math.sqrt(10 * 100))
    assert intervals.factor_of((">", 1000.0), 100) == math.inf
    assert intervals.factor_of(("=", 250.0), 100) == 2.5


def test_saving_factor_interval_brackets_the_known_factor_and_flags_censoring():
    """Scratch at 100 / 1000 labels right with probability 0.4 / 0.6, finetune with 100 labels at 0.5: the factor
    is sqrt(10) ~ 3.2 up to the test noise; a finetune that scratch never reaches is censored above."""
    rng = np.random.default_rng(3)
    n_test, n_seeds = 2000, 3
    truth = np.zeros(n_test, dtype=np.int64)

    def cell(n, p):
        return Cell(n, (rng.random((n_seeds, n_test)) >= p).astype(np.int64))

    scratch = [cell(100, 0.4), cell(1000, 0.6)]
    galaxies = intervals.galaxy_draws(n_test, 400, rng)
    (saving,) = intervals.saving_factors([cell(100, 0.5)], scratch, truth, "accuracy", galaxies, rng)
    assert saving.point[0] == "="
    point = saving.point[1] / 100
    assert 2.5 < point < 4.0 and saving.low <= point <= saving.high
    assert saving.low > 2.0 and saving.high < 5.0 and saving.censored_high == 0.0
    (never,) = intervals.saving_factors([cell(100, 0.9)], scratch, truth, "accuracy", galaxies, rng)
    assert never.point == (">", 1000.0) and never.high == math.inf and never.censored_high == 1.0
