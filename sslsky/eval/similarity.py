"""Similarity search on frozen encoder features: ``sslsky embed`` and ``sslsky search``.

``sslsky embed`` runs a pretrained encoder over packed shards (the deterministic eval view: centred
crop + the training normalisation) and writes one HDF5 file:

    embeddings   (N, F) float32, L2-normalised (cosine similarity = dot product)
    object_id    (N,) int64      z (N,)   ebv (N,)   morph_class (N,)
    index        (N,) int64      global row of each galaxy in the shards (ShardDataset.read_image)
    attrs        format, ckpt, arch, stem, feature_dim, data, survey, bands, split, ranks, ...

Under torchrun or srun each rank embeds a contiguous block of the rows into a part file; after all
ranks report, rank 0 concatenates the parts in rank order into the final file (written to a temporary
name, then renamed), so the result is the same file as one process gives.

``sslsky search`` finds the k nearest neighbours by exact cosine similarity, reading the database in
chunks of ``chunk_size`` rows and merging a running top-k per query: memory is bounded by
``chunk_size x (F + queries)`` floats whatever N is (10M x 512 streams from the HDF5 file), never
N x N. Ties are broken towards the lower row, so results do not depend on the chunk size. An
approximate FAISS HNSW index is an option where the ``faiss`` package is installed (it is not a
dependency). ``evaluate_retrieval`` measures retrieval quality against the catalog labels: the
fraction of neighbours that share the query's morphology class and the median |dz|/(1 + z) to the
neighbours, next to the same figures for random neighbours.

    emb = Embeddings("emb.h5")
    scores, rows = topk_cosine(emb.vectors[emb.rows_of([oid])], emb.vectors, k=10, exclude=emb.rows_of([oid]))
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from sslsky.augment import survey_of_images
from sslsky.config import ConfigError, EmbedConfig, SearchConfig, config_to_dict
from sslsky.data.ids import as_id_array, id_text, is_string_ids, match_query, read_ids, write_ids
from sslsky.data.rgb import SURVEY_RGB_BANDS, lupton_rgb
from sslsky.data.schema import RGB_BANDS
from sslsky.data.votes import class_names
from sslsky.train import dist

EMBEDDINGS_FORMAT = "sslsky-embeddings-v1"
#: Per-row columns stored next to the embeddings (``index``: global row in the shards).
COLUMNS = ("object_id", "z", "ebv", "morph_class", "index")
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


@torch.no_grad()
def topk_cosine(queries, database, k: int, chunk_size: int = 65536, exclude=None, query_batch: int = 1024,
                device: str | torch.device = "cpu", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` against ``database``, chunk by chunk.

    For L2-normalised vectors the inner product is the cosine similarity. The database is read once,
    whatever the number of queries; each chunk is scored against ``query_batch`` queries at a time.
    Memory: ``chunk_size x F`` database floats, ``query_batch x chunk_size`` scores, ``Q x k`` results.

    Args:
        queries: ``(Q, F)`` array.
        database: ``(N, F)`` anything sliceable by rows (NumPy array, ``h5py`` dataset).
        exclude: optional ``(Q,)`` database row to leave out for each query (the query itself).
    Returns:
        ``(scores, rows)``, each ``(Q, k)``: float32 similarities in descending order and the int64
        database rows; equal scores are ordered by row, whatever the chunk size.
    """
    queries = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    n, n_query = int(database.shape[0]), queries.shape[0]
    if chunk_size < 1 or query_batch < 1:
        raise ValueError(f"chunk_size={chunk_size} and query_batch={query_batch} must be >= 1")
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
    for start in starts:
        block = torch.from_numpy(np.asarray(database[start:start + chunk_size], dtype=np.float32)).to(device)  # (c, F)
        for b, batch in enumerate(batches):
            scores = queries[batch] @ block.T  # (q, c)
            if excluded is not None:
                local = excluded[batch] - start
                hit = ((local >= 0) & (local < block.shape[0])).nonzero().squeeze(1)
                scores[hit, local[hit]] = -math.inf
            values, cols = _chunk_topk(scores, k)
            best[b] = _sorted_by_score(torch.cat([best[b][0], values], 1), torch.cat([best[b][1], cols + start], 1), k)
    if not best:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return torch.cat([s for s, _ in best]).cpu().numpy(), torch.cat([r for _, r in best]).cpu().numpy()


