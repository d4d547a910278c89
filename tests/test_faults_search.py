"""Faults and bad values in ``sslsky embed`` and ``sslsky search``: real HDF5 files and real CLI calls.

- NaN/inf rows of an embeddings file are never neighbours (exact search, in memory and streamed, and the
  retrieval evaluation); they are named in a warning; the other results equal a NumPy brute force.
- A non-finite query is an error (exit 2) naming the object id.
- ``embed`` over shards with a NaN image exits 2 listing the object id, on every rank, and writes no ``--out``.
- ``--out`` a folder or on a read-only file system is refused before any work.
- A SIGKILL of ``sslsky embed`` at a seeded random point leaves nothing at ``--out``; the re-run removes the
  stale files (and says how many) and writes what an uninterrupted run writes.
- A full small file system (tmpfs): exit 2 naming the disk, no partial file, both before the work (too small
  for the embeddings) and during the write (room for the vectors but not the whole file).
- Broken embeddings files, wrong queries and checkpoints: a message and exit 2, no traceback.

The encoder is an untrained ResNet-18 saved as an ``encoder.pt`` (its features are as good as any for
these checks) over 30 packed 16 x 16 cutouts, so the whole file runs in well under a minute on one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, make_survey, pack_args, tmpfs, untrained_encoder

from sslsky.cli import main
from sslsky.eval.embed import stale_files
from sslsky.eval.embeddings import EMBEDDINGS_FORMAT, Embeddings
from sslsky.eval.neighbours import topk_cosine
from sslsky.eval.retrieval import evaluate_retrieval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 30  # galaxies: 2 shards of 16 and 14 rows
EMBED_OPTIONS = ["num_workers=0", "progress=false", "batch_size=4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Packed shards of 30 galaxies, an untrained encoder.pt for them, and their embeddings file."""
    root = tmp_path_factory.mktemp("faults_search")
    catalog = make_survey(root / "survey", n=N)
    assert main(pack_args(catalog, root / "packed", "--shard-size", "16")) == 0
    ckpt = untrained_encoder(root / "encoder.pt")
    emb = root / "emb.h5"
    assert main(embed_args(ckpt, root / "packed", emb)) == 0
    return {"root": root, "data": root / "packed", "ckpt": ckpt, "emb": emb}


