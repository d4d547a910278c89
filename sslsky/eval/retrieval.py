"""Retrieval quality of an embeddings file against the catalog labels (``sslsky search --evaluate``).

With every labelled galaxy as a query (itself excluded): the fraction of its nearest neighbours that share its
morphology class and the median |dz|/(1 + z) to them (:func:`retrieval_metrics`), next to the same figures for
random neighbours and the chance class agreement of the class counts (:func:`chance_class_agreement`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sslsky.data.ids import id_text
from sslsky.eval.embeddings import Embeddings, EmbeddingsError, morph_class_name
from sslsky.eval.neighbours import as_unit, topk_cosine, usable_rows

_QUERY_BLOCK_BYTES = 256 << 20  # query vectors held per pass over the database in the evaluation


def retrieval_metrics(query_rows: np.ndarray, neighbour_rows: np.ndarray, morph_class: np.ndarray,
                      z: np.ndarray) -> dict:
    """Agreement of neighbours with their query.

    Args:
        query_rows: ``(Q,)``; neighbour_rows: ``(Q, k)``; morph_class, z: ``(N,)`` (-1 / NaN unknown).
    Returns:
        ``class_agreement``: over (query, neighbour) pairs both with a class, the fraction of equal
        classes; ``median_dz``: over pairs both with a redshift, the median of |z_n - z_q| / (1 + z_q);
        ``class_pairs``, ``z_pairs``: the pair counts.
    """
    query_rows, neighbour_rows = np.asarray(query_rows), np.asarray(neighbour_rows)
    cq, cn = morph_class[query_rows][:, None], morph_class[neighbour_rows]  # (Q, 1), (Q, k)
    labelled = (cq >= 0) & (cn >= 0)
    zq, zn = z[query_rows][:, None].astype(np.float64), z[neighbour_rows].astype(np.float64)
    with_z = np.isfinite(zq) & np.isfinite(zn)
    dz = (np.abs(zn - zq) / (1.0 + zq))[with_z]
    return {"class_agreement": float((cq == cn)[labelled].mean()) if labelled.any() else math.nan,
            "median_dz": float(np.median(dz)) if dz.size else math.nan,
            "class_pairs": int(labelled.sum()), "z_pairs": int(with_z.sum())}


def chance_class_agreement(morph_class: np.ndarray) -> float:
    """Expected class agreement of a random labelled pair of distinct galaxies: sum_c n_c (n_c - 1) / (L (L - 1))."""
    counts = np.bincount(morph_class[morph_class >= 0]).astype(np.float64)
    total = counts.sum()
    return float((counts * (counts - 1)).sum() / (total * (total - 1))) if total > 1 else math.nan


def evaluate_retrieval(emb: Embeddings, k: int = 10, chunk_size: int = 65536, query_batch: int = 256,
                       max_queries: int = 0, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                       skipped: set[int] | None = None) -> dict:
    """Retrieval quality with every labelled galaxy (class or redshift) as a query, itself excluded.

    The neighbours come from the exact chunked search; the chance baseline gives each query ``k``
    rows drawn uniformly from the other N - 1 (with replacement). ``max_queries`` > 0 uses a seeded
    random sample of the labelled queries. Rows with NaN/inf embeddings are neither queries, neighbours
    nor random neighbours (nor in the chance figure); they are added to ``skipped`` and counted in the
    result (``skipped_rows``, ``skipped_object_ids``: the first 20).
    """
    morph_class, z = emb.columns["morph_class"], emb.columns["z"]
    queries = np.flatnonzero((morph_class >= 0) | np.isfinite(z))
    if queries.size == 0:
        raise EmbeddingsError(f"{emb.path}: no row has a morph_class or a redshift to evaluate against")
    rng = np.random.default_rng(seed)
    if 0 < max_queries < queries.size:
        queries = np.sort(rng.choice(queries, max_queries, replace=False))
    neighbours = np.empty((queries.size, k), dtype=np.int64)
    similarity = np.empty((queries.size, k), dtype=np.float32)
    valid = np.ones(queries.size, dtype=bool)  # False: the query's own embedding is not finite
    skipped = set() if skipped is None else skipped
    block = max(query_batch, _QUERY_BLOCK_BYTES // (4 * emb.feature_dim))  # queries per pass over the database
    starts = range(0, queries.size, block)
    if progress:
        from sslsky.progress import track

        starts = track(starts, "evaluate", "pass")
    for start in starts:
        q = queries[start:start + block]  # increasing rows
        contiguous = q[-1] - q[0] + 1 == q.size
        vectors = np.asarray(emb.vectors[q[0]:q[-1] + 1] if contiguous else emb.vectors[q])  # (q, F)
        ok = usable_rows(as_unit(vectors, emb.normalized), True)
        valid[start:start + q.size] = ok
        skipped.update(q[~ok].tolist())
        if not ok.any():
            continue
        at = start + np.flatnonzero(ok)
        try:
            similarity[at], neighbours[at] = topk_cosine(vectors[ok], emb.vectors, k, chunk_size, exclude=q[ok],
                                                         query_batch=query_batch, device=device, skipped=skipped,
                                                         unit_norm=emb.normalized, cosine=not emb.normalized)
        except EmbeddingsError as err:
            raise EmbeddingsError(f"{emb.path}: {err}") from None
    queries, neighbours, similarity = queries[valid], neighbours[valid], similarity[valid]
    if queries.size == 0:
        raise EmbeddingsError(f"{emb.path}: no labelled row has a finite embedding to evaluate with")
    finite = np.setdiff1d(np.arange(len(emb)), np.fromiter(skipped, np.int64, len(skipped)))  # (M,) increasing
    random_rows = rng.integers(0, finite.size - 1, size=(queries.size, k))
    random_rows += random_rows >= np.searchsorted(finite, queries)[:, None]  # skip the query itself
    random_rows = finite[random_rows]
    found = retrieval_metrics(queries, neighbours, morph_class, z)
    per_class = {}
    for c in np.unique(morph_class[queries]):
        if c >= 0:
            sel = morph_class[queries] == c
            name = morph_class_name(int(c), emb.attrs)
            per_class[name] = retrieval_metrics(queries[sel], neighbours[sel], morph_class, z)["class_agreement"]
    skipped_rows = np.sort(np.fromiter(skipped, np.int64, len(skipped)))
    return {"k": k, "queries": int(queries.size), "rows": len(emb), "neighbours": found,
            "random": retrieval_metrics(queries, random_rows, morph_class, z),
            "chance_class_agreement": chance_class_agreement(morph_class[finite]),
            "class_agreement_per_class": per_class, "mean_similarity": float(similarity.mean()),
            "skipped_rows": int(skipped_rows.size),
            "skipped_object_ids": [id_text(i) for i in emb.columns["object_id"][skipped_rows[:20]]]}
