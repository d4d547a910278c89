"""Retrieval quality of an embeddings file against the catalog labels (``sslsky search --evaluate``).

With every labelled galaxy as a query (itself excluded): the fraction of its nearest neighbours that share its
morphology class and the median |dz|/(1 + z) to them (:func:`retrieval_metrics`), next to the same figures for
random neighbours and the chance class agreement of the class counts (:func:`chance_class_agreement`).

Ranked retrieval with the morphology class as relevance (:func:`ranked_precision`): precision@k and mAP@k of
image -> image (every galaxy with a class as query, itself excluded) and, for a file of ``space=aligned``,
text -> image and symbol -> image (one query per class: its caption / symbol prototype;
:func:`prototype_retrieval`). A neighbour without a class is not relevant.
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


def ranked_precision(relevant: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(precision@k (Q,), AP@k (Q,))`` of ranked result lists.

    Args:
        relevant: ``(Q, k)`` bool, whether the i-th result of each query is relevant (rank order).
        n_relevant: ``(Q,)`` relevant items of each query in the whole database (the query itself not counted).
    Returns:
        precision@k = relevant results / k. AP@k = sum over the relevant ranks i <= k of precision@i, divided by
        ``min(k, n_relevant)`` (the most relevant results the k places can hold, so a perfect ranking scores 1
        whether or not the class has k members; the normalisation of e.g. ``ml_metrics.apk``); NaN for a query
        with no relevant item in the database (mAP leaves such queries out).
    """
    relevant = np.asarray(relevant, dtype=bool)
    k = relevant.shape[1]
    hits = np.cumsum(relevant, axis=1)  # (Q, k) relevant results in the first i
    at_rank = hits / np.arange(1, k + 1)  # (Q, k) precision@i
    total = (at_rank * relevant).sum(axis=1)
    norm = np.minimum(k, np.asarray(n_relevant, dtype=np.int64))
    ap = np.divide(total, norm, out=np.full(len(relevant), np.nan), where=norm > 0)
    return hits[:, -1] / k if k else np.zeros(len(relevant)), ap


def ranked_summary(relevant: np.ndarray, n_relevant: np.ndarray) -> dict:
    """``precision_at_k`` and ``map_at_k`` (means over the queries; mAP over those with a relevant item),
    ``queries``, ``queries_without_relevant``."""
    precision, ap = ranked_precision(relevant, n_relevant)
    scored = np.isfinite(ap)
    return {"precision_at_k": float(precision.mean()) if precision.size else math.nan,
            "map_at_k": float(ap[scored].mean()) if scored.any() else math.nan,
            "queries": int(len(precision)), "queries_without_relevant": int((~scored).sum())}


