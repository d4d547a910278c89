"""Similarity search on frozen encoder features: ``sslsky embed`` and ``sslsky search``.

``sslsky embed`` runs a pretrained encoder over packed shards (the deterministic eval view: centred
crop + the training normalisation) and writes one HDF5 file:

    embeddings   (N, F) float32, L2-normalised (cosine similarity = dot product)
    object_id    (N,) int64      z (N,)   ebv (N,)   morph_class (N,)
    index        (N,) int64      global row of each galaxy in the shards (ShardDataset.read_image)
    attrs        format, ckpt, arch, stem, feature_dim, data, survey, bands, split, ranks, ...

Under torchrun or srun each rank embeds a contiguous block of the rows into a part file; after all
ranks report, rank 0 concatenates the parts in rank order into the final file (written to a temporary
name, then renamed), so the result is the same file as one process gives. One process writes its part
and renames it. What must hold for the file:

- ``--out`` is checked (not a folder, its folder writable) before anything is computed, and the free
  space against the size of the embeddings once the encoder is loaded;
- one run at a time per ``--out``: rank 0 holds the lock ``.OUT.lock`` beside it (:mod:`sslsky.locks`), and a
  second run is refused naming the holder;
- nothing at ``--out`` until the whole file is written: an interrupted run leaves only dot-named part
  or temporary files (``.OUT.part-HOST-PID-*``, ``.OUT.tmp-HOST-PID``: each run's own names), which the next run
  to the same ``--out`` removes (holding the lock, and only those of runs that no longer go);
- a full disk removes the partial file and ends in :class:`~sslsky.errors.DiskFullError`;
- non-finite features (NaN/inf pixels, an overflowing encoder) are refused: no file, a
  :class:`~sslsky.errors.DataError` on every rank listing the object ids and the likely cause.

``sslsky search`` finds the k nearest neighbours by exact cosine similarity, reading the database in
chunks of ``chunk_size`` rows and merging a running top-k per query: memory is bounded by
``chunk_size x (F + queries)`` floats whatever N is (10M x 512 streams from the HDF5 file), never
N x N. Ties are broken towards the lower row, so results do not depend on the chunk size. Rows
whose embeddings hold NaN/inf, or that are not unit vectors although the file says they are (a zero row, a
file from an older version, or edited; :data:`UNIT_NORM_TOLERANCE`), are never neighbours: they are found in
the same pass, skipped, and named in a warning; such a row as the query is an error. An
approximate FAISS HNSW index is an option where the ``faiss`` package is installed (it is not a
dependency). ``evaluate_retrieval`` measures retrieval quality against the catalog labels: the
fraction of neighbours that share the query's morphology class and the median |dz|/(1 + z) to the
neighbours, next to the same figures for random neighbours.

    emb = Embeddings("emb.h5")
    scores, rows = topk_cosine(emb.vectors[emb.rows_of([oid])], emb.vectors, k=10, exclude=emb.rows_of([oid]))
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from sslsky import dist
from sslsky.augment import survey_of_images
from sslsky.config import ConfigError, EmbedConfig, SearchConfig, config_to_dict
from sslsky.data.ids import as_id_array, id_text, is_string_ids, match_query, read_ids, write_ids
from sslsky.data.rgb import SURVEY_RGB_BANDS, lupton_rgb
from sslsky.data.schema import RGB_BANDS
from sslsky.errors import DataError, DiskFullError, is_no_space
from sslsky.locks import OutputLock, lock_next_to, pid_alive
from sslsky.outputs import new_hdf5, output_file, write_text_atomic
from sslsky.vocabulary import class_names

EMBEDDINGS_FORMAT = "sslsky-embeddings-v1"
#: Per-row columns stored next to the embeddings (``index``: global row in the shards).
COLUMNS = ("object_id", "z", "ebv", "morph_class", "index")
#: Columns search needs (the neighbour table, the evaluation); ``ebv`` and ``index`` may be missing.
REQUIRED_COLUMNS = ("object_id", "z", "morph_class")
#: Pixels of one panel of the neighbour grid (width, height), at PANEL_DPI.
PANEL_DPI = 100
PANEL_INCHES = (1.8, 2.2)
_CHUNK_BYTES = 4 << 20  # target HDF5 chunk of the embeddings dataset
_QUERY_BLOCK_BYTES = 256 << 20  # query vectors held per pass over the database in the evaluation


class EmbeddingsError(ValueError):
    """A user-fixable problem with an embeddings file or a query; the message names the file or id."""


# ---------------------------------------------------------------------------
# Exact chunked top-k.
# ---------------------------------------------------------------------------


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


def _as_unit(vectors: np.ndarray, normalized: bool) -> np.ndarray:
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


# ---------------------------------------------------------------------------
# Embeddings file.
# ---------------------------------------------------------------------------


class Embeddings:
    """An embeddings file written by ``sslsky embed``, read-only.

    ``vectors`` is the ``(N, F)`` HDF5 dataset, or a NumPy array when it fits in ``cache_mb``;
    the per-row columns are in memory (``columns[name]``, ``(N,)``). A file without the datasets search
    needs (:data:`REQUIRED_COLUMNS`, a float ``(N, F)`` ``embeddings``) is an :class:`EmbeddingsError` naming
    what is missing; ``index`` may be missing (the images for ``--png`` are then found by object_id).
    Rows with NaN/inf are not looked for here: the search skips them as it reads them.
    """

    def __init__(self, path: str | os.PathLike, cache_mb: float = 2048.0):
        self.path = Path(path)
        remake = f"make it again with `sslsky embed --ckpt ENCODER --data SHARDS --out {self.path}`"
        if self.path.is_dir():
            raise EmbeddingsError(f"embeddings file {self.path} is a folder: give the file written by sslsky embed")
        if not self.path.is_file():
            raise EmbeddingsError(f"embeddings file {self.path} does not exist; make it with "
                                  f"`sslsky embed --ckpt ENCODER --data SHARDS --out {self.path}`")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise EmbeddingsError(f"embeddings file {self.path} is not readable HDF5 ({err}): damaged, cut short or "
                                  f"another kind of file; {remake}") from None
        try:
            self._check(remake)
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}
            self.columns = {name: read_ids(self.file[name]) if name == "object_id" else self.file[name][()]
                            for name in COLUMNS if name in self.file}
            dataset = self.file["embeddings"]
            fits = dataset.size * dataset.dtype.itemsize <= cache_mb * 2**20
            self.vectors = dataset[()] if fits else dataset  # (N, F)
            self.normalized = bool(self.attrs.get("normalized", False))  # rows meant to be unit vectors
        except OSError as err:
            self.file.close()
            raise EmbeddingsError(f"cannot read {self.path} ({err}): the file is damaged; {remake}") from None
        except EmbeddingsError:
            self.file.close()
            raise
        self._sorter: np.ndarray | None = None  # (N,) argsort of object_id, made on the first lookup

    def _check(self, remake: str) -> None:
        """The format attribute, a float (N, F) embeddings dataset and (N,) columns, else EmbeddingsError."""
        if self.file.attrs.get("format") != EMBEDDINGS_FORMAT or "embeddings" not in self.file:
            raise EmbeddingsError(f"{self.path} is not an sslsky embeddings file (format={EMBEDDINGS_FORMAT}); "
                                  f"make one with `sslsky embed`")
        dataset = self.file["embeddings"]
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 2 or dataset.dtype.kind != "f":
            shape = f"{dataset.shape} {dataset.dtype}" if isinstance(dataset, h5py.Dataset) else "a group"
            raise EmbeddingsError(f"{self.path}: 'embeddings' is {shape}, not (N, F) floats; {remake}")
        n = dataset.shape[0]
        missing = [name for name in REQUIRED_COLUMNS if name not in self.file]
        if missing:
            raise EmbeddingsError(f"{self.path} has no {', '.join(missing)} dataset(s) (written by another tool, "
                                  f"or edited); {remake}")
        for name in COLUMNS:
            if name in self.file and getattr(self.file[name], "shape", None) != (n,):
                shape = getattr(self.file[name], "shape", "a group")
                raise EmbeddingsError(f"{self.path}: {name!r} has shape {shape}, the embeddings {n} rows; {remake}")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_of(self, object_ids) -> np.ndarray:
        """``(Q,)`` rows of the given object ids (the first row of a repeated id); an unknown id is an error."""
        ids = self.columns["object_id"]
        if self._sorter is None:
            self._sorter = np.argsort(ids, kind="stable")
        try:
            wanted = as_id_array([match_query(q, ids) for q in np.asarray(object_ids, dtype=object).reshape(-1)])
        except ValueError as err:
            raise EmbeddingsError(f"{err} ({self.path})") from None
        pos = np.minimum(np.searchsorted(ids, wanted, sorter=self._sorter), len(ids) - 1)
        rows = self._sorter[pos]
        missing = wanted[ids[rows] != wanted]
        if missing.size:
            kind = "names such as " + repr(id_text(ids[0])) if is_string_ids(ids) else f"{ids.min()}..{ids.max()}"
            raise EmbeddingsError(f"object_id {', '.join(map(id_text, missing[:5].tolist()))} not in {self.path} "
                                  f"({len(ids)} rows, object_id {kind}); embed the shards that hold it, or check "
                                  f"the id")
        return rows.astype(np.int64)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layout(handle: h5py.File, n: int, dim: int, columns: dict[str, np.ndarray]) -> None:
    """The per-row columns of an embeddings (or part) file and its ``(n, dim)`` embeddings dataset, to fill."""
    rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (4 * dim)))
    handle.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                          chunks=(rows_per_chunk, dim) if n else None)
    for name, values in columns.items():
        if name == "object_id":
            write_ids(handle, name, values)
        else:
            handle.create_dataset(name, data=values)


def merge_parts(parts: list[Path], out: Path, attrs: dict, chunk_rows: int = 65536, tag: str = "") -> Path:
    """Concatenate part files in order into ``out`` (temporary name, then rename); the parts are removed.
    ``tag``: the run's (:func:`run_tag`), in the temporary name."""
    tmp = out.with_name(f".{out.name}.tmp-{tag}" if tag else f".{out.name}.tmp{os.getpid()}")
    handles = [h5py.File(p, "r") for p in parts]
    try:
        n = sum(h["embeddings"].shape[0] for h in handles)
        dim = handles[0]["embeddings"].shape[1]
        columns = {name: np.concatenate([read_ids(h[name]) if name == "object_id" else h[name][()]
                                         for h in handles]) for name in COLUMNS}
        with new_hdf5(tmp, out, "embeddings") as (dst, sink):
            _layout(dst, n, dim, columns)
            at = 0
            for h in handles:
                src = h["embeddings"]
                for start in range(0, src.shape[0], chunk_rows):
                    block = src[start:start + chunk_rows]
                    dst["embeddings"][at:at + len(block)] = block
                    at += len(block)
                    sink.check()
            dst.attrs.update(attrs)
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, out)
    for p in parts:
        p.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------
