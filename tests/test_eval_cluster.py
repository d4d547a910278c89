"""Protocol ``cluster`` (issue 12, item 4): k-means of frozen features scored by NMI, ARI and the Hungarian
cluster accuracy, checked against plain NumPy formulas, against partitions whose answer is known, and end to end
through ``sslsky eval-morph`` and the sweep grid."""

from __future__ import annotations

import itertools
import json
import math

import h5py
import numpy as np
import pytest
from conftest import REPO

from sslsky.cli import main
from sslsky.config import SweepConfig, load_config
from sslsky.eval.clustering import cluster_metrics, kmeans_clusters
from sslsky.eval.sweep import cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_nmi_ari(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """NMI (arithmetic mean of the entropies) and ARI from the contingency table, written out."""
    n = len(true)
    table = np.array([[np.sum((true == a) & (pred == b)) for b in np.unique(pred)] for a in np.unique(true)], float)
    p = table / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz]))
    h = lambda q: -np.sum(q[q > 0] * np.log(q[q > 0]))  # noqa: E731
    denominator = (h(pa) + h(pb)) / 2
    nmi = 1.0 if denominator == 0 else mi / denominator
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index = comb(table).sum()
    expected = comb(table.sum(1)).sum() * comb(table.sum(0)).sum() / comb(n)
    maximum = (comb(table.sum(1)).sum() + comb(table.sum(0)).sum()) / 2
    return float(nmi), float((index - expected) / (maximum - expected))


def brute_force_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """The best one-to-one map of clusters to classes, by trying every assignment (small k only)."""
    classes, clusters = np.unique(true), np.unique(pred)
    best = 0
    for perm in itertools.permutations(classes, len(clusters)) if len(clusters) <= len(classes) else []:
        best = max(best, sum(np.sum((pred == c) & (true == t)) for c, t in zip(clusters, perm)))
    return best / len(true)


def test_scores_equal_the_numpy_formulas_and_known_answers():
    rng = np.random.default_rng(3)
    for n, k_true, k_pred in [(50, 3, 3), (200, 5, 4), (120, 4, 4), (31, 2, 3)]:
        true = rng.integers(0, k_true, n)
        pred = np.where(rng.random(n) < 0.6, true % k_pred, rng.integers(0, k_pred, n))
        got = cluster_metrics(true, pred)
        nmi, ari = numpy_nmi_ari(true, pred)
        assert got["nmi"] == pytest.approx(nmi, abs=1e-12) and got["ari"] == pytest.approx(ari, abs=1e-12)
        if k_pred <= k_true:
            assert got["cluster_accuracy"] == pytest.approx(brute_force_accuracy(true, pred))
    true = np.repeat(np.arange(4), 8)
    renamed = (true + 1) % 4  # the same partition under other names
    assert cluster_metrics(true, renamed) == {"nmi": 1.0, "ari": 1.0, "cluster_accuracy": 1.0, "n_clusters": 4,
                                              "n_classes_present": 4}
    independent = np.tile(np.arange(4), 8)  # every cluster holds every class equally (2 each)
    scores = cluster_metrics(true, independent)
    assert scores["nmi"] == pytest.approx(0.0, abs=1e-12) and scores["ari"] < 0 and scores["cluster_accuracy"] == 0.25
    with pytest.raises(ValueError):
        cluster_metrics(true, independent[:-1])


def test_kmeans_finds_separated_classes_whatever_the_feature_norm():
    rng = np.random.default_rng(0)
    centres = np.eye(5)[:, :5] * 4
    labels = np.repeat(np.arange(5), 40)
    features = (centres[labels] + rng.normal(0, 0.3, (200, 5))) * rng.uniform(0.1, 50, (200, 1))  # cosine geometry
    clusters, inertia = kmeans_clusters(features, 5, seed=1)
    assert cluster_metrics(labels, clusters)["ari"] == 1.0 and inertia > 0
    again, _ = kmeans_clusters(features, 5, seed=1)
    np.testing.assert_array_equal(clusters, again)
    with pytest.raises(ValueError, match="at least 5 rows"):
        kmeans_clusters(features[:3], 5)


def test_eval_morph_cluster_writes_its_scores(packed_mock, encoder_path, tmp_path, capsys):
    out = tmp_path / "cluster"
    args = ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={packed_mock}",
            f"out={out}", f"ckpt={encoder_path}", "protocol=cluster", "cluster.k=3", "data.num_workers=0",
            "device=cpu", "progress=false"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    with h5py.File(out / "predictions.h5", "r") as handle:
        true, clusters = handle["true_class"][()], handle["cluster"][()]
    nmi, ari = numpy_nmi_ari(true, clusters)
    assert m["protocol"] == "cluster" and m["n_train_labels"] == 0 and m["n_test"] == len(true)
    assert m["nmi"] == pytest.approx(nmi) and m["ari"] == pytest.approx(ari) and m["cluster"]["k"] == 3
    assert set(np.unique(clusters)) <= {0, 1, 2} and math.isfinite(m["cluster"]["inertia"])
    assert set(m["random_partition_baseline"]) == {"nmi", "ari", "cluster_accuracy"}
    assert "accuracy" not in m  # no classifier: the sweep's accuracy curve leaves the protocol out
    assert m["warnings"] and "fewer than 20" in m["warnings"][0]  # the 128-galaxy mock has a tiny test split
    assert "NMI" in capsys.readouterr().out
    assert main(args) == 0  # done for this config: not run again
    assert "exists for this config" in capsys.readouterr().out
    assert main([*args[:-2], "cluster.k=1000", "progress=false", f"out={tmp_path / 'big'}"]) == 2
    assert "needs at least 1000 labelled test galaxies" in capsys.readouterr().err
    assert main([*args, "target=votes", f"out={tmp_path / 'votes'}"]) == 2


def test_sweep_runs_cluster_once_per_seed_for_morph_only():
    cfg = load_config(SweepConfig, None, ["tasks=[specz, morph]", "protocols=[linear, cluster]",
                                          "label_fractions=[0.1, 1.0]", "seeds=[0, 1]"])
    grid = [(c.task, c.protocol, c.label_fraction, c.seed) for c in cells(cfg)]
    assert [g for g in grid if g[1] == "cluster"] == [("morph", "cluster", 1.0, 0), ("morph", "cluster", 1.0, 1)]
    assert sum(g[1] == "linear" for g in grid) == 8
