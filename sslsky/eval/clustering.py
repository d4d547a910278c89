"""Clustering of frozen features against the classes (the metrics Wei et al. 2022 report), protocol ``cluster``.

    clusters = kmeans_clusters(features, k=7, seed=0)          # (N,) cluster index of each galaxy
    scores = cluster_metrics(true_classes, clusters)           # {"nmi", "ari", "cluster_accuracy", ...}

k-means (scikit-learn ``KMeans``: k-means++ starts, ``n_init`` restarts, the lowest inertia kept) runs on the
L2-normalised features of the test galaxies, the geometry of the kNN protocol and of similarity search. No
label is used to form the clusters; the classes only score them:

- NMI: mutual information of clusters and classes over the arithmetic mean of their entropies
  (``normalized_mutual_info_score``); 1 for identical partitions, ~0 for independent ones.
- ARI: the Rand index corrected for chance (``adjusted_rand_score``); 1 identical, ~0 random, can be < 0.
- cluster accuracy: the fraction of galaxies in the class that the best one-to-one map of clusters to
  classes (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) gives their cluster.

Wei et al. cluster their test images and score kNN among test images with test labels; sslsky keeps its kNN
train -> test and adds these scores, which need no labels to form the partition.
"""

from __future__ import annotations

import numpy as np


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> tuple[np.ndarray, float]:
    """``(clusters (N,), inertia)`` of k-means with ``k`` clusters on the L2-normalised rows of ``features`` (N, D)."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} rows of (N, D) features; got {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return model.labels_.astype(np.int64), float(model.inertia_)


def cluster_metrics(true: np.ndarray, clusters: np.ndarray) -> dict:
    """NMI, ARI and the Hungarian-matched accuracy of ``clusters`` (N,) against the classes ``true`` (N,)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true, clusters = np.asarray(true, dtype=np.int64), np.asarray(clusters, dtype=np.int64)
    if true.shape != clusters.shape or true.ndim != 1 or len(true) == 0:
        raise ValueError(f"true and clusters must be the same non-empty (N,); got {true.shape}, {clusters.shape}")
    classes, class_index = np.unique(true, return_inverse=True)
    found, cluster_index = np.unique(clusters, return_inverse=True)
    table = np.zeros((len(found), len(classes)), dtype=np.int64)  # clusters x classes
    np.add.at(table, (cluster_index, class_index), 1)
    rows, cols = linear_sum_assignment(-table)
    return {"nmi": float(normalized_mutual_info_score(true, clusters)),
            "ari": float(adjusted_rand_score(true, clusters)),
            "cluster_accuracy": float(table[rows, cols].sum() / len(true)),
            "n_clusters": int(len(found)), "n_classes_present": int(len(classes))}