# sslsky embed
# ---------------------------------------------------------------------------


def rank_block(n: int, rank: int, world: int) -> range:
    """The contiguous rows ``[n r / W, n (r + 1) / W)`` of rank ``r`` of ``W``; the blocks tile ``range(n)``."""
    return range(n * rank // world, n * (rank + 1) // world)


def run_tag() -> str:
    """``HOST-PID`` of this process (rank 0): in the names of a run's temp files, unique to the run, and telling
    :func:`_remove_stale` whether their run still goes."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname())}-{os.getpid()}"


def part_path(out: Path, rank: int, world: int, tag: str = "") -> Path:
    """The part file of ``rank`` of the run tagged ``tag`` (:func:`run_tag`)."""
    run = f"{tag}-" if tag else ""
    return out.with_name(f".{out.name}.part-{run}{rank:05d}-of-{world:05d}.h5")


#: ``HOST-PID`` in a temp file name (:func:`part_path`, :func:`merge_parts`); older names have none.
_TAGGED = re.compile(r"\.(?:part-(.+)-(\d+)-\d{5}-of-\d{5}\.h5|tmp-(.+)-(\d+))$")


def _owner_running(path: Path) -> int | None:
    """The pid of the run that owns temp file ``path`` when it still runs on this host (else None)."""
    match = _TAGGED.search(path.name)
    if match is None:
        return None
    host, pid = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    here = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    if host == here and int(pid) != os.getpid() and pid_alive(int(pid)):
        return int(pid)
    return None


def stale_files(out: Path) -> list[Path]:
    """Part and temporary files that an interrupted ``sslsky embed --out out`` left next to ``out``."""
    name = glob.escape(out.name)
    return sorted({*out.parent.glob(f".{name}.part-*-of-*.h5"), *out.parent.glob(f".{name}.tmp*")})


def _remove_stale(out: Path) -> None:
    """Remove :func:`stale_files` of ``out`` (rank 0, holding the lock of ``out``, before any rank writes), saying
    how many; a file whose run still goes on this host (its ``HOST-PID`` tag) is kept."""
    removed, kept = [], []
    for path in stale_files(out):
        pid = _owner_running(path)
        if pid is not None:  # its run still goes (an older sslsky without the lock): not ours to remove
            print(f"sslsky embed: kept {path.name} (its embed, pid {pid}, still runs)", file=sys.stderr, flush=True)
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError as err:
            kept.append(f"{path.name} ({err.strerror})")
    if removed:
        print(f"sslsky embed: removed {len(removed)} stale temporary file(s) of an interrupted embed to {out}: "
              f"{', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}", file=sys.stderr, flush=True)
    if kept:
        print(f"sslsky embed: warning: could not remove {', '.join(kept)}", file=sys.stderr, flush=True)


class _NoRoomError(DiskFullError):
    """The output cannot fit in the free space of its disk, found before anything is computed."""

    def __init__(self, out: Path, needed: int, free: int):
        OSError.__init__(self, errno.ENOSPC, (
            f"the embeddings need at least {_size(needed)} and the disk holding {out.absolute().parent} has "
            f"{_size(free)} free; nothing was computed or written. Free space there (or point --out elsewhere) "
            f"and run the command again"))
        self.path = out


def _size(n_bytes: float) -> str:
    """``n_bytes`` in KiB, MiB or GiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.0f} KiB"


