"""Nearest neighbours by cosine similarity in an embeddings database, exact or approximate.

:func:`topk_cosine` reads the database in chunks of ``chunk_size`` rows and merges a running top-k per query:
memory is bounded by ``chunk_size x (F + queries)`` floats whatever N is (10M x 512 streams from the HDF5 file),
never N x N. Ties are broken towards the lower row, so results do not depend on the chunk size. Rows whose
embeddings hold NaN/inf, or that are not unit vectors although the file says they are (a zero row, a file from an
older version, or edited; :data:`UNIT_NORM_TOLERANCE`), are never neighbours: they are found in the same pass
(:func:`usable_rows`) and skipped; such a row as the query is an error. :func:`topk_faiss` is an approximate
FAISS HNSW index where the ``faiss`` package is installed (it is not a dependency).

    emb = Embeddings("emb.h5")
    scores, rows = topk_cosine(emb.vectors[emb.rows_of([oid])], emb.vectors, k=10, exclude=emb.rows_of([oid]))
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sslsky.eval.embeddings import EmbeddingsError


def _sorted_by_score(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (score descending, row ascending) of each line of ``(Q, M)`` candidates."""
    order = torch.argsort(rows, dim=1)  # rows are unique per line
    scores, rows = scores.gather(1, order), rows.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, c)`` scores of one chunk -> the ``min(k, c)`` best per line, ties at the cut to the lower column.

    ``torch.topk`` is fast but leaves open which of several equal scores at the k-th place it keeps;
    the (rare) lines where that matters are redone with a stable sort.
    """
    kk = min(k, scores.shape[1])
    values, cols = torch.topk(scores, kk, dim=1)
    kth = values[:, -1:]
    ambiguous = (scores == kth).sum(1) > (values == kth).sum(1)  # equal scores left outside the cut
    if bool(ambiguous.any()):
        lines = ambiguous.nonzero().squeeze(1)
        order = torch.sort(scores[lines], dim=1, descending=True, stable=True)
        values[lines], cols[lines] = order.values[:, :kk], order.indices[:, :kk]
    return values, cols


#: The rows of an embeddings file are L2-normalised (attribute ``normalized``); a row whose norm is further from 1
#: than this (a zero row, an edited file) is skipped like a non-finite one, since its inner products are no cosines.
UNIT_NORM_TOLERANCE = 1e-2


def as_unit(vectors: np.ndarray, normalized: bool) -> np.ndarray:
    """``vectors`` (N, F) as stored when the file says they are normalised, else divided by their norms (a zero
    row stays zero, so that it is not usable)."""
    if normalized:
        return vectors
    vectors = np.asarray(vectors, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.where(norms > 0, vectors / np.where(norms > 0, norms, 1), 0.0)


def usable_rows(vectors, unit_norm: bool = False):
    """(N,) bool of the rows of ``vectors`` (N, F), NumPy or torch, that can be searched: finite, and with
    ``unit_norm`` of norm 1 within :data:`UNIT_NORM_TOLERANCE`."""
    if isinstance(vectors, torch.Tensor):
        ok = torch.isfinite(vectors).all(1)
        return ok & ((vectors.norm(dim=1) - 1).abs() <= UNIT_NORM_TOLERANCE) if unit_norm else ok
    vectors = np.asarray(vectors)
    ok = np.isfinite(vectors).all(1)
    if unit_norm:
        with np.errstate(invalid="ignore", over="ignore"):
            ok &= np.abs(np.linalg.norm(vectors.astype(np.float64), axis=1) - 1) <= UNIT_NORM_TOLERANCE
    return ok


@torch.no_grad()
def topk_cosine(queries, database, k: int, chunk_size: int = 65536, exclude=None, query_batch: int = 1024,
                device: str | torch.device = "cpu", progress: bool = False,
                skipped: set[int] | None = None, unit_norm: bool = False,
                cosine: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` against ``database``, chunk by chunk.

    For L2-normalised vectors the inner product is the cosine similarity. The database is read once,
    whatever the number of queries; each chunk is scored against ``query_batch`` queries at a time.
    Memory: ``chunk_size x F`` database floats, ``query_batch x chunk_size`` scores, ``Q x k`` results.
    Database rows with a NaN or inf (and with ``unit_norm``, rows that are not unit vectors: :func:`usable_rows`)
    are never neighbours (found in the same pass, at no extra read).

    Args:
        queries: ``(Q, F)`` array, finite (a non-finite query is a ValueError).
        database: ``(N, F)`` anything sliceable by rows (NumPy array, ``h5py`` dataset).
        exclude: optional ``(Q,)`` database row to leave out for each query (the query itself).
        skipped: optional set to which the database rows skipped as unusable are added.
        unit_norm: the rows are meant to be L2-normalised (an embeddings file): others are skipped, and such a
            query is a ValueError.
        cosine: L2-normalise queries and rows here (a file that does not say its rows are normalised), so the
            scores are cosines whatever the norms; zero rows are skipped.
    Returns:
        ``(scores, rows)``, each ``(Q, k)``: float32 similarities in descending order and the int64
        database rows; equal scores are ordered by row, whatever the chunk size. An
        :class:`EmbeddingsError` when fewer than ``k`` finite rows are left for a query.
    """
    queries = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    n, n_query = int(database.shape[0]), queries.shape[0]
    if chunk_size < 1 or query_batch < 1:
        raise ValueError(f"chunk_size={chunk_size} and query_batch={query_batch} must be >= 1")
    if cosine:
        queries = torch.nn.functional.normalize(queries, dim=1)
    finite_queries = usable_rows(queries, unit_norm or cosine)
    if not bool(finite_queries.all()):
        raise ValueError(f"queries {(~finite_queries).nonzero().squeeze(1)[:5].tolist()} hold NaN or inf"
                         + (" or are not unit vectors" if unit_norm else ""))
    available = n - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be in [1, {available}] for a database of {n} rows"
                         + (" (the query itself excluded)" if exclude is not None else ""))
    if database.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features, the database {database.shape[1]}")
    excluded = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=device)
    batches = [slice(q, q + query_batch) for q in range(0, n_query, query_batch)]
    best = [(torch.empty(len(range(n_query)[b]), 0, device=device),
             torch.empty(len(range(n_query)[b]), 0, dtype=torch.int64, device=device)) for b in batches]
    starts = range(0, n, chunk_size)
    if progress:
        from sslsky.progress import track

        starts = track(starts, "search", "chunk")
    n_skipped = 0
    for start in starts:
        block = torch.from_numpy(np.asarray(database[start:start + chunk_size], dtype=np.float32)).to(device)  # (c, F)
        if cosine:
            block = torch.nn.functional.normalize(block, dim=1)  # a zero row stays zero: skipped below
        bad = (~usable_rows(block, unit_norm or cosine)).nonzero().squeeze(1)  # (b,) unusable rows of the chunk
        if bad.numel():
            n_skipped += bad.numel()
            if skipped is not None:
                skipped.update((bad + start).tolist())
        for b, batch in enumerate(batches):
            scores = queries[batch] @ block.T  # (q, c)
            if bad.numel():
                scores[:, bad] = -math.inf  # never a neighbour, like an excluded row
            if excluded is not None:
                local = excluded[batch] - start
                hit = ((local >= 0) & (local < block.shape[0])).nonzero().squeeze(1)
                scores[hit, local[hit]] = -math.inf
            values, cols = _chunk_topk(scores, k)
            best[b] = _sorted_by_score(torch.cat([best[b][0], values], 1), torch.cat([best[b][1], cols + start], 1), k)
    if not best:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    scores, rows = torch.cat([s for s, _ in best]).cpu().numpy(), torch.cat([r for _, r in best]).cpu().numpy()
    if n_skipped and np.isneginf(scores[:, -1]).any():  # a skipped (or the excluded) row made the cut
        raise EmbeddingsError(f"k={k} neighbours asked, but only {available - n_skipped} of the {n} rows are usable"
                              + (" besides the query" if exclude is not None else "")
                              + f" ({n_skipped} with NaN/inf{' or not of unit norm' if unit_norm else ''} skipped); "
                                f"ask for fewer")
    return scores, rows


