"""Intervals for a label-efficiency table: a two-level bootstrap over the repetitions of each cell and the test
galaxies, and the label saving factor with its interval.

A *cell* is one (protocol, number of labels) of one task, run with S seeds (each seed draws its own label subset,
initialisation, data order and augmentation); every seed's model predicts the same T test galaxies, giving a
per-galaxy score matrix (S, T) for the cell. The point value of a cell is the mean over its seeds of the metric
on the whole test set. One bootstrap draw resamples the T test galaxies with replacement -- the *same* galaxies
for every cell of the task, since every cell is scored on one test set -- and, independently per cell, S of its
seeds with replacement; the drawn value is the mean over the drawn seeds of the metric on the drawn galaxies.
The interval is the central ``level`` percentile range of the draws. It covers the spread of the supervised
stage (label subset, training seed) and the finite test set; it does not cover the pretraining seed (one
encoder) nor the choice of the mock survey (one catalog).

The label saving factor at a finetune label count n is the number of labels scratch needs to reach finetune's
value there (scratch's values interpolated linearly in log n; :func:`matching_labels`) over n; per bootstrap
draw it is computed from that draw's values, so its interval carries the spread of both protocols and the
pairing of the shared test set. A draw where scratch never gets there within the grid counts as +inf (the
factor is at least n_max / n); one where scratch's smallest count already does as n_min / n (at most that), so
when more than the lower tail of the draws is of that kind the low end is only a bound (``Saving.low_is_bound``).

Caveats: with S seeds there are few distinct seed resamples (10 for S = 3), and resampling S of S understates the
seed variance by (S - 1) / S; cells are resampled independently although finetune and scratch at one seed share
their label subset (which makes the factor's interval, if anything, wider than a paired one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sslsky.eval.metrics import MAD_TO_SIGMA, OUTLIER_THRESHOLD, delta_z  # delta_z broadcasts (S, T) - (T,)

#: Bootstrap draws of a table and the central coverage of its intervals.
DRAWS = 2000
LEVEL = 0.95


def accuracy(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-seed accuracy over the galaxies of the last axis: ``predicted``, ``true`` (..., T) -> (...)."""
    return np.mean(np.asarray(predicted) == np.asarray(true), axis=-1)


def sigma_mad(z_phot: np.ndarray, z_spec: np.ndarray) -> np.ndarray:
    """Per-seed 1.4826 x median |dz - median dz| over the last axis (:func:`sslsky.eval.metrics.sigma_mad`)."""
    dz = delta_z(z_phot, z_spec)
    return MAD_TO_SIGMA * np.median(np.abs(dz - np.median(dz, axis=-1, keepdims=True)), axis=-1)


def outlier_fraction(z_phot: np.ndarray, z_spec: np.ndarray) -> np.ndarray:
    """Per-seed eta: the fraction with |dz| > ``OUTLIER_THRESHOLD`` over the last axis."""
    return np.mean(np.abs(delta_z(z_phot, z_spec)) > OUTLIER_THRESHOLD, axis=-1)


#: metric name -> (function of (predictions (S, T), truth (T,)) -> (S,), lower is better)
METRIC_FUNCTIONS: dict[str, tuple[Callable, bool]] = {
    "accuracy": (accuracy, False), "sigma_mad": (sigma_mad, True), "eta": (outlier_fraction, True)}


@dataclass
class Cell:
    """One cell: its label count and the predictions of each seed's model for the task's test galaxies."""

    n_labels: int
    predictions: np.ndarray  # (S, T): predicted class or z, seed by seed, in the task's test order


def galaxy_draws(n_galaxies: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, T) test-galaxy indices drawn with replacement, shared by every cell of a task."""
    return rng.integers(0, n_galaxies, size=(draws, n_galaxies))


def seed_draws(n_seeds: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, S) seed indices drawn with replacement, one set per cell."""
    return rng.integers(0, n_seeds, size=(draws, n_seeds))


def cell_value(cell: Cell, truth: np.ndarray, metric: str) -> float:
    """The point value: the mean over seeds of the metric on the whole test set."""
    function, _ = METRIC_FUNCTIONS[metric]
    return float(np.mean(function(cell.predictions, truth)))


