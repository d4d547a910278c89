"""Similarity search: chunked top-k vs NumPy, sslsky embed (1 and 2 gloo ranks), sslsky search, retrieval metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from sslsky.cli import main
from sslsky.data.shards import ShardDataset
from sslsky.eval.embed import rank_block
from sslsky.eval.embeddings import EMBEDDINGS_FORMAT, Embeddings, EmbeddingsError
from sslsky.eval.neighbours import topk_cosine
from sslsky.eval.plots import grid_size
from sslsky.eval.retrieval import evaluate_retrieval, retrieval_metrics
from sslsky.models.loading import load_encoder
from tests.conftest import REPO, tiny_pretrain_args


def brute_force_topk(queries: np.ndarray, database: np.ndarray, k: int, exclude=None):
    """Reference: full (Q, N) float64 scores, order by (score descending, row ascending)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    rows = np.stack([np.lexsort((np.arange(database.shape[0]), -s))[:k] for s in scores])
    return np.take_along_axis(scores, rows, 1), rows


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 40, 101, 1000])
def test_chunked_topk_equals_argsort_with_ties(chunk_size):
    # Small integers: the dot products are exact in float32 and full of ties.
    rng = np.random.default_rng(0)
    database = rng.integers(-2, 3, size=(101, 6)).astype(np.float32)
    queries = database[[0, 5, 50, 100]]
    exclude = np.array([0, 5, 50, 100])
    for k, excl, query_batch in [(5, None, 1024), (5, exclude, 3), (12, exclude, 1), (100, exclude, 4)]:
        scores, rows = topk_cosine(queries, database, k, chunk_size=chunk_size, exclude=excl, query_batch=query_batch)
        ref_scores, ref_rows = brute_force_topk(queries, database, k, excl)
        np.testing.assert_array_equal(rows, ref_rows, err_msg=f"k={k}, exclude={excl is not None}")
        np.testing.assert_array_equal(scores, ref_scores)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("chunk_size", [4, 33, 300])
