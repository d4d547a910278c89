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
    ordered = np.sort(draws)  # the linear-interpolation percentile, by hand
    rank = 0.025 * (len(ordered) - 1)
    by_hand = ordered[int(rank)] + (rank - int(rank)) * (ordered[int(rank) + 1] - ordered[int(rank)])
    assert low == pytest.approx(by_hand, rel=1e-12)


def test_draws_share_galaxies_and_resample_with_replacement():
    """Galaxy draws: every index in range, repeats present (with replacement), one row per draw; the same rows
    index every cell, so two cells' draws are paired."""
    rng = np.random.default_rng(4)
    galaxies = intervals.galaxy_draws(50, 300, rng)
    assert galaxies.shape == (300, 50) and galaxies.min() >= 0 and galaxies.max() < 50
    assert all(len(np.unique(row)) < 50 for row in galaxies[:20])  # a sample of 50 from 50 repeats itself
    assert abs(np.mean([len(np.unique(r)) for r in galaxies]) / 50 - (1 - (1 - 1 / 50) ** 50)) < 0.02
    truth = np.zeros(50, dtype=np.int64)
    right = np.zeros((1, 50), dtype=np.int64)
    wrong_half = right.copy()
    wrong_half[0, ::2] = 1
    a = intervals.cell_draws(Cell(1, right), truth, "accuracy", galaxies, np.zeros((300, 1), np.int64))
    b = intervals.cell_draws(Cell(1, wrong_half), truth, "accuracy", galaxies, np.zeros((300, 1), np.int64))
    odd = np.array([np.mean(row % 2 == 1) for row in galaxies])  # the share of drawn galaxies b gets right
    np.testing.assert_allclose(a, 1.0)
    np.testing.assert_allclose(b, odd)


def test_percentile_interval_with_censored_draws():
    """+inf draws (scratch never matches) are draws like any other: the nearest-rank percentile."""
    values = np.array([1.0] * 90 + [math.inf] * 10)
    low, high = intervals.percentile_interval(values)
    assert low == 1.0 and high == math.inf
    assert intervals.percentile_interval(np.array([2.0, 3.0, 4.0, math.inf]), level=0.5) == (2.0, 4.0)
    with pytest.raises(ValueError):
        intervals.percentile_interval(np.array([]))


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
    with pytest.raises(ValueError, match="finite"):
        intervals.matching_labels([(100, math.nan), (1000, 0.6)], 0.5, lower_better=False)
    with pytest.raises(ValueError, match="finite"):
        intervals.matching_labels(series, math.nan, lower_better=False)


def test_saving_factors_equal_a_loop_over_draws():
    """saving_factors against a plain loop: per draw, the cells' bootstrap values, scratch's first crossing in
    log n, the factor; then the 95 % range. The seed draws are replayed from the same generator state."""
    rng = np.random.default_rng(5)
    n_test, n_seeds, draws = 120, 3, 300
    truth = rng.integers(0, 3, n_test)

    def cell(n, p):
        return Cell(n, np.where(rng.random((n_seeds, n_test)) < p, truth, (truth + 1) % 3))

    scratch = [cell(50, 0.45), cell(200, 0.6), cell(800, 0.75)]
    finetune = [cell(50, 0.62), cell(200, 0.7)]
    galaxies = intervals.galaxy_draws(n_test, draws, rng)
    state = rng.bit_generator.state
    got = intervals.saving_factors(finetune, scratch, truth, "accuracy", galaxies, rng)
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    sc_seeds = [replay.integers(0, n_seeds, size=(draws, n_seeds)) for _ in scratch]
    ft_seeds = [replay.integers(0, n_seeds, size=(draws, n_seeds)) for _ in finetune]

    def value(c, g, s):
        return float(np.mean([np.mean(c.predictions[k][g] == truth[g]) for k in s]))

    for saving, ft, ft_s in zip(got, finetune, ft_seeds):
        factors, low_hits = [], 0
        for b in range(draws):
            target = value(ft, galaxies[b], ft_s[b])
            series = [(c.n_labels, value(c, galaxies[b], s[b])) for c, s in zip(scratch, sc_seeds)]
            factor = math.inf
            for i, (n, v) in enumerate(series):
                if v >= target:
                    if i == 0:
                        factor, low_hits = n / ft.n_labels, low_hits + 1
                    else:
                        (n0, v0) = series[i - 1]
                        factor = math.exp(math.log(n0) + (target - v0) / (v - v0) * math.log(n / n0)) / ft.n_labels
                    break
            factors.append(factor)
        factors = np.sort(factors)
        assert saving.n_finetune == ft.n_labels
        assert saving.censored_low == pytest.approx(low_hits / draws)
        assert saving.censored_high == pytest.approx(np.mean(np.isinf(factors)))
        expected = intervals.percentile_interval(factors)
        assert (saving.low, saving.high) == pytest.approx(expected, rel=1e-9)
    assert got[0].low_is_bound == (got[0].censored_low > 0.025)


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