def topk_faiss(queries, database, k: int, exclude=None, hnsw_m: int = 32, ef_search: int = 128,
               chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` inner products with a FAISS HNSW index (needs the optional ``faiss`` package).

    The index is built in memory (N x F floats plus the graph); same outputs as :func:`topk_cosine`,
    but neighbours may be missed.
    """
    try:
        import faiss
    except ImportError:
        raise EmbeddingsError("index=faiss needs the optional faiss package (pip install faiss-cpu or "
                              "faiss-gpu); index=exact needs nothing") from None
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexHNSWFlat(int(database.shape[1]), hnsw_m, faiss.METRIC_INNER_PRODUCT)
    for start in range(0, int(database.shape[0]), chunk_size):
        index.add(np.ascontiguousarray(database[start:start + chunk_size], dtype=np.float32))
    index.hnsw.efSearch = max(ef_search, k + 1)
    extra = 1 if exclude is not None else 0
    scores, rows = index.search(queries, k + extra)
    if exclude is not None:
        keep = rows != np.asarray(exclude)[:, None]
        scores = np.stack([s[m][:k] for s, m in zip(scores, keep)])
        rows = np.stack([r[m][:k] for r, m in zip(rows, keep)])
    return scores[:, :k].astype(np.float32), rows[:, :k].astype(np.int64)


# ---------------------------------------------------------------------------
# Embeddings file.
# ---------------------------------------------------------------------------


class Embeddings:
    """An embeddings file written by ``sslsky embed``, read-only.

    ``vectors`` is the ``(N, F)`` HDF5 dataset, or a NumPy array when it fits in ``cache_mb``;
    the per-row columns are in memory (``columns[name]``, ``(N,)``).
    """

    def __init__(self, path: str | os.PathLike, cache_mb: float = 2048.0):
        self.path = Path(path)
        if not self.path.is_file():
            raise EmbeddingsError(f"embeddings file {self.path} does not exist; make it with "
                                  f"`sslsky embed --ckpt ENCODER --data SHARDS --out {self.path}`")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise EmbeddingsError(f"embeddings file {self.path} is not readable HDF5: {err}") from None
        if self.file.attrs.get("format") != EMBEDDINGS_FORMAT or "embeddings" not in self.file:
            self.file.close()
            raise EmbeddingsError(f"{self.path} is not an sslsky embeddings file (format={EMBEDDINGS_FORMAT}); "
                                  f"make one with `sslsky embed`")
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}
        self.columns = {name: read_ids(self.file[name]) if name == "object_id" else self.file[name][()]
                        for name in COLUMNS if name in self.file}
        dataset = self.file["embeddings"]
        fits = dataset.size * dataset.dtype.itemsize <= cache_mb * 2**20
        self.vectors = dataset[()] if fits else dataset  # (N, F)
        self._sorter: np.ndarray | None = None  # (N,) argsort of object_id, made on the first lookup

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


def _write_part(path: Path, n: int, dim: int, columns: dict[str, np.ndarray]) -> h5py.File:
    """An open HDF5 file with the columns written and an ``(n, dim)`` embeddings dataset to fill."""
    handle = h5py.File(path, "w")
    rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (4 * dim)))
    handle.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                          chunks=(rows_per_chunk, dim) if n else None)
    for name, values in columns.items():
        if name == "object_id":
            write_ids(handle, name, values)
        else:
            handle.create_dataset(name, data=values)
    return handle


def merge_parts(parts: list[Path], out: Path, attrs: dict, chunk_rows: int = 65536) -> Path:
    """Concatenate part files in order into ``out`` (temporary name, then rename); the parts are removed."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    handles = [h5py.File(p, "r") for p in parts]
    try:
        n = sum(h["embeddings"].shape[0] for h in handles)
        dim = handles[0]["embeddings"].shape[1]
        with h5py.File(tmp, "w") as dst:
            rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (4 * dim)))
            dst.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                               chunks=(rows_per_chunk, dim) if n else None)
            for name in COLUMNS:
                if name == "object_id":
                    write_ids(dst, name, np.concatenate([read_ids(h[name]) for h in handles]))
                else:
                    dst.create_dataset(name, data=np.concatenate([h[name][()] for h in handles]))
            at = 0
            for h in handles:
                src = h["embeddings"]
                for start in range(0, src.shape[0], chunk_rows):
                    block = src[start:start + chunk_rows]
                    dst["embeddings"][at:at + len(block)] = block
                    at += len(block)
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


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.part-{rank:05d}-of-{world:05d}.h5")


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
    dist.init_distributed()
    try:
        return _embed(cfg)
    finally:
        dist.cleanup()


def _embed(cfg: EmbedConfig) -> int:
    from torch.utils.data import DataLoader, Subset

    from sslsky.data.shards import ShardDataset
    from sslsky.eval.encoders import CheckpointError, load_encoder
    from sslsky.train.finetune import usable_cpus
    from sslsky.train.pretrain import autocast_dtype, pick_device

    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(out, rank, world)
    error, loop_started = None, time.perf_counter()
    try:
        device = pick_device(cfg.device, dist.local_rank())
        amp_dtype = autocast_dtype(cfg.amp, device)
        if not Path(cfg.ckpt).is_file():  # named before the data are looked at
            raise CheckpointError(f"checkpoint {cfg.ckpt} does not exist")
        dataset = ShardDataset(cfg.data, split=cfg.split or None)
        try:
            survey = survey_of_images(dataset.attrs, cfg.survey)
        except ValueError as err:
            raise ConfigError(f"survey: {err}") from None
        loaded = load_encoder(cfg.ckpt, stem=cfg.stem or None, device=device, survey=survey)
        _check_inputs(dataset, loaded, cfg)
        block = rank_block(len(dataset), rank, world)
        rows = dataset.indices[block.start:block.stop]  # (n,) global shard rows of this rank
        columns = {name: dataset.index.columns[name][rows] for name in COLUMNS if name != "index"}
        columns["index"] = rows.astype(np.int64)
        channels_last = cfg.channels_last and device.type == "cuda"
        if channels_last:
            loaded.encoder.to(memory_format=torch.channels_last)
        loader = DataLoader(Subset(dataset, block), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=min(cfg.num_workers, usable_cpus()), pin_memory=device.type == "cuda")
        batches = loader
        if cfg.progress and rank == 0:
            from sslsky.progress import track

            batches = track(loader, f"embed (rank 0/{world})", "batch")
        zero_rows, loop_started = 0, time.perf_counter()
        with _write_part(part, len(block), loaded.feature_dim, columns) as handle, torch.inference_mode():
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
                if not bool(torch.isfinite(features).all()):
                    bad = columns["object_id"][at:at + len(x)][~torch.isfinite(features).all(1).cpu().numpy()]
                    raise RuntimeError(f"non-finite features for object_id {bad[:5].tolist()} (check the cutouts "
                                       f"and the checkpoint {cfg.ckpt})")
                zero_rows += int((features.norm(dim=1) == 0).sum())
                handle["embeddings"][at:at + len(x)] = F.normalize(features, dim=1).cpu().numpy()
                at += len(x)
        if batches is not loader:
            batches.close()
        meta = {"format": EMBEDDINGS_FORMAT, "ckpt": str(Path(cfg.ckpt).resolve()), "arch": loaded.arch,
                "stem": loaded.stem, "source": loaded.source, "feature_dim": loaded.feature_dim,
                "data": str(Path(cfg.data).resolve()), "split": cfg.split or "all",
                "survey": str(dataset.attrs.get("survey") or loaded.info.get("survey") or cfg.survey or ""),
                "bands": str(dataset.attrs.get("bands") or ""), "normalized": True, "ranks": world,
                "label_column": str(dataset.attrs.get("label_column") or "morph_class"),
                "label_names": json.dumps(dataset.attrs.get("label_names") or {}),
                "device": device.type, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                "config": json.dumps(config_to_dict(cfg))}
    except Exception as err:  # noqa: BLE001 (reported to every rank below, then raised)
        error = f"rank {rank}: {type(err).__name__}: {err}"
        if world == 1:
            part.unlink(missing_ok=True)
            raise
    reports = dist.all_gather_object((error, zero_rows if error is None else 0))
    errors = [e for e, _ in reports if e]
    if errors:
        part.unlink(missing_ok=True)
        raise RuntimeError("failed on " + "; ".join(errors))
    merge_error = None
    if rank == 0:
        try:
            merge_parts([part_path(out, r, world) for r in range(world)], out, meta)
        except Exception as err:  # noqa: BLE001 (every rank learns of it below)
            if world == 1:
                raise
            merge_error = f"rank 0 merging the parts into {out}: {type(err).__name__}: {err}"
    merge_error = dist.all_gather_object(merge_error)[0]  # the file exists when any rank returns
    if merge_error:
        raise RuntimeError(f"failed on {merge_error}")
    if rank == 0:
        zeros = sum(z for _, z in reports)
        seconds = time.perf_counter() - loop_started
        n = len(dataset)
        if zeros:
            print(f"sslsky embed: warning: {zeros} rows have all-zero features (cosine similarity 0 to "
                  f"everything)", file=sys.stderr)
        print(f"sslsky embed: {n} galaxies x {loaded.feature_dim} features ({loaded.arch}, {loaded.source}) on "
              f"{world} rank(s), {device.type}, amp {meta['amp']}: {seconds:.1f} s, {n / seconds:.1f} images/s "
              f"-> {out}", flush=True)
    return 0


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
                       max_queries: int = 0, seed: int = 0, device: str = "cpu", progress: bool = False) -> dict:
    """Retrieval quality with every labelled galaxy (class or redshift) as a query, itself excluded.

    The neighbours come from the exact chunked search; the chance baseline gives each query ``k``
    rows drawn uniformly from the other N - 1 (with replacement). ``max_queries`` > 0 uses a seeded
    random sample of the labelled queries.
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
    block = max(query_batch, _QUERY_BLOCK_BYTES // (4 * emb.feature_dim))  # queries per pass over the database
    starts = range(0, queries.size, block)
    if progress:
        from sslsky.progress import track

        starts = track(starts, "evaluate", "pass")
    for start in starts:
        q = queries[start:start + block]  # increasing rows
        contiguous = q[-1] - q[0] + 1 == q.size
        vectors = emb.vectors[q[0]:q[-1] + 1] if contiguous else emb.vectors[q]  # (q, F)
        similarity[start:start + q.size], neighbours[start:start + q.size] = topk_cosine(
            vectors, emb.vectors, k, chunk_size, exclude=q, query_batch=query_batch, device=device)
    random_rows = rng.integers(0, len(emb) - 1, size=(queries.size, k))
    random_rows += random_rows >= queries[:, None]  # skip the query itself
    found = retrieval_metrics(queries, neighbours, morph_class, z)
    per_class = {}
    for c in np.unique(morph_class[queries]):
        if c >= 0:
            sel = morph_class[queries] == c
            name = _class_name(int(c), emb.attrs)
            per_class[name] = retrieval_metrics(queries[sel], neighbours[sel], morph_class, z)["class_agreement"]
    return {"k": k, "queries": int(queries.size), "rows": len(emb), "neighbours": found,
            "random": retrieval_metrics(queries, random_rows, morph_class, z),
            "chance_class_agreement": chance_class_agreement(morph_class),
            "class_agreement_per_class": per_class, "mean_similarity": float(similarity.mean())}


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


def search(emb: Embeddings, object_id: int | str, cfg: SearchConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores (k,), rows (k,), query row) of the ``cfg.k`` nearest neighbours of ``object_id``."""
    row = emb.rows_of([object_id])
    query = np.asarray(emb.vectors[int(row[0]):int(row[0]) + 1], dtype=np.float32)  # (1, F)
    if cfg.index == "faiss":
        scores, rows = topk_faiss(query, emb.vectors, cfg.k, exclude=row, hnsw_m=cfg.faiss_m,
                                  ef_search=cfg.faiss_ef_search, chunk_size=cfg.chunk_size)
    else:
        scores, rows = topk_cosine(query, emb.vectors, cfg.k, cfg.chunk_size, exclude=row, device=_device(cfg.device))
    return scores[0], rows[0], int(row[0])


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
    for r in rows:
        oid, g = emb.columns["object_id"][r].item(), int(emb.columns["index"][r])
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
    with Embeddings(cfg.embeddings, cfg.cache_mb) as emb:
        if cfg.k > len(emb) - 1:
            raise ConfigError(f"k={cfg.k} but {emb.path} holds {len(emb)} rows ({len(emb) - 1} neighbours at most)")
        if cfg.query is not None:
            _print_neighbours(emb, cfg)
        if cfg.evaluate:
            _print_evaluation(emb, cfg)
    return 0


def _print_neighbours(emb: Embeddings, cfg: SearchConfig) -> None:
    started = time.perf_counter()
    scores, rows, qrow = search(emb, cfg.query, cfg)
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


def _print_evaluation(emb: Embeddings, cfg: SearchConfig) -> None:
    started = time.perf_counter()
    result = evaluate_retrieval(emb, cfg.k, cfg.chunk_size, cfg.query_batch, cfg.eval_queries, cfg.seed,
                                _device(cfg.device), progress=cfg.progress)
    result["seconds"] = time.perf_counter() - started
    result["embeddings"] = str(emb.path)
    n, r = result["neighbours"], result["random"]
    print(f"retrieval quality, k={cfg.k}, {result['queries']} queries among {result['rows']} embeddings:")
    print(f"  {'':22}{'class agreement':>16}  {'median |dz|/(1+z)':>18}")
    print(f"  {'nearest neighbours':22}{n['class_agreement']:16.3f}  {n['median_dz']:18.4f}")
    print(f"  {'random neighbours':22}{r['class_agreement']:16.3f}  {r['median_dz']:18.4f}")
    print(f"  {'chance (class counts)':22}{result['chance_class_agreement']:16.3f}")
    per_class = ", ".join(f"{name} {v:.2f}" for name, v in result["class_agreement_per_class"].items())
    print(f"  class agreement by query class: {per_class}")
    if cfg.eval_json:
        path = Path(cfg.eval_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    print(f"sslsky search: evaluated {result['queries']} queries in {result['seconds']:.2f} s"
          + (f" -> {cfg.eval_json}" if cfg.eval_json else ""), flush=True)