def test_chunked_topk_on_unit_vectors_streamed_from_hdf5(chunk_size, tmp_path):
    rng = np.random.default_rng(1)
    database = rng.normal(size=(300, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = database[:20]
    ref_scores, ref_rows = brute_force_topk(queries, database, 10, np.arange(20))
    with h5py.File(tmp_path / "db.h5", "w") as handle:
        handle["x"] = database
    with h5py.File(tmp_path / "db.h5", "r") as handle:  # rows read chunk by chunk from the file
        scores, rows = topk_cosine(queries, handle["x"], 10, chunk_size=chunk_size, exclude=np.arange(20))
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    with pytest.raises(ValueError, match="k=300 must be in \\[1, 299\\]"):
        topk_cosine(queries, database, 300, exclude=np.arange(20))


def test_rank_blocks_tile_the_rows():
    for n, world in [(128, 2), (7, 3), (2, 4)]:
        blocks = [rank_block(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))


def write_embeddings(path: Path, vectors: np.ndarray, morph_class: np.ndarray, z: np.ndarray) -> Path:
    n = len(vectors)
    with h5py.File(path, "w") as handle:
        handle["embeddings"] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        handle["object_id"] = np.arange(500, 500 + n, dtype=np.int64)
        handle["z"], handle["morph_class"] = z.astype(np.float32), morph_class.astype(np.int16)
        handle["ebv"], handle["index"] = np.zeros(n, np.float32), np.arange(n)
        handle.attrs["format"] = EMBEDDINGS_FORMAT
    return path


def test_retrieval_metrics_against_a_plain_loop(tmp_path):
    rng = np.random.default_rng(2)
    n, k = 40, 4
    morph_class = rng.integers(-1, 3, n)
    z = rng.uniform(0.02, 0.3, n)
    z[::9] = np.nan
    vectors = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[np.maximum(morph_class, 0) % 5]  # classes cluster a little
    path = write_embeddings(tmp_path / "emb.h5", vectors, morph_class, z)
    with Embeddings(path, cache_mb=0) as emb:  # cache_mb=0: the vectors stay on disk
        assert isinstance(emb.vectors, h5py.Dataset)
        result = evaluate_retrieval(emb, k=k, chunk_size=7, query_batch=5, seed=0)
        unit = emb.vectors[()].astype(np.float64)
        z32 = emb.columns["z"].astype(np.float64)
    # Independently: every row with a class or a redshift is a query; neighbours from the full matrix.
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    same, dz, queries = [], [], []
    for q in range(n):
        if morph_class[q] < 0 and not np.isfinite(z[q]):
            continue
        queries.append(q)
        for r in np.argsort(-sims[q], kind="stable")[:k]:
            if morph_class[q] >= 0 and morph_class[r] >= 0:
                same.append(morph_class[q] == morph_class[r])
            if np.isfinite(z32[q]) and np.isfinite(z32[r]):
                dz.append(abs(z32[r] - z32[q]) / (1 + z32[q]))
    assert result["queries"] == len(queries)
    assert result["neighbours"]["class_pairs"] == len(same) and result["neighbours"]["z_pairs"] == len(dz)
    assert result["neighbours"]["class_agreement"] == pytest.approx(np.mean(same))
    assert result["neighbours"]["median_dz"] == pytest.approx(np.median(dz))
    labelled = morph_class[morph_class >= 0]
    pairs = sum(c * (c - 1) for c in np.bincount(labelled))
    assert result["chance_class_agreement"] == pytest.approx(pairs / (len(labelled) * (len(labelled) - 1)))
    # The metric itself on a hand-made case: 2 of 3 labelled pairs agree; |dz| = 0, 0.1/1.1, 0.2/1.1.
    m = retrieval_metrics(np.array([0]), np.array([[1, 2, 3, 4]]), np.array([1, 1, 2, 1, -1]),
                          np.array([0.1, 0.1, 0.2, 0.3, np.nan]))
    assert m["class_agreement"] == pytest.approx(2 / 3) and m["median_dz"] == pytest.approx(0.1 / 1.1)


@pytest.fixture(scope="module")
def encoder_path(packed_mock, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("similarity") / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=3", "val_every=0",
                                   "checkpoint_every=3")) == 0
    return run_dir / "encoder.pt"


@pytest.fixture(scope="module")
def embedded(packed_mock, encoder_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "emb.h5"
    assert main(["embed", "--ckpt", str(encoder_path), "--data", str(packed_mock), "--out", str(out),
                 "batch_size=16", "num_workers=1", "progress=false"]) == 0
    return out


def test_embed_matches_the_encoder_row_by_row(embedded, packed_mock, encoder_path):
    dataset = ShardDataset(packed_mock)
    with h5py.File(embedded, "r") as handle:
        vectors = handle["embeddings"][()]
        assert vectors.shape == (len(dataset), 512) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cols = dataset.index.columns
        np.testing.assert_array_equal(handle["object_id"][()], cols["object_id"])
        np.testing.assert_array_equal(handle["index"][()], np.arange(len(dataset)))
        np.testing.assert_array_equal(handle["z"][()], cols["z"])
        np.testing.assert_array_equal(handle["morph_class"][()], cols["morph_class"])
        assert handle.attrs["format"] == EMBEDDINGS_FORMAT and handle.attrs["feature_dim"] == 512
        assert handle.attrs["arch"] == "resnet18" and handle.attrs["ckpt"] == str(encoder_path.resolve())
    assert not list(embedded.parent.glob(".emb.h5*")), "part or temporary files left behind"
    loaded = load_encoder(encoder_path)
    rows = [0, 47, 127]
    images = torch.from_numpy(np.stack([dataset.read_image(r) for r in rows]))
    with torch.no_grad():
        expected = F.normalize(loaded.encoder(loaded.transform(images)), dim=1).numpy()
    np.testing.assert_allclose(vectors[rows], expected, atol=1e-5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_write_the_same_file(embedded, packed_mock, encoder_path, tmp_path):
    out = tmp_path / "emb2.h5"
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sslsky", "embed", "--ckpt", str(encoder_path), "--data", str(packed_mock),
             "--out", str(out), "batch_size=16", "num_workers=0", "progress=false"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "on 2 rank(s)" in outs[0]
    with h5py.File(embedded, "r") as one, h5py.File(out, "r") as two:
        assert set(one) == set(two)
        for name in one:
            if name == "embeddings":  # same batches per row; allow BLAS thread-count rounding
                np.testing.assert_allclose(two[name][()], one[name][()], atol=1e-6)
            else:
                np.testing.assert_array_equal(two[name][()], one[name][()])
        assert two.attrs["ranks"] == 2
        assert {k: v for k, v in one.attrs.items() if k not in ("ranks", "config")} == \
               {k: v for k, v in two.attrs.items() if k not in ("ranks", "config")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb2.h5"]


def test_search_prints_neighbours_and_writes_a_grid(embedded, tmp_path, capsys):
    with Embeddings(embedded) as emb:
        query = int(emb.columns["object_id"][10])
        ids = set(emb.columns["object_id"].tolist())
    png = tmp_path / "grid.png"
    assert main(["search", "--embeddings", str(embedded), "--query", str(query), "--k", "7", "--png", str(png),
                 "chunk_size=50"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(cols[0]) for cols in lines] == list(range(1, 8))
    neighbours = [int(cols[1]) for cols in lines]
    assert query not in neighbours and set(neighbours) <= ids
    similarities = [float(cols[2]) for cols in lines]
    assert similarities == sorted(similarities, reverse=True)
    with Image.open(png) as image:
        assert image.size == grid_size(8, 6) == (6 * 180, 2 * 220)
        assert image.mode in ("RGB", "RGBA")
    # The evaluation: both rows of figures and the chance line.
    assert main(["search", "--embeddings", str(embedded), "--evaluate", "--k", "5", f"eval_json={tmp_path / 'r.json'}",
                 "chunk_size=30", "query_batch=50"]) == 0
    out = capsys.readouterr().out
    assert "nearest neighbours" in out and "random neighbours" in out and "128 queries" in out
    assert (tmp_path / "r.json").is_file()


def test_unknown_object_id_and_missing_files_are_named(embedded, tmp_path, capsys):
    assert main(["search", "--embeddings", str(embedded), "--query", "424242"]) == 2
    err = capsys.readouterr().err
    assert "object_id 424242 not in" in err and str(embedded) in err
    assert main(["search", "--embeddings", str(tmp_path / "none.h5"), "--query", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "--embeddings", str(embedded)]) == 2  # neither --query nor --evaluate
    assert main(["embed", "--ckpt", str(tmp_path / "none.pt"), "--data", "x", "--out", str(tmp_path / "e.h5")]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err
    try:
        import faiss  # noqa: F401
    except ImportError:
        with Embeddings(embedded) as emb:
            query = str(int(emb.columns["object_id"][0]))
        assert main(["search", "--embeddings", str(embedded), "--query", query, "--index", "faiss"]) == 2
        assert "optional faiss package" in capsys.readouterr().err
    with pytest.raises(EmbeddingsError, match="not an sslsky embeddings file"):
        with h5py.File(tmp_path / "other.h5", "w") as handle:
            handle["x"] = np.zeros(3)
        Embeddings(tmp_path / "other.h5")