def _check_room(out: Path, needed: int) -> None:
    """:class:`_NoRoomError` when ``needed`` bytes (a lower bound of what this rank writes) are not free."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:  # a file system that does not say: the write itself will tell
        return
    with contextlib.suppress(OSError):  # the run's own lock beside out (removed at the end) is not counted as used
        free += os.stat(lock_next_to(out)).st_blocks * 512
    if free < needed:
        raise _NoRoomError(out, needed, free)


def run_embed(cfg: EmbedConfig) -> int:
    """``sslsky embed``: one process, or every rank of a torchrun/srun job."""
    if not cfg.ckpt or not cfg.data:
        raise ConfigError("sslsky embed needs --ckpt ENCODER and --data SHARDS")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1 and num_workers={cfg.num_workers} >= 0")
    if cfg.split not in ("", "train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}: choose '', train, val or test")
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"amp={cfg.amp!r}: choose auto, bf16, fp16 or none")
    _check_device(cfg.device, "device")
    # a folder, or a folder we cannot write, is refused before any work
    out = output_file(cfg.out, "out", example="embeddings.h5")
    # One embed at a time per --out: rank 0 holds .OUT.lock next to it from before the stale temp files are
    # looked at to the end.
    lock = OutputLock(lock_next_to(out), "embed", key="out", target=str(out),
                      harm="Two embeds to one --out would write over each other's files")
    dist.init_distributed()
    try:
        return _embed(cfg, out, lock)
    finally:
        lock.release()
        dist.cleanup()


def _check_device(name: str, key: str, allow_auto: bool = True) -> None:
    """ConfigError for a device torch does not know, or cuda where no GPU is visible."""
    if name == "auto" and allow_auto:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={name!r}: choose {'auto, ' if allow_auto else ''}cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but no CUDA GPU is visible here; use {key}=cpu"
                          + (" or auto" if allow_auto else ""))
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}: choose {'auto, ' if allow_auto else ''}cpu or cuda")


#: Errors a rank may meet that the user fixes (re-raised as they are when every failed rank met the same kind).
_USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "FileNotFoundError")


def _embed(cfg: EmbedConfig, out: Path, lock: OutputLock) -> int:
    from torch.utils.data import DataLoader, Subset

    from sslsky.data.shards import ShardDataset
    from sslsky.devices import autocast_dtype, rank_device
    from sslsky.eval.encoders import CheckpointError, load_encoder
    from sslsky.train.finetune import usable_cpus

    rank, world = dist.rank(), dist.world_size()
    start = {"refused": None, "tag": ""}
    if rank == 0:
        try:
            lock.acquire()
        except ConfigError as err:  # another embed to this --out: every rank stops with the message
            start["refused"] = str(err)
        else:
            _remove_stale(out)  # only while holding the lock
            start["tag"] = run_tag()
    start = dist.all_gather_object(start)[0]  # no rank writes its part before the stale ones are gone
    if start["refused"]:
        raise ConfigError(start["refused"])
    tag = start["tag"]  # in every temp file name of this run: its own, never another run's
    part = part_path(out, rank, world, tag)
    error, loop_started = None, time.perf_counter()
    zero_rows, bad_rows, bad_pixels, bad_ids = 0, 0, 0, []  # bad: non-finite features; ids: the first few
    try:
        device = rank_device(cfg.device, dist.local_rank())
        amp_dtype = autocast_dtype(cfg.amp, device, fp16=True)
        ckpt = Path(cfg.ckpt)
        if ckpt.is_dir():
            raise CheckpointError(f"checkpoint {ckpt} is a folder: give the file, e.g. {ckpt / 'encoder.pt'}")
        if not ckpt.is_file():  # named before the data are looked at
            raise CheckpointError(f"checkpoint {ckpt} does not exist")
        dataset = ShardDataset(cfg.data, split=cfg.split or None)
        try:
            survey = survey_of_images(dataset.attrs, cfg.survey)
        except ValueError as err:
            raise ConfigError(f"survey: {err}") from None
        loaded = load_encoder(cfg.ckpt, stem=cfg.stem or None, device=device, survey=survey)
        _check_inputs(dataset, loaded, cfg)
        block = rank_block(len(dataset), rank, world)
        _check_room(out, 4 * loaded.feature_dim * (len(block) + (len(dataset) if rank == 0 and world > 1 else 0)))
        rows = dataset.indices[block.start:block.stop]  # (n,) global shard rows of this rank
        columns = {name: dataset.index.columns[name][rows] for name in COLUMNS if name != "index"}
        columns["index"] = rows.astype(np.int64)
        meta = {"format": EMBEDDINGS_FORMAT, "ckpt": str(ckpt.resolve()), "arch": loaded.arch,
                "stem": loaded.stem, "source": loaded.source, "feature_dim": loaded.feature_dim,
                "data": str(Path(cfg.data).resolve()), "split": cfg.split or "all",
                "survey": str(dataset.attrs.get("survey") or loaded.info.get("survey") or cfg.survey or ""),
                "bands": str(dataset.attrs.get("bands") or ""), "normalized": True, "ranks": world,
                "label_column": str(dataset.attrs.get("label_column") or "morph_class"),
                "label_names": json.dumps(dataset.attrs.get("label_names") or {}),
                "device": device.type, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                "config": json.dumps(config_to_dict(cfg))}
        channels_last = cfg.channels_last and device.type == "cuda"
        if channels_last:
            loaded.encoder.to(memory_format=torch.channels_last)
        loader = DataLoader(Subset(dataset, block), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=min(cfg.num_workers, usable_cpus()), pin_memory=device.type == "cuda")
        batches = loader
        if cfg.progress and rank == 0:
            from sslsky.progress import track

            batches = track(loader, f"embed (rank 0/{world})", "batch")
        loop_started = time.perf_counter()
        with new_hdf5(part, out, "embeddings") as (handle, sink), torch.inference_mode():
            _layout(handle, len(block), loaded.feature_dim, columns)
            at = 0
            for batch in batches:
                expected = rows[at:at + len(batch["index"])]
                if not np.array_equal(batch["index"].numpy(), expected):
                    raise RuntimeError(f"rank {rank}: the loader returned rows out of order at {at}")
                x = loaded.transform(batch["image"].to(device, non_blocking=True))  # (B, C, n, n)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    features = loaded.encoder(x)  # (B, F)
                features = features.float()
                finite = torch.isfinite(features).all(1)
                if not bool(finite.all()):  # counted to the end, so that one message lists them all
                    bad = (~finite).cpu().numpy()
                    bad_rows += int(bad.sum())
                    bad_pixels += int((~torch.isfinite(batch["image"]).flatten(1).all(1)).numpy()[bad].sum())
                    bad_ids += [id_text(i) for i in columns["object_id"][at:at + len(x)][bad][:5 - len(bad_ids)]]
                zero_rows += int((features.norm(dim=1) == 0).sum())
                handle["embeddings"][at:at + len(x)] = F.normalize(features, dim=1).cpu().numpy()
                at += len(x)
                sink.check()
            if world == 1:
                handle.attrs.update(meta)
        if batches is not loader:
            batches.close()
        if bad_rows:  # nothing of a refused run stays on disk
            part.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 (reported to every rank below, then raised)
        kind = "disk" if isinstance(err, OSError) and is_no_space(err) else type(err).__name__
        error = (kind, f"rank {rank}: {type(err).__name__}: {err}")
        if world == 1:
            part.unlink(missing_ok=True)
            raise
    reports = dist.all_gather_object({"error": error, "zeros": zero_rows, "bad": bad_rows, "pixels": bad_pixels,
                                      "ids": bad_ids})
    errors = [r["error"] for r in reports if r["error"]]
    if errors:
        part.unlink(missing_ok=True)
        _raise_rank_errors(errors, out)
    if any(r["bad"] for r in reports):  # the same message on every rank
        part.unlink(missing_ok=True)
        raise DataError(_nonfinite_message(reports, len(dataset), cfg, out, meta["amp"]))
    merge_error = None
    if rank == 0:
        try:
            if world == 1:
                os.replace(part, out)
            else:
                merge_parts([part_path(out, r, world, tag) for r in range(world)], out, meta, tag=tag)
        except Exception as err:  # noqa: BLE001 (every rank learns of it below)
            if world == 1:
                raise
            kind = "disk" if isinstance(err, OSError) and is_no_space(err) else type(err).__name__
            merge_error = (kind, f"rank 0 merging the parts into {out}: {type(err).__name__}: {err}")
    merge_error = dist.all_gather_object(merge_error)[0]  # the file exists when any rank returns
    if merge_error:
        part.unlink(missing_ok=True)  # a full disk is not left full of parts
        _raise_rank_errors([merge_error], out)
    if rank == 0:
        zeros = sum(r["zeros"] for r in reports)
        seconds = time.perf_counter() - loop_started
        n = len(dataset)
        if zeros:
            print(f"sslsky embed: warning: {zeros} rows have all-zero features (cosine similarity 0 to "
                  f"everything)", file=sys.stderr)
        print(f"sslsky embed: {n} galaxies x {loaded.feature_dim} features ({loaded.arch}, {loaded.source}) on "
              f"{world} rank(s), {device.type}, amp {meta['amp']}: {seconds:.1f} s, {n / seconds:.1f} images/s "
              f"-> {out}", flush=True)
    return 0


def _raise_rank_errors(errors: list[tuple[str, str]], out: Path) -> None:
    """Raise, on every rank, what the ranks that failed met: ``(kind, message)`` each.

    A full disk anywhere is a :class:`DiskFullError`; when every failed rank met the same user error (a config,
    checkpoint or data error) that error, with every rank's message; else a RuntimeError (exit status 1).
    """
    from sslsky.eval.encoders import CheckpointError

    kinds = {kind for kind, _ in errors}
    if "disk" in kinds:
        raise DiskFullError(out.absolute(), "embeddings")
    text = "failed on " + "; ".join(message for _, message in errors)
    user = {"ConfigError": ConfigError, "DataError": DataError, "CheckpointError": CheckpointError,
            "FileNotFoundError": FileNotFoundError}
    if len(kinds) == 1 and (kind := kinds.pop()) in user:
        raise user[kind](text)
    raise RuntimeError(text)


def _nonfinite_message(reports: list[dict], n: int, cfg: EmbedConfig, out: Path, amp: str) -> str:
    """Which rows gave non-finite features, and the likely cause: NaN/inf pixels, or the encoder itself."""
    count, pixels = sum(r["bad"] for r in reports), sum(r["pixels"] for r in reports)
    ids = [i for r in reports for i in r["ids"]][:5]
    listed = ", ".join(ids) + (f" and {count - len(ids)} more" if count > len(ids) else "")
    text = (f"the encoder gave non-finite features (NaN/inf) for {count} of {n} rows, object_id {listed}; "
            f"nothing was written to {out}. ")
    if pixels == count:
        return text + (f"Likely cause: their cutouts in {cfg.data} hold NaN/inf pixels, which sslsky pack fills, "
                       f"so the shards were changed after packing: pack them again from the catalog, or leave these "
                       f"galaxies out")
    encoder = (f"every row failed, so the checkpoint {cfg.ckpt} probably holds NaN weights (a diverged run: take an "
               f"earlier checkpoint)" if count == n else
               f"try amp=none (amp was {amp}), or check the checkpoint {cfg.ckpt}")
    if pixels == 0:
        return text + f"Their pixels are finite, so the encoder itself overflowed: {encoder}"
    return text + (f"{pixels} of them have NaN/inf pixels in {cfg.data} (pack the shards again from the catalog); "
                   f"the other {count - pixels} have finite pixels: {encoder}")


def _check_inputs(dataset, loaded, cfg: EmbedConfig) -> None:
    """Band count and cutout size of the shards against what the encoder expects, with the fix."""
    if len(dataset) == 0:
        raise ConfigError(f"{cfg.data}: no rows{' in split ' + cfg.split if cfg.split else ''}")
    shape = dataset.read_image(int(dataset.indices[0])).shape  # (C, H, W)
    if shape[0] != loaded.in_channels:
        raise ConfigError(f"{cfg.data} has {shape[0]} bands, the encoder {cfg.ckpt} takes {loaded.in_channels}")
    size = loaded.transform.cutout_size
    if shape[1:] != (size, size):
        raise ConfigError(f"{cfg.data} has {shape[1]}x{shape[2]} cutouts, the encoder's eval transform expects "
                          f"{size}x{size}; pass survey= to match the data")


# ---------------------------------------------------------------------------
# Retrieval quality.
# ---------------------------------------------------------------------------


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
                       max_queries: int = 0, seed: int = 0, device: str = "cpu", progress: bool = False,
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
        ok = usable_rows(_as_unit(vectors, emb.normalized), True)
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
            name = _class_name(int(c), emb.attrs)
            per_class[name] = retrieval_metrics(queries[sel], neighbours[sel], morph_class, z)["class_agreement"]
    skipped_rows = np.sort(np.fromiter(skipped, np.int64, len(skipped)))
    return {"k": k, "queries": int(queries.size), "rows": len(emb), "neighbours": found,
            "random": retrieval_metrics(queries, random_rows, morph_class, z),
            "chance_class_agreement": chance_class_agreement(morph_class[finite]),
            "class_agreement_per_class": per_class, "mean_similarity": float(similarity.mean()),
            "skipped_rows": int(skipped_rows.size),
            "skipped_object_ids": [id_text(i) for i in emb.columns["object_id"][skipped_rows[:20]]]}


# ---------------------------------------------------------------------------
# Composite colour images.
# ---------------------------------------------------------------------------


def grid_size(n_panels: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a neighbour grid of ``n_panels`` panels, ``columns`` per line."""
    cols = min(n_panels, columns)
    rows = math.ceil(n_panels / cols)
    return round(cols * PANEL_INCHES[0] * PANEL_DPI), round(rows * PANEL_INCHES[1] * PANEL_DPI)