def embed_args(ckpt: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return ["embed", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *EMBED_OPTIONS, *overrides]


def read_all(path: Path) -> dict:
    """Every dataset and attribute of an HDF5 file."""
    with h5py.File(path, "r") as handle:
        data = {name: handle[name][()] for name in handle}
        data["attrs"] = dict(handle.attrs)
    return data


def neighbour_table(out: str) -> tuple[list[int], list[float]]:
    """object ids and cosines of the neighbour lines printed by ``sslsky search --query``."""
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    return [int(cols[1]) for cols in lines], [float(cols[2]) for cols in lines]


def brute_force(vectors: np.ndarray, query_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 cosines to every finite row but the query, best first (ties to the lower row)."""
    scores = vectors.astype(np.float64) @ vectors[query_row].astype(np.float64)
    scores[~np.isfinite(vectors).all(1)] = -np.inf
    scores[query_row] = -np.inf
    rows = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return rows, scores[rows]


def with_bad_rows(source: Path, path: Path, rows: dict[int, float]) -> Path:
    """A copy of an embeddings file with the given rows set to NaN or inf (one feature, or all with NaN)."""
    shutil.copy(source, path)
    with h5py.File(path, "a") as handle:
        for row, value in rows.items():
            vector = handle["embeddings"][row]
            if np.isnan(value):
                vector[:] = value
            else:
                vector[3] = value
            handle["embeddings"][row] = vector
    return path


# ---------------------------------------------------------------------------
# Search over a file with NaN/inf rows.
# ---------------------------------------------------------------------------

BAD_ROWS = {5: np.nan, 9: np.inf, 22: -np.inf}


def test_nonfinite_rows_are_never_neighbours_and_are_named(tiny, tmp_path, capsys):
    path = with_bad_rows(tiny["emb"], tmp_path / "bad.h5", BAD_ROWS)
    data = read_all(path)
    vectors, ids = data["embeddings"], data["object_id"]
    bad_ids = {int(ids[r]) for r in BAD_ROWS}
    k = N - 1 - len(BAD_ROWS)  # every finite row but the query: a NaN row would have to show up
    for query_row in (0, 6, 29):
        ref_rows, ref_scores = brute_force(vectors, query_row, k)
        for extra in (["chunk_size=7"], ["chunk_size=65536"], ["chunk_size=4", "cache_mb=0"]):
            assert main(["search", "--embeddings", str(path), "--query", str(ids[query_row]), "--k", str(k),
                         *extra]) == 0
            captured = capsys.readouterr()
            found, cosines = neighbour_table(captured.out)
            assert not bad_ids & set(found), f"a non-finite row was returned ({extra})"
            assert found == ids[ref_rows].tolist(), extra
            np.testing.assert_allclose(cosines, ref_scores, atol=1e-4)
            assert np.isfinite(cosines).all()
            assert f"skipped 3 of {N} rows of {path}" in captured.err
            assert all(str(i) in captured.err for i in bad_ids)
    # One more neighbour than there are finite rows: refused, not filled with a skipped row.
    assert main(["search", "--embeddings", str(path), "--query", str(ids[0]), "--k", str(k + 1)]) == 2
    err = capsys.readouterr().err
    assert f"only {k} of the {N} rows are usable besides the query" in err and "ask for fewer" in err
    # The library call: same rows, whatever the chunk size, and the skipped rows reported.
    for chunk_size in (1, 5, 30):
        skipped: set[int] = set()
        rows = topk_cosine(vectors[[0, 6]], vectors, 4, chunk_size, exclude=[0, 6], skipped=skipped)[1]
        assert rows.tolist() == [brute_force(vectors, q, 4)[0].tolist() for q in (0, 6)]
        assert skipped == set(BAD_ROWS)


def test_evaluation_skips_nonfinite_rows(tiny, tmp_path, capsys):
    path = with_bad_rows(tiny["emb"], tmp_path / "bad.h5", BAD_ROWS)
    data = read_all(path)
    # Reference: the same file without the bad rows at all; the nearest-neighbour figures must agree.
    keep = np.setdiff1d(np.arange(N), list(BAD_ROWS))
    clean = tmp_path / "clean.h5"
    with h5py.File(clean, "w") as handle:
        for name in ("embeddings", "object_id", "z", "ebv", "morph_class", "index"):
            handle[name] = data[name][keep]
        handle.attrs.update(data["attrs"])
    report = tmp_path / "eval.json"
    assert main(["search", "--embeddings", str(path), "--evaluate", "--k", "5", "chunk_size=8", "query_batch=3",
                 f"eval_json={report}"]) == 0
    captured = capsys.readouterr()
    assert "3 with NaN/inf skipped" in captured.out and "skipped 3 of 30 rows" in captured.err
    result = json.loads(report.read_text())
    with Embeddings(clean) as emb:
        expected = evaluate_retrieval(emb, k=5, chunk_size=8, query_batch=3)
    labelled = (data["morph_class"] >= 0) | np.isfinite(data["z"])
    assert result["queries"] == expected["queries"] == int(labelled[keep].sum())
    assert result["neighbours"] == pytest.approx(expected["neighbours"], nan_ok=True)
    assert result["chance_class_agreement"] == pytest.approx(expected["chance_class_agreement"])
    assert result["skipped_rows"] == 3
    assert sorted(result["skipped_object_ids"]) == sorted(str(data["object_id"][r]) for r in BAD_ROWS)
    assert np.isfinite(result["mean_similarity"])


def test_nonfinite_query_is_an_error(tiny, tmp_path, capsys):
    path = with_bad_rows(tiny["emb"], tmp_path / "bad.h5", BAD_ROWS)
    ids = read_all(path)["object_id"]
    for row in BAD_ROWS:
        assert main(["search", "--embeddings", str(path), "--query", str(ids[row])]) == 2
        captured = capsys.readouterr()
        assert f"object_id {ids[row]} (row {row}) has a non-finite embedding" in captured.err
        assert neighbour_table(captured.out) == ([], [])


def test_rows_that_are_not_unit_vectors_are_skipped_and_a_zero_query_refused(tiny, tmp_path, capsys):
    """A file that says its rows are normalised, with one row x 100 (its inner products would beat every cosine)
    and one zero row: both are skipped like NaN rows, and either as the query is an error."""
    path = tmp_path / "scaled.h5"
    shutil.copy(tiny["emb"], path)
    with h5py.File(path, "a") as handle:
        assert handle.attrs["normalized"]
        handle["embeddings"][11] = handle["embeddings"][11] * 100
        handle["embeddings"][9] = np.zeros(handle["embeddings"].shape[1], np.float32)
        vectors, ids = handle["embeddings"][()], handle["object_id"][()]
    reference = vectors.copy()
    reference[[9, 11]] = np.nan  # the reference treats them as unusable
    for query_row in (0, 17):
        assert main(["search", "--embeddings", str(path), "--query", str(ids[query_row]), "--k", "5"]) == 0
        captured = capsys.readouterr()
        found, cosines = neighbour_table(captured.out)
        assert found == ids[brute_force(reference, query_row, 5)[0]].tolist()
        assert max(cosines) <= 1.0 + 1e-5 and "or are not unit vectors" in captured.err
    for row, words in ((9, "an embedding of norm 0, not a unit vector"), (11, "not a unit vector")):
        assert main(["search", "--embeddings", str(path), "--query", str(ids[row])]) == 2
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------
# embed: NaN pixels, --out, kills, a full disk.
# ---------------------------------------------------------------------------


def nan_image_copy(data: Path, target: Path, rows: list[int]) -> list[int]:
    """A copy of the packed shards with the images of global ``rows`` set to NaN; their object ids.

    Consistent shards that hold NaN (as a tool other than sslsky pack, or an older one, might write): h5py's
    normal API keeps HDF5's chunk checksums valid, and the row's ``image_sum32`` checksum is updated.
    """
    shutil.copytree(data, target)
    ids = []
    for row in rows:
        shard, local = divmod(row, 16)
        with h5py.File(target / f"shard-000-{shard:05d}.h5", "a") as handle:
            image = handle["images"][local]
            image[:] = np.nan
            handle["images"][local] = image
            if "image_sum32" in handle:
                from sslsky.data.verify import row_sum32

                handle["image_sum32"][local] = row_sum32(image)
            ids.append(int(handle["object_id"][local]))
    return ids


def test_embed_refuses_nan_pixels_and_writes_nothing(tiny, tmp_path, capsys):
    ids = nan_image_copy(tiny["data"], tmp_path / "packed", [2, 20])
    out = tmp_path / "out" / "emb.h5"
    assert main(embed_args(tiny["ckpt"], tmp_path / "packed", out)) == 2
    err = capsys.readouterr().err
    assert f"non-finite features (NaN/inf) for 2 of {N} rows, object_id {ids[0]}, {ids[1]}" in err
    assert "NaN/inf pixels" in err and "pack them again" in err
    assert not out.exists() and not list(out.parent.iterdir()), "a refused embed left files"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_refuse_nan_pixels_alike(tiny, tmp_path):
    # The NaN image is in rank 1's half only: rank 0 must stop with the same message, not write a file.
    ids = nan_image_copy(tiny["data"], tmp_path / "packed", [20])
    out = tmp_path / "emb.h5"
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "sslsky", *embed_args(tiny["ckpt"], tmp_path / "packed",
                                                                                   out)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], "\n".join(outs)
    messages = [next(line for line in text.splitlines() if "data error" in line) for text in outs]
    assert messages[0] == messages[1] and f"for 1 of {N} rows, object_id {ids[0]}" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_embed_out_is_checked_before_any_work(tiny, tmp_path, capsys):
    # A checkpoint and data that do not exist: had anything been started, they would be the error.
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["embed", "--ckpt", str(tmp_path / "none.pt"), "--data", str(tmp_path / "none"),
                 "--out", str(folder)]) == 2
    assert f"out='{folder}' is a folder" in capsys.readouterr().err
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        assert main(["embed", "--ckpt", str(tmp_path / "none.pt"), "--data", str(tmp_path / "none"),
                     "--out", str(mount / "emb.h5")]) == 2
        assert "read-only" in capsys.readouterr().err


def test_sigkill_mid_embed_leaves_nothing_and_the_rerun_completes(tiny, tmp_path, capsys):
    out = tmp_path / "emb.h5"
    args = embed_args(tiny["ckpt"], tiny["data"], out, "batch_size=1")  # 30 batches: a long loop to land in
    assert main(args) == 0
    reference = read_all(out)
    out.unlink()
    capsys.readouterr()
    rng = np.random.default_rng(11)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed_mid_run = []
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if attempt == 0:  # somewhere in the embedding loop (~0.25 s): once the part file is there
                deadline = time.monotonic() + 60
                while not stale_files(out) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.1))
            else:  # anywhere from the start (imports, loading, the loop, the rename, the exit)
                time.sleep(rng.uniform(0.5, 4.0))
            proc.send_signal(signal.SIGKILL)
        finally:
            err = proc.communicate(timeout=60)[1]
        assert proc.returncode in (0, -signal.SIGKILL), f"embed failed by itself (exit {proc.returncode}):\n{err}"
        if out.exists():  # the kill came after the rename (or the run had finished): the file must be whole
            assert_same_file(read_all(out), reference)
            out.unlink()
        elif proc.returncode == -signal.SIGKILL:
            killed_mid_run.append(attempt)
            if attempt == 0:  # killed in the loop: its part file is what is left
                assert stale_files(out), "killed in the loop before the rename, yet no part file"
    assert killed_mid_run, "no kill landed before the rename; the test did not test anything"
    stale = stale_files(out)
    assert main(args) == 0
    err = capsys.readouterr().err
    if stale:
        assert f"removed {len(stale)} stale temporary file(s) of an interrupted embed" in err
    assert not stale_files(out)
    assert_same_file(read_all(out), reference)


def assert_same_file(got: dict, reference: dict) -> None:
    """Every dataset and attribute equal (bit for bit: the same process settings and batches)."""
    assert got.keys() == reference.keys()
    for name in got:
        if name != "attrs":
            np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    assert got["attrs"].keys() == reference["attrs"].keys()
    assert all(np.all(got["attrs"][key] == reference["attrs"][key]) for key in got["attrs"])


def test_full_disk_names_the_disk_and_leaves_no_partial_file(tiny, tmp_path, capsys):
    vectors = N * 512 * 4  # 61,440 bytes of embeddings; the whole file is about 73 kB
    # Too small for the vectors: refused once the encoder is loaded, before the loop.
    with tmpfs(tmp_path / "small", "size=32k") as mount:
        assert main(embed_args(tiny["ckpt"], tiny["data"], mount / "emb.h5")) == 2
        err = capsys.readouterr().err
        assert f"the disk holding {mount} has 32 KiB free; nothing was computed or written" in err
        assert not list(mount.iterdir())
    # Room for the vectors, not for the whole file: ENOSPC while writing, the partial file removed.
    with tmpfs(tmp_path / "full", "size=64k") as mount:
        assert vectors <= shutil.disk_usage(mount).free
        assert main(embed_args(tiny["ckpt"], tiny["data"], mount / "emb.h5")) == 2
        err = capsys.readouterr().err
        assert f"no space left on the disk holding {mount}" in err and "the partial file was removed" in err
        assert not list(mount.iterdir()), "partial file left on the full disk"
        # The disk is usable again for what fits.
        (mount / "probe").write_bytes(b"x" * 1000)


# ---------------------------------------------------------------------------
# Broken inputs: a message naming the file and the fix, exit 2.
# ---------------------------------------------------------------------------


def broken_file(kind: str, source: Path, path: Path) -> Path:
    """An embeddings file damaged in one way."""
    if kind == "truncated":
        path.write_bytes(source.read_bytes()[:20000])
    elif kind == "not_hdf5":
        path.write_text("object_id,z\n1,0.1\n")
    elif kind.startswith("no_"):
        shutil.copy(source, path)
        with h5py.File(path, "a") as handle:
            del handle[kind[3:]]
    elif kind == "short_column":
        shutil.copy(source, path)
        with h5py.File(path, "a") as handle:
            del handle["z"]
            handle["z"] = np.zeros(3, np.float32)
    elif kind == "flat_embeddings":
        shutil.copy(source, path)
        with h5py.File(path, "a") as handle:
            del handle["embeddings"]
            handle["embeddings"] = np.zeros(N, np.float32)
    return path


@pytest.mark.parametrize(("kind", "words"), [
    ("missing", "does not exist"), ("truncated", "is not readable HDF5"), ("not_hdf5", "is not readable HDF5"),
    ("no_object_id", "has no object_id dataset"), ("no_z", "has no z dataset"),
    ("no_morph_class", "has no morph_class dataset"), ("no_embeddings", "is not an sslsky embeddings file"),
    ("short_column", "'z' has shape (3,)"), ("flat_embeddings", "not (N, F) floats"),
])
def test_broken_embeddings_files_are_named(kind, words, tiny, tmp_path, capsys):
    path = broken_file(kind, tiny["emb"], tmp_path / "emb.h5")
    for extra in (["--query", "1003"], ["--evaluate"]):
        assert main(["search", "--embeddings", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and str(path) in err and "Traceback" not in err


def test_wrong_queries_checkpoints_and_data_are_messages(tiny, tmp_path, capsys):
    emb, folder = str(tiny["emb"]), tmp_path / "a_folder"
    folder.mkdir()
    text_ckpt = tmp_path / "encoder.txt"
    text_ckpt.write_text("not a checkpoint\n")
    cases = [
        (["search", "--embeddings", emb, "--query", "J000411.19+020924.0"], "is not an integer"),
        (["search", "--embeddings", emb, "--query", "424242"], "object_id 424242 not in"),
        (["search", "--embeddings", emb, "--query", "1003", "--k", str(N)], f"holds {N} rows"),
        (["search", "--embeddings", str(folder), "--query", "1003"], "is a folder"),
        (["search", "--embeddings", emb, "--query", "1003", "--png", str(folder)], "png="),
        (["search", "--embeddings", emb, "--evaluate", f"eval_json={folder}"], "eval_json="),
        (["search", "--embeddings", emb, "--query", "1003", "device=gpu0"], "device='gpu0'"),
        (["search", "--embeddings", emb, "--query", "1003", "--png", str(tmp_path / "g.png"), "--data",
          str(tmp_path / "none")], "cannot read the shards"),
        (embed_args(text_ckpt, tiny["data"], tmp_path / "e.h5"), f"checkpoint {text_ckpt} cannot be read"),
        (embed_args(folder, tiny["data"], tmp_path / "e.h5"), "is a folder: give the file"),
        (embed_args(tiny["ckpt"], tmp_path / "none", tmp_path / "e.h5"), f"{tmp_path / 'none'}"),
        (embed_args(tiny["ckpt"], tiny["data"], tmp_path / "e.h5", "device=tpu"), "device='tpu'"),
        (embed_args(tiny["ckpt"], tiny["data"], text_ckpt / "e.h5"), "is a file, not a folder"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err, (argv, err)
    assert not (tmp_path / "e.h5").exists()


def test_inputs_the_checks_must_not_refuse(tiny, tmp_path, capsys):
    # A file without the optional index column still searches (images found by object_id for --png).
    path = broken_file("no_index", tiny["emb"], tmp_path / "emb.h5")
    assert main(["search", "--embeddings", str(path), "--query", "1003", "--k", "3", "--png",
                 str(tmp_path / "grid.png"), "--data", str(tiny["data"])]) == 0
    assert (tmp_path / "grid.png").is_file() and "skipped" not in capsys.readouterr().err
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == EMBEDDINGS_FORMAT


def test_a_file_that_does_not_say_it_is_normalised_is_searched_by_cosine(tiny, tmp_path, capsys):
    """Rows of any norm in a file without ``normalized``: the scores printed are cosines (never above 1) and the
    neighbours those of the normalised rows; a zero query is refused."""
    path = tmp_path / "raw.h5"
    shutil.copy(tiny["emb"], path)
    rng = np.random.default_rng(1)
    with h5py.File(path, "a") as handle:
        del handle.attrs["normalized"]
        unit, ids = handle["embeddings"][()], handle["object_id"][()]
        handle["embeddings"][...] = unit * rng.uniform(0.5, 5.0, (len(unit), 1)).astype(np.float32)
        handle["embeddings"][4] = np.zeros(unit.shape[1], np.float32)
    reference = unit.copy()
    reference[4] = np.nan
    assert main(["search", "--embeddings", str(path), "--query", str(ids[0]), "--k", "5"]) == 0
    found, cosines = neighbour_table(capsys.readouterr().out)
    assert found == ids[brute_force(reference, 0, 5)[0]].tolist() and max(cosines) <= 1.0 + 1e-5
    assert main(["search", "--embeddings", str(path), "--query", str(ids[4])]) == 2
    assert "not a unit vector" in capsys.readouterr().err