def prototype_retrieval(emb: Embeddings, prototypes: np.ndarray, names: list[str], k: int, chunk_size: int = 65536,
                        device: str | torch.device = "cpu", skipped: set[int] | None = None) -> dict:
    """Class prototypes as queries (text -> image, symbol -> image): precision@k and mAP@k with relevance = the
    galaxy's class is the prototype's.

    Args:
        prototypes: ``(K, D)`` unit vectors in the file's (aligned) space, one per class ``names[j]``.
        names: the prototypes' class names, matched by name to the file's classes (``morph_class`` names).
    Returns:
        :func:`ranked_summary` over the prototypes of classes the file has, ``per_class`` (name -> AP@k,
        precision@k, relevant rows), ``classes_not_in_data`` (prototypes with no such class in the file: no query)
        and ``data_classes_without_prototype`` (their rows are relevant to no query).
    """
    morph_class = emb.columns["morph_class"]
    present = np.unique(morph_class[morph_class >= 0])
    data_names = {morph_class_name(int(c), emb.attrs): int(c) for c in present}
    wanted = [j for j, name in enumerate(names) if name in data_names]
    skipped = set() if skipped is None else skipped
    if not wanted:
        return {**ranked_summary(np.zeros((0, k), bool), np.zeros(0, np.int64)), "per_class": {},
                "classes_not_in_data": list(names), "data_classes_without_prototype": sorted(data_names)}
    query = np.asarray(prototypes, dtype=np.float32)[wanted]  # (Q, D)
    try:
        _, rows = topk_cosine(query, emb.vectors, k, chunk_size, device=device, skipped=skipped,
                              unit_norm=emb.normalized, cosine=not emb.normalized)
    except EmbeddingsError as err:
        raise EmbeddingsError(f"{emb.path}: {err}") from None
    classes = np.array([data_names[names[j]] for j in wanted])  # (Q,) the file's class of each prototype
    usable = np.ones(len(emb), dtype=bool)
    usable[np.fromiter(skipped, np.int64, len(skipped))] = False
    relevant = morph_class[rows] == classes[:, None]  # (Q, k)
    n_relevant = np.array([int(((morph_class == c) & usable).sum()) for c in classes])
    precision, ap = ranked_precision(relevant, n_relevant)
    per_class = {names[j]: {"ap_at_k": float(a), "precision_at_k": float(p), "relevant_rows": int(n)}
                 for j, a, p, n in zip(wanted, ap, precision, n_relevant)}
    return {**ranked_summary(relevant, n_relevant), "per_class": per_class,
            "classes_not_in_data": [n for n in names if n not in data_names],
            "data_classes_without_prototype": sorted(set(data_names) - set(names))}


def evaluate_retrieval(emb: Embeddings, k: int = 10, chunk_size: int = 65536, query_batch: int = 256,
                       max_queries: int = 0, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                       skipped: set[int] | None = None, prototypes: dict[str, np.ndarray] | None = None,
                       prototype_names: list[str] | None = None) -> dict:
    """Retrieval quality with every labelled galaxy (class or redshift) as a query, itself excluded.

    The neighbours come from the exact chunked search; the chance baseline gives each query ``k``
    rows drawn uniformly from the other N - 1 (with replacement). ``max_queries`` > 0 uses a seeded
    random sample of the labelled queries. Rows with NaN/inf embeddings are neither queries, neighbours
    nor random neighbours (nor in the chance figure); they are added to ``skipped`` and counted in the
    result (``skipped_rows``, ``skipped_object_ids``: the first 20).

    ``image_to_image``: :func:`ranked_summary` of the queries with a class (relevance: the neighbour has the
    query's class; relevant items: the other usable rows of that class). With ``prototypes`` (kind -> ``(K, D)``,
    e.g. ``{"text": ..., "symbol": ...}`` of an align run, classes ``prototype_names``): ``<kind>_to_image``,
    :func:`prototype_retrieval`.
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
    with_class = morph_class[queries] >= 0
    usable = np.ones(len(emb), dtype=bool)
    usable[np.fromiter(skipped, np.int64, len(skipped))] = False
    counts = np.bincount(morph_class[usable & (morph_class >= 0)], minlength=int(morph_class.max()) + 1)
    cq = morph_class[queries[with_class]]
    image_to_image = ranked_summary(morph_class[neighbours[with_class]] == cq[:, None], counts[cq] - 1)
    ranked = {"image_to_image": image_to_image}
    for kind, vectors in (prototypes or {}).items():
        ranked[f"{kind}_to_image"] = prototype_retrieval(emb, vectors, list(prototype_names or []), k, chunk_size,
                                                         device, skipped)
    skipped_rows = np.sort(np.fromiter(skipped, np.int64, len(skipped)))
    return {"k": k, **ranked, "queries": int(queries.size), "rows": len(emb), "neighbours": found,
            "random": retrieval_metrics(queries, random_rows, morph_class, z),
            "chance_class_agreement": chance_class_agreement(morph_class[finite]),
            "class_agreement_per_class": per_class, "mean_similarity": float(similarity.mean()),
            "skipped_rows": int(skipped_rows.size),
            "skipped_object_ids": [id_text(i) for i in emb.columns["object_id"][skipped_rows[:20]]]}
