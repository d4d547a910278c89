"""Photo-z and classification metrics (NumPy; no torch, no scikit-learn).

Photo-z (Pasquet et al. 2019; Hayat et al. 2021):

- Δz = (z_phot − z_spec) / (1 + z_spec);
- σ_MAD = 1.4826 × median |Δz − median Δz|;
- bias = mean Δz;
- η (outlier fraction) = fraction of |Δz| > 0.05;
- bin accuracy: fraction of objects whose most probable redshift bin holds z_spec;
- CRPS of a binned PDF (Gneiting & Raftery 2007): ∫ (F(z) − H(z − z_spec))² dz, with F the CDF of the
  PDF taken as uniform inside each bin (so F is piecewise linear and the integral is exact); a z_spec
  outside the bins adds its distance to the range.

Classification: accuracy, macro-F1, per-class recall and the confusion matrix (rows true, columns
predicted). Macro-F1 averages the per-class F1 over the classes present in the truth or the
predictions (as scikit-learn does without ``labels=``); a class with no true members has recall
``None`` (JSON null), not 0.

Too small to mean anything (:func:`small_test_warnings`, :func:`small_train_warnings`): a test split of fewer
than :data:`MIN_TEST_GALAXIES` labelled galaxies, or a class of the labelled train rows with no test galaxy;
fewer than :data:`MIN_TRAIN_GALAXIES` labelled train galaxies, or a test class with none.
The evaluations print these warnings and list them in ``metrics.json`` (``warnings``); the sweep's
``results.csv`` carries them in its ``warnings`` column.

Arrays carry their shapes in the docstrings: N objects, K bins or classes.
"""

from __future__ import annotations

import numpy as np

#: σ_MAD = MAD_TO_SIGMA × median absolute deviation (the Gaussian σ of a MAD).
MAD_TO_SIGMA = 1.4826
#: |Δz| above which a photo-z is an outlier (Pasquet et al. 2019).
OUTLIER_THRESHOLD = 0.05
#: A test split with fewer labelled galaxies than this gives metrics that are noise: flagged, never silent.
MIN_TEST_GALAXIES = 20
#: Fewer labelled train galaxies than this (label_fraction too small for the data): flagged, never silent.
MIN_TRAIN_GALAXIES = 20


def _absent_classes(have, lack, class_names=None) -> list[str]:
    """Names (``class_names``, else the index) of the classes in ``have`` that ``lack`` does not hold."""
    missing = sorted(set(np.asarray(have).tolist()) - set(np.asarray(lack).tolist()))
    return [str(class_names[c]) if class_names is not None else str(c) for c in missing]


def small_test_warnings(n_test: int, train_labels=None, test_labels=None, class_names=None) -> list[str]:
    """Why a test split is too small to mean anything; [] when it is not.

    ``n_test``: labelled test galaxies scored. Classification: ``train_labels`` (N_train,) and ``test_labels``
    (N_test,) class indices in [0, K) -- a class present in the train rows with no test galaxy is named
    (``class_names`` (K,), else its index).
    """
    out = []
    if n_test < MIN_TEST_GALAXIES:
        out.append(f"only {n_test} labelled test galaxies (fewer than {MIN_TEST_GALAXIES}): the metrics are noise, "
                   f"not a result; evaluate on more data (a larger test split)")
    both = train_labels is not None and test_labels is not None
    names = _absent_classes(train_labels, test_labels, class_names) if both else []
    if names:
        out.append(f"{len(names)} class(es) of the labelled train rows have no test galaxy ({', '.join(names)}): "
                   f"their recall and F1 are not measured and macro-F1 leaves them out")
    return out


