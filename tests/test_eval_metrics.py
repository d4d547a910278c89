"""Photo-z and classification metrics against hand-worked values and independent NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest

from sslsky.eval.metrics import (
    bin_accuracy,
    classification_metrics,
    confusion_matrix,
    crps_binned,
    delta_z,
    pdf_point_estimates,
    photoz_metrics,
    redshift_bin_edges,
    redshift_to_bin,
    sigma_mad,
)


def test_photoz_point_metrics_by_hand():
    z_spec = np.array([0.1, 0.2, 0.0, 0.3])
    z_phot = np.array([0.111, 0.2, 0.1, 0.3 - 0.013])
    # dz = (zp - zs) / (1 + zs): 0.01, 0, 0.1, -0.01
    np.testing.assert_allclose(delta_z(z_phot, z_spec), [0.01, 0.0, 0.1, -0.01], atol=1e-12)
    m = photoz_metrics(z_phot, z_spec)
    # median dz = 0.005; |dz - 0.005| = 0.005, 0.005, 0.095, 0.015 -> median 0.01
    assert m["sigma_mad"] == pytest.approx(1.4826 * 0.01)
    assert m["bias"] == pytest.approx(0.1 / 4)
    assert m["eta"] == pytest.approx(0.25)  # only |0.1| > 0.05
    assert m["n"] == 4


def test_sigma_mad_of_a_gaussian():
    dz = np.random.default_rng(0).normal(0.02, 0.03, 200_000)
    assert sigma_mad(dz) == pytest.approx(0.03, rel=0.01)


def test_bins_and_point_estimates():
    edges = redshift_bin_edges(4, 0.0, 0.4)  # 0, .1, .2, .3, .4
    np.testing.assert_allclose(edges, [0, 0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(redshift_to_bin([0.0, 0.05, 0.1, 0.399, 0.4, -0.1, 0.7], edges),
                                  [0, 0, 1, 3, 3, 0, 3])
    pdf = np.array([[0.0, 1.0, 0.0, 0.0],   # all in bin 1: mean = mode = 0.15, median 0.15
                    [0.25, 0.25, 0.25, 0.25],  # uniform: mean 0.2, median 0.2
                    [0.1, 0.2, 0.6, 0.1]])  # CDF 0.1, 0.3, 0.9: median in bin 2 at 0.2 + 0.2/0.6 * 0.1
    est = pdf_point_estimates(pdf, edges)
    np.testing.assert_allclose(est["mean"], [0.15, 0.2, 0.05 * 0.1 + 0.15 * 0.2 + 0.25 * 0.6 + 0.35 * 0.1])
    np.testing.assert_allclose(est["median"], [0.15, 0.2, 0.2 + 0.1 / 3])
    np.testing.assert_allclose(est["mode"], [0.15, 0.05, 0.25])
    assert bin_accuracy(pdf, [0.12, 0.01, 0.05], edges) == pytest.approx(2 / 3)


def crps_by_quadrature(pdf_row, z_spec, edges, lo=-0.2, hi=0.8, n=400_001):
    """CRPS = integral of (F - H)^2 on a fine grid, F from interpolating the CDF linearly between edges."""
    z = np.linspace(lo, hi, n)
    cdf_edges = np.concatenate([[0.0], np.cumsum(pdf_row)])
    f = np.interp(z, edges, cdf_edges, left=0.0, right=1.0)
    h = (z >= z_spec).astype(float)
    return np.trapezoid((f - h) ** 2, z)


def test_crps_matches_quadrature_including_outside_the_range():
    rng = np.random.default_rng(1)
    edges = redshift_bin_edges(12, 0.0, 0.4)
    pdf = rng.dirichlet(np.ones(12) * 0.5, size=5)
    z_spec = np.array([0.0731, 0.2, 0.3999, -0.05, 0.55])  # inside, on an edge, last bin, below, above
    got = crps_binned(pdf, z_spec, edges)
    want = [crps_by_quadrature(p, z, edges) for p, z in zip(pdf, z_spec)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_crps_of_a_perfect_narrow_pdf_is_a_third_of_the_bin():
    edges = redshift_bin_edges(4, 0.0, 0.4)
    pdf = np.array([[0.0, 1.0, 0.0, 0.0]])
    # z_spec at the bin centre, F rises linearly over the bin: 2 * integral_0^{w/2} (t/w)^2 dt = w / 12
    assert crps_binned(pdf, [0.15], edges)[0] == pytest.approx(0.1 / 12)
    assert photoz_metrics([0.15], [0.15], pdf, edges)["crps"] == pytest.approx(0.1 / 12)


def test_confusion_matrix_and_classification_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])
    cm = confusion_matrix(y_true, y_pred, 4)
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    m = classification_metrics(y_true, y_pred, 4, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["recall"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(0.5), "c": pytest.approx(0.75), "d": None}
    # per-class F1 = 2 TP / (support + predicted): a 4/6, b 2/4, c 6/8; class d absent everywhere -> not averaged
    assert m["macro_f1"] == pytest.approx((4 / 6 + 2 / 4 + 6 / 8) / 3)
    assert m["support"] == {"a": 3, "b": 2, "c": 4, "d": 0}
    assert m["confusion_matrix"] == cm.tolist()


def test_classification_metrics_against_a_loop():
    rng = np.random.default_rng(2)
    k = 7
    y_true = rng.integers(0, k, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, k, 500))
    m = classification_metrics(y_true, y_pred, k)
    f1s = []
    for c in range(k):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        assert m["recall"][str(c)] == pytest.approx(tp / (tp + fn))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1s.append(2 * precision * recall / (precision + recall))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="equal 1-d"):
        photoz_metrics([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match=r"classes must be in \[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="z_max > z_min"):
        redshift_bin_edges(10, 0.4, 0.0)