def neighbour_grid(images: list[np.ndarray], titles: list[str], bands: str, rgb_bands: str, path: str | os.PathLike,
                   columns: int = 6, stretch: float = 0.5, q: float = 10.0) -> Path:
    """A PNG of colour composites, the query first: ``images`` are ``(C, H, W)`` nanomaggies (Lupton et al. 2004
    composites of ``rgb_bands``, north up), or 8-bit colour images when ``bands`` is "RGB" (shown as they are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(images), columns)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=PANEL_DPI,
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = axes.flat[i]
        if bands == RGB_BANDS:  # a PNG/JPEG cutout: row 0 is the top
            colour = np.clip(np.moveaxis(np.asarray(image), 0, -1), 0, 255).astype(np.uint8)
            ax.imshow(colour, origin="upper", interpolation="nearest")
        else:
            ax.imshow(lupton_rgb(image, bands, rgb_bands, stretch, q), origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=7, color="crimson" if i == 0 else "black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PANEL_DPI)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# sslsky search
# ---------------------------------------------------------------------------


def _class_name(c: int, attrs: dict) -> str:
    """Name of class ``c`` of the embedded shards' label column ("unknown" for -1)."""
    if c < 0:
        return "unknown"
    return class_names(c, attrs)[c]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def search(emb: Embeddings, object_id: int | str, cfg: SearchConfig,
           skipped: set[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores (k,), rows (k,), query row) of the ``cfg.k`` nearest neighbours of ``object_id``.

    A query whose embedding holds NaN/inf is an :class:`EmbeddingsError`; such database rows are skipped
    (added to ``skipped``).
    """
    row = emb.rows_of([object_id])
    query = np.asarray(emb.vectors[int(row[0]):int(row[0]) + 1], dtype=np.float32)  # (1, F)
    if not usable_rows(_as_unit(query, emb.normalized), True).all():
        what = "a non-finite embedding (NaN/inf)" if not np.isfinite(query).all() else \
            f"an embedding of norm {float(np.linalg.norm(query)):.3g}, not a unit vector"
        raise EmbeddingsError(f"object_id {object_id} (row {int(row[0])}) has {what} in "
                              f"{emb.path}, so it has no neighbours; the file was written by an older sslsky embed or "
                              f"changed since: embed the shards again (sslsky embed now refuses such rows and says "
                              f"why)")
    try:
        if cfg.index == "faiss":
            scores, rows = topk_faiss(query, emb.vectors, cfg.k, exclude=row, hnsw_m=cfg.faiss_m,
                                      ef_search=cfg.faiss_ef_search, chunk_size=cfg.chunk_size, skipped=skipped)
        else:
            scores, rows = topk_cosine(query, emb.vectors, cfg.k, cfg.chunk_size, exclude=row,
                                       device=_device(cfg.device), skipped=skipped, unit_norm=emb.normalized,
                                       cosine=not emb.normalized)
    except EmbeddingsError as err:
        raise EmbeddingsError(f"{emb.path}: {err}") from None
    return scores[0], rows[0], int(row[0])


def _warn_skipped(emb: Embeddings, skipped: set[int]) -> None:
    """Say how many rows (and which object ids) a search skipped for NaN/inf embeddings."""
    if not skipped:
        return
    rows = np.sort(np.fromiter(skipped, np.int64, len(skipped)))
    ids = ", ".join(id_text(i) for i in emb.columns["object_id"][rows[:5]])
    more = f" and {rows.size - 5} more" if rows.size > 5 else ""
    print(f"sslsky search: warning: skipped {rows.size} of {len(emb)} rows of {emb.path} whose embeddings hold "
          f"NaN/inf{' or are not unit vectors' if emb.normalized else ''} (object_id {ids}{more}): they are never "
          f"neighbours. The file was written by an older sslsky embed or changed since; embed the shards again to "
          f"search them", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _reading(emb: Embeddings):
    """A read error of the (streamed) embeddings becomes an :class:`EmbeddingsError` naming the file."""
    try:
        yield
    except OSError as err:
        if is_no_space(err):
            raise
        raise EmbeddingsError(f"cannot read {emb.path} ({err}): the file is damaged; make it again with "
                              f"`sslsky embed`") from None


def _images(emb: Embeddings, rows: list[int], data: str) -> tuple[list[np.ndarray], str, str]:
    """Cutouts ``(C, H, W)`` of embedding rows from the shards, checked by object_id; and bands, survey."""
    from sslsky.data.shards import ShardDataset

    try:
        dataset = ShardDataset(data)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise EmbeddingsError(f"cannot read the shards for the images (--data {data}): {err}") from None
    ids = dataset.index.columns["object_id"]
    images = []
    by_id = None
    index = emb.columns.get("index")  # absent in hand-made files: found by object_id below
    for r in rows:
        oid, g = emb.columns["object_id"][r].item(), int(index[r]) if index is not None else -1
        if not (0 <= g < len(ids) and ids[g].item() == oid):  # other shards than were embedded: find by id
            if by_id is None:
                by_id = {v: i for i, v in enumerate(ids.tolist())}
            if oid not in by_id:
                raise EmbeddingsError(f"object_id {oid} is not in the shards {data}; pass the --data that was embedded "
                                      f"({emb.attrs.get('data')})")
            g = by_id[oid]
        images.append(dataset.read_image(g))
    dataset.close()
    bands = dataset.attrs.get("bands") or emb.attrs.get("bands") or ""
    bands = "".join(bands) if isinstance(bands, (list, tuple)) else str(bands)
    survey = str(dataset.attrs.get("survey") or emb.attrs.get("survey") or "")
    return images, bands, survey


def run_search(cfg: SearchConfig) -> int:
    """``sslsky search``: neighbours of ``cfg.query`` (printed, optional PNG grid) and/or ``cfg.evaluate``."""
    if not cfg.embeddings:
        raise ConfigError("sslsky search needs --embeddings FILE (made by `sslsky embed`)")
    if cfg.query is None and not cfg.evaluate:
        raise ConfigError("give --query OBJECT_ID, or --evaluate for the retrieval quality over all labelled rows")
    if cfg.k < 1 or cfg.chunk_size < 1 or cfg.query_batch < 1:
        raise ConfigError(f"k={cfg.k}, chunk_size={cfg.chunk_size} and query_batch={cfg.query_batch} must be >= 1")
    if cfg.index not in ("exact", "faiss"):
        raise ConfigError(f"index={cfg.index!r}: choose exact (chunked, default) or faiss (optional package)")
    _check_device(cfg.device, "device")
    for key, example in (("png", "grid.png"), ("eval_json", "retrieval.json")):  # refused before the search
        path = getattr(cfg, key)
        if path and Path(path).is_dir():
            raise ConfigError(f"{key}={path!r} is a folder: give a file name, e.g. {Path(path) / example}")
        if path:
            output_file(path, key)
    with Embeddings(cfg.embeddings, cfg.cache_mb) as emb:
        if cfg.k > len(emb) - 1:
            raise ConfigError(f"k={cfg.k} but {emb.path} holds {len(emb)} rows ({len(emb) - 1} neighbours at most)")
        skipped: set[int] = set()  # rows with NaN/inf embeddings, found by the searches
        try:
            if cfg.query is not None:
                _print_neighbours(emb, cfg, skipped)
            if cfg.evaluate:
                _print_evaluation(emb, cfg, skipped)
        finally:
            _warn_skipped(emb, skipped)
    return 0


def _print_neighbours(emb: Embeddings, cfg: SearchConfig, skipped: set[int]) -> None:
    started = time.perf_counter()
    with _reading(emb):
        scores, rows, qrow = search(emb, cfg.query, cfg, skipped)
    seconds = time.perf_counter() - started
    cols = emb.columns
    query_class = _class_name(int(cols["morph_class"][qrow]), emb.attrs)
    print(f"query {cfg.query} (row {qrow}): z={cols['z'][qrow]:.4f} class={query_class}")
    print(f"{'rank':>4}  {'object_id':>19}  {'cosine':>7}  {'z':>7}  class")
    for i, (score, r) in enumerate(zip(scores, rows), 1):
        print(f"{i:>4}  {id_text(cols['object_id'][r]):>19}  {score:7.4f}  {cols['z'][r]:7.4f}  "
              f"{_class_name(int(cols['morph_class'][r]), emb.attrs)}")
    summary = (f"sslsky search: {cfg.k} neighbours of {cfg.query} among {len(emb)} embeddings "
               f"({'exact cosine, chunks of ' + str(cfg.chunk_size) if cfg.index == 'exact' else 'FAISS HNSW'}) "
               f"in {seconds:.3f} s")
    if cfg.png:
        data = cfg.data or str(emb.attrs.get("data") or "")
        if not data:
            raise ConfigError("--png needs --data SHARDS (the embeddings file does not say which shards it came from)")
        images, bands, survey = _images(emb, [qrow, *rows.tolist()], data)
        rgb = RGB_BANDS if bands == RGB_BANDS else (
            cfg.rgb_bands or SURVEY_RGB_BANDS.get(survey, bands[-1:-4:-1] if len(bands) >= 3 else ""))
        names = [_class_name(int(cols["morph_class"][r]), emb.attrs) for r in [qrow, *rows.tolist()]]
        titles = [f"query {cfg.query}\nz={cols['z'][qrow]:.3f}\n{names[0]}"]
        titles += [f"{i}. {id_text(cols['object_id'][r])}\ncos={s:.3f} z={cols['z'][r]:.3f}\n{names[i]}"
                   for i, (s, r) in enumerate(zip(scores, rows), 1)]
        try:
            path = neighbour_grid(images, titles, bands, rgb, cfg.png, cfg.grid_columns, cfg.rgb_stretch, cfg.rgb_q)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        summary += f"; grid ({rgb} as RGB) -> {path}"
    print(summary, flush=True)


def _print_evaluation(emb: Embeddings, cfg: SearchConfig, skipped: set[int]) -> None:
    started = time.perf_counter()
    with _reading(emb):
        result = evaluate_retrieval(emb, cfg.k, cfg.chunk_size, cfg.query_batch, cfg.eval_queries, cfg.seed,
                                    _device(cfg.device), progress=cfg.progress, skipped=skipped)
    result["seconds"] = time.perf_counter() - started
    result["embeddings"] = str(emb.path)
    n, r = result["neighbours"], result["random"]
    skipped_note = f", {result['skipped_rows']} with NaN/inf skipped" if result["skipped_rows"] else ""
    print(f"retrieval quality, k={cfg.k}, {result['queries']} queries among {result['rows']} embeddings"
          f"{skipped_note}:")
    print(f"  {'':22}{'class agreement':>16}  {'median |dz|/(1+z)':>18}")
    print(f"  {'nearest neighbours':22}{n['class_agreement']:16.3f}  {n['median_dz']:18.4f}")
    print(f"  {'random neighbours':22}{r['class_agreement']:16.3f}  {r['median_dz']:18.4f}")
    print(f"  {'chance (class counts)':22}{result['chance_class_agreement']:16.3f}")
    per_class = ", ".join(f"{name} {v:.2f}" for name, v in result["class_agreement_per_class"].items())
    print(f"  class agreement by query class: {per_class}")
    if cfg.eval_json:
        write_text_atomic(cfg.eval_json, json.dumps(result, indent=2), "the evaluation")
    print(f"sslsky search: evaluated {result['queries']} queries in {result['seconds']:.2f} s"
          + (f" -> {cfg.eval_json}" if cfg.eval_json else ""), flush=True)