def cell_draws(cell: Cell, truth: np.ndarray, metric: str, galaxies: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """(draws,) bootstrap values of a cell: per draw b, the mean over seeds ``seeds[b]`` of the metric on the
    galaxies ``galaxies[b]``."""
    function, _ = METRIC_FUNCTIONS[metric]
    out = np.empty(len(galaxies))
    for b, (g, s) in enumerate(zip(galaxies, seeds)):
        per_seed = function(cell.predictions[:, g], truth[g])  # (S,) on the drawn galaxies
        out[b] = per_seed[s].mean()
    return out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` range of ``values`` (+inf allowed: a censored draw)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no bootstrap draws")
    tail = (1.0 - level) / 2.0 * 100.0
    # linear interpolation between draws; with +inf draws the nearest draw (inf - inf is no number)
    method = "linear" if np.all(np.isfinite(values)) else "inverted_cdf"
    low, high = np.percentile(values, [tail, 100.0 - tail], method=method)
    return float(low), float(high)


def matching_labels(series: Sequence[tuple[int, float]], target: float, lower_better: bool) -> tuple[str, float]:
    """Labels scratch needs to reach ``target`` from its ``(n_labels, value)`` series (sorted by n): ("=", n)
    interpolated linearly in log n at the first crossing, ("<=", n_min) when its smallest count already reaches
    it, (">", n_max) when no count does."""
    if not math.isfinite(target) or any(not math.isfinite(v) for _, v in series):
        raise ValueError(f"matching_labels needs finite values, got target {target} and series {list(series)}")

    def good(value: float) -> bool:
        return value <= target if lower_better else value >= target

    for i, (n, value) in enumerate(series):
        if good(value):
            if i == 0:
                return "<=", float(n)
            n0, v0 = series[i - 1]
            t = (target - v0) / (value - v0)
            return "=", math.exp(math.log(n0) + t * (math.log(n) - math.log(n0)))
    return ">", float(series[-1][0])


def factor_of(how: tuple[str, float], n_finetune: int) -> float:
    """A :func:`matching_labels` answer as a factor over finetune's ``n_finetune`` labels (">": +inf)."""
    kind, n = how
    return math.inf if kind == ">" else n / n_finetune


@dataclass
class Saving:
    """The label saving factor at one finetune label count: the point answer and the interval of the draws."""

    n_finetune: int
    point: tuple[str, float]  # matching_labels on the point values
    low: float  # factor percentiles; +inf: scratch does not get there within the grid
    high: float
    censored_low: float  # the share of draws where scratch's smallest count already matches (factor <= that)
    censored_high: float  # the share of draws where scratch never matches (factor > n_max / n)
    level: float = LEVEL

    @property
    def low_is_bound(self) -> bool:
        """The low end is only an upper bound (``<= low``): more than the lower tail of the draws had scratch's
        smallest count already matching, whose true factor may lie anywhere below n_min / n."""
        return self.censored_low > (1.0 - self.level) / 2.0


def saving_factors(finetune: Sequence[Cell], scratch: Sequence[Cell], truth: np.ndarray, metric: str,
                   galaxies: np.ndarray, rng: np.random.Generator, level: float = LEVEL) -> list[Saving]:
    """The saving factor at each finetune label count, with its bootstrap interval (module doc)."""
    _, lower = METRIC_FUNCTIONS[metric]
    scratch = sorted(scratch, key=lambda c: c.n_labels)
    draws = len(galaxies)
    sc_draws = np.stack([cell_draws(c, truth, metric, galaxies, seed_draws(len(c.predictions), draws, rng))
                         for c in scratch])  # (cells, draws)
    sc_point = [(c.n_labels, cell_value(c, truth, metric)) for c in scratch]
    out = []
    for cell in sorted(finetune, key=lambda c: c.n_labels):
        ft = cell_draws(cell, truth, metric, galaxies, seed_draws(len(cell.predictions), draws, rng))
        hows = [matching_labels([(c.n_labels, v) for c, v in zip(scratch, sc_draws[:, b])], ft[b], lower)
                for b in range(draws)]
        factors = np.array([factor_of(h, cell.n_labels) for h in hows])
        low, high = percentile_interval(factors, level)
        point = matching_labels(sc_point, cell_value(cell, truth, metric), lower)
        out.append(Saving(cell.n_labels, point, low, high,
                          censored_low=float(np.mean([h[0] == "<=" for h in hows])),
                          censored_high=float(np.mean([h[0] == ">" for h in hows])), level=level))
    return out