def small_train_warnings(n_train: int, train_labels=None, test_labels=None, class_names=None) -> list[str]:
    """Why the labelled train rows are too few to learn from; [] when they are not.

    ``n_train``: labelled train galaxies used. Classification: a class of the test split with no labelled train
    galaxy is named (no protocol can predict it).
    """
    out = []
    if n_train < MIN_TRAIN_GALAXIES:
        out.append(f"only {n_train} labelled train galaxies (fewer than {MIN_TRAIN_GALAXIES}): raise label_fraction "
                   f"or label more galaxies; this is not a label-efficiency result")
    both = train_labels is not None and test_labels is not None
    names = _absent_classes(test_labels, train_labels, class_names) if both else []
    if names:
        out.append(f"{len(names)} class(es) of the test split have no labelled train galaxy ({', '.join(names)}): "
                   f"they cannot be predicted")
    return out


# ---------------------------------------------------------------------------
# Redshift bins and PDFs.
# ---------------------------------------------------------------------------


def redshift_bin_edges(n_bins: int = 180, z_min: float = 0.0, z_max: float = 0.4) -> np.ndarray:
    """(K + 1,) edges of ``n_bins`` equal redshift bins on [z_min, z_max)."""
    if n_bins < 1 or not z_max > z_min:
        raise ValueError(f"need n_bins >= 1 and z_max > z_min, got {n_bins}, [{z_min}, {z_max})")
    return np.linspace(z_min, z_max, n_bins + 1)