def topk_faiss(queries, database, k: int, exclude=None, hnsw_m: int = 32, ef_search: int = 128,
               chunk_size: int = 65536, skipped: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` inner products with a FAISS HNSW index (needs the optional ``faiss`` package).

    The index is built in memory (N x F floats plus the graph); same outputs as :func:`topk_cosine`,
    but neighbours may be missed. Non-finite rows are left out of the index (and added to ``skipped``).
    """
    try:
        import faiss
    except ImportError:
        raise EmbeddingsError("index=faiss needs the optional faiss package (pip install faiss-cpu or "
                              "faiss-gpu); index=exact needs nothing") from None
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise ValueError("queries hold NaN or inf")
    index = faiss.IndexHNSWFlat(int(database.shape[1]), hnsw_m, faiss.METRIC_INNER_PRODUCT)
    kept = []  # (M,) database row of each vector in the index (the finite rows)
    for start in range(0, int(database.shape[0]), chunk_size):
        block = np.ascontiguousarray(database[start:start + chunk_size], dtype=np.float32)
        finite = np.isfinite(block).all(1)
        if skipped is not None:
            skipped.update((np.flatnonzero(~finite) + start).tolist())
        index.add(np.ascontiguousarray(block[finite]))
        kept.append(np.flatnonzero(finite) + start)
    kept = np.concatenate(kept) if kept else np.empty(0, np.int64)
    extra = 1 if exclude is not None else 0
    if not 1 <= k <= kept.size - extra:
        raise EmbeddingsError(f"k={k} neighbours asked, but only {kept.size - extra} of the {database.shape[0]} rows "
                              f"are finite{' besides the query' if extra else ''}; ask for fewer")
    index.hnsw.efSearch = max(ef_search, k + 1)
    scores, found = index.search(queries, k + extra)  # (Q, k + extra) positions in the index, -1: none found
    rows = np.where(found >= 0, kept[np.maximum(found, 0)], -1)
    if exclude is not None:
        keep = rows != np.asarray(exclude)[:, None]
        scores = np.stack([s[m][:k] for s, m in zip(scores, keep)])
        rows = np.stack([r[m][:k] for r, m in zip(rows, keep)])
    if (rows[:, :k] < 0).any():
        raise EmbeddingsError(f"the FAISS index found fewer than k={k} neighbours; raise faiss_ef_search or use "
                              f"index=exact")
    return scores[:, :k].astype(np.float32), rows[:, :k].astype(np.int64)