def redshift_to_bin(z, bin_edges) -> np.ndarray:
    """(N,) int bin index of each redshift; values outside the range go to the first or last bin."""
    edges = np.asarray(bin_edges, dtype=np.float64)
    idx = np.searchsorted(edges, np.asarray(z, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def pdf_point_estimates(pdf, bin_edges) -> dict[str, np.ndarray]:
    """Mean, median and mode of binned PDFs, each (N,).

    ``pdf`` (N, K): probability of each bin (rows sum to 1). Mean: Σ p_k × centre_k. Median: where the
    CDF, linear inside each bin, reaches 1/2. Mode: centre of the most probable bin.
    """
    pdf = np.asarray(pdf, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    mean = pdf @ centres
    cdf = np.cumsum(pdf, axis=1)
    k = np.minimum((cdf < 0.5).sum(axis=1), pdf.shape[1] - 1)  # first bin whose CDF reaches 1/2
    rows = np.arange(len(pdf))
    below = cdf[rows, k] - pdf[rows, k]  # CDF at the bin's lower edge
    frac = np.where(pdf[rows, k] > 0, (0.5 - below) / np.where(pdf[rows, k] > 0, pdf[rows, k], 1.0), 0.5)
    median = edges[k] + np.clip(frac, 0.0, 1.0) * (edges[k + 1] - edges[k])
    mode = centres[np.argmax(pdf, axis=1)]
    return {"mean": mean, "median": median, "mode": mode}


def crps_binned(pdf, z_spec, bin_edges) -> np.ndarray:
    """(N,) CRPS of each binned PDF against its spectroscopic redshift (same units as z).

    The PDF is uniform inside each bin, so the CDF is linear there and ∫ (F − H)² over a bin has the
    closed form w (a² + ab + b²) / 3 for g = F − H going linearly from a to b over width w; the bin
    holding z_spec is split at z_spec.
    """
    pdf = np.asarray(pdf, dtype=np.float64)
    zs = np.asarray(z_spec, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    n, k = pdf.shape
    cdf = np.concatenate([np.zeros((n, 1)), np.cumsum(pdf, axis=1)], axis=1)  # (N, K + 1) at the edges
    lo, hi = edges[:-1], edges[1:]  # (K,)
    width = hi - lo
    f_lo, f_hi = cdf[:, :-1], cdf[:, 1:]  # (N, K)

    def integral(a, b, w):
        return w * (a * a + a * b + b * b) / 3.0

    zcol = zs[:, None]
    below = hi[None, :] <= zcol  # whole bin below z_spec: H = 0
    above = lo[None, :] >= zcol  # whole bin above: H = 1
    total = np.where(below, integral(f_lo, f_hi, width), 0.0)
    total += np.where(above & ~below, integral(f_lo - 1.0, f_hi - 1.0, width), 0.0)
    inside = ~below & ~above  # the bin holding z_spec: split it there
    t = np.clip((zcol - lo[None, :]) / width[None, :], 0.0, 1.0)
    f_mid = f_lo + t * (f_hi - f_lo)
    split = integral(f_lo, f_mid, t * width) + integral(f_mid - 1.0, f_hi - 1.0, (1.0 - t) * width)
    total += np.where(inside, split, 0.0)
    total = total.sum(axis=1)
    # Outside the binned range F is 0 below and 1 above; H steps at z_spec.
    total += np.clip(edges[0] - zs, 0.0, None) + np.clip(zs - edges[-1], 0.0, None)
    return total


def bin_accuracy(pdf, z_spec, bin_edges) -> float:
    """Fraction of objects whose most probable bin is the bin of z_spec (``pdf`` (N, K))."""
    pdf = np.asarray(pdf)
    return float(np.mean(np.argmax(pdf, axis=1) == redshift_to_bin(z_spec, bin_edges)))


# ---------------------------------------------------------------------------
# Photo-z point metrics.
# ---------------------------------------------------------------------------


def delta_z(z_phot, z_spec) -> np.ndarray:
    """(N,) Δz = (z_phot − z_spec) / (1 + z_spec)."""
    z_phot = np.asarray(z_phot, dtype=np.float64)
    z_spec = np.asarray(z_spec, dtype=np.float64)
    return (z_phot - z_spec) / (1.0 + z_spec)


def sigma_mad(dz) -> float:
    """1.4826 × median |Δz − median Δz|."""
    dz = np.asarray(dz, dtype=np.float64)
    return float(MAD_TO_SIGMA * np.median(np.abs(dz - np.median(dz))))


def photoz_metrics(z_phot, z_spec, pdf=None, bin_edges=None, outlier_threshold: float = OUTLIER_THRESHOLD) -> dict:
    """σ_MAD, bias, η and N of point estimates; with ``pdf`` (N, K) and ``bin_edges`` also bin accuracy and CRPS."""
    z_phot = np.asarray(z_phot, dtype=np.float64)
    z_spec = np.asarray(z_spec, dtype=np.float64)
    if z_phot.shape != z_spec.shape or z_phot.ndim != 1:
        raise ValueError(f"z_phot and z_spec must be equal 1-d arrays, got {z_phot.shape} and {z_spec.shape}")
    if len(z_spec) == 0:
        raise ValueError("no objects to score")
    dz = delta_z(z_phot, z_spec)
    out = {"sigma_mad": sigma_mad(dz), "bias": float(np.mean(dz)),
           "eta": float(np.mean(np.abs(dz) > outlier_threshold)), "n": int(len(dz))}
    if pdf is not None:
        if bin_edges is None:
            raise ValueError("bin accuracy and CRPS need the bin edges")
        out["bin_accuracy"] = bin_accuracy(pdf, z_spec, bin_edges)
        out["crps"] = float(np.mean(crps_binned(pdf, z_spec, bin_edges)))
    return out


# ---------------------------------------------------------------------------
# Classification.
# ---------------------------------------------------------------------------


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(K, K) int counts: row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    for name, y in (("true", y_true), ("predicted", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} classes must be in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(y_true, y_pred, n_classes: int, class_names=None) -> dict:
    """Accuracy, macro-F1, per-class recall / precision / F1 and the confusion matrix.

    ``y_true``, ``y_pred`` (N,) ints in [0, K). ``recall`` maps class name -> recall (``None`` where the
    class has no true members); macro-F1 averages over the classes present in truth or predictions.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    names = list(class_names) if class_names is not None else [str(k) for k in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true members per class
    predicted = cm.sum(axis=0).astype(np.float64)
    recall = np.divide(tp, support, out=np.full(n_classes, np.nan), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)
    denom = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    present = denom > 0
    total = cm.sum()

    def clean(values):
        return {name: (None if not np.isfinite(v) else float(v)) for name, v in zip(names, values)}

    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "recall": clean(recall),
        "precision": clean(np.where(predicted > 0, precision, np.nan)),
        "f1": clean(np.where(present, f1, np.nan)),
        "support": {name: int(s) for name, s in zip(names, support)},
        "confusion_matrix": cm.tolist(),
        "n": int(total),
    }
