"""Faults in packed data: damaged, truncated and missing shards and manifests, kills mid-pack, bad catalog values.

Real h5py files damaged in place (the bytes of one image chunk, found with ``get_chunk_info_by_coord``), real
``sslsky`` commands (``sslsky.cli.main`` in-process, a subprocess where it is killed). Each probe checks that the
damage is reported as a data error naming the file (and row) and the fix, never as a training problem or a
result; that ``sslsky verify`` finds it (exit 2); and that ``sslsky pack`` again rewrites what is damaged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.table import Table
from conftest import REPO, make_survey, pack_args, read_packed, tiny_pretrain_args

from sslsky.cli import main
from sslsky.data.pack import band_statistics
from sslsky.data.schema import MANIFEST_NAME, REJECTED_NAME
from sslsky.data.shards import ShardDataset, index_shards
from sslsky.data.verify import check_shard
from sslsky.errors import DataError, user_message

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 32  # galaxies: four shards of 8
SHARD_SIZE = 8
#: Overrides of config/pretrain_tiny.yaml for the 16x16 test cutouts: two steps, workers reading the shards.
PRETRAIN = ("augment.geometry.crop_size=12", "augment.geometry.rotation=right", "augment.geometry.jitter=0",
            "optim.total_steps=2", "data.batch_size=4", "model.moco.queue_size=8", "checkpoint_every=2", "val_every=2",
            "log_every=1")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Path:
    """A survey of N cutouts, its clean pack, and an encoder pretrained on it (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("faults")
    catalog = make_survey(root / "survey", n=N, seed=3)
    assert main(pack_args(catalog, root / "packed", "--shard-size", str(SHARD_SIZE))) == 0
    assert main(tiny_pretrain_args(root / "packed", root / "run", *PRETRAIN)) == 0
    return root


@pytest.fixture
def work(master, tmp_path) -> Path:
    """A private copy of the survey and its pack (``work / "survey" / "catalog.fits"``, ``work / "packed"``)."""
    for name in ("survey", "packed"):
        shutil.copytree(master / name, tmp_path / name)
    return tmp_path


def repack(work: Path) -> int:
    return main(pack_args(work / "survey" / "catalog.fits", work / "packed", "--shard-size", str(SHARD_SIZE)))


def shard(work: Path, index: int) -> Path:
    return work / "packed" / f"shard-000-{index:05d}.h5"


def damage_chunk(path: Path, row: int, how: str) -> None:
    """Overwrite the stored bytes of one image chunk in place (same file size): random bytes or zeros."""
    with h5py.File(path, "r") as handle:
        info = handle["images"].id.get_chunk_info_by_coord((row, 0, 0, 0))
    data = os.urandom(info.size) if how == "random" else bytes(info.size)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset)
        handle.write(data)


def train_row(work: Path, shard_index: int) -> tuple[int, int]:
    """(global row, row in shard) of a row of the train split in shard ``shard_index``."""
    ds = ShardDataset(work / "packed", split="train")
    for g in ds.indices:
        s, row = ds.locate(int(g))
        if s == shard_index:
            return int(g), row
    raise AssertionError("no train row in that shard")


def assert_names_damage(text: str, path: Path, row: int | None = None) -> None:
    assert str(path) in text and "sslsky pack" in text and "Traceback" not in text, text
    if row is not None:
        assert f"row {row}" in text, text


@pytest.mark.parametrize("how", ["random", "zero"])
def test_a_damaged_image_chunk_is_a_data_error_everywhere_and_pack_rewrites_it(work, master, how, capsys):
    g, row = train_row(work, 1)
    path = shard(work, 1)
    size = path.stat().st_size
    damage_chunk(path, row, how)
    assert path.stat().st_size == size

    # Opening is cheap and passes (size and rows as in the manifest); reading the row is a DataError.
    ds = ShardDataset(work / "packed")
    with pytest.raises(DataError) as err:
        ds.read_image(g)
    assert_names_damage(str(err.value), path, row)
    assert "differs from its checksum" in str(err.value)
    ds.read_image(g + 1 if g + 1 < ds.offsets[2] else g - 1)  # the other rows still read

    # From DataLoader worker processes: the original message comes through.
    from torch.utils.data import DataLoader

    with pytest.raises(DataError) as err:
        for _ in DataLoader(ds, batch_size=8, num_workers=2):
            pass
    assert_names_damage(user_message(err.value), path, row)

    # Pretraining (2 workers) and embedding stop with a data error naming the shard, not a divergence.
    capsys.readouterr()
    assert main(tiny_pretrain_args(work / "packed", work / "run", *PRETRAIN, "data.num_workers=2",
                                   "optim.total_steps=8")) == 2
    text = capsys.readouterr().err
    assert "sslsky pretrain: data error: shard" in text and "base_lr" not in text, text
    assert_names_damage(text, path, row)
    assert main(["embed", "--ckpt", str(master / "run" / "encoder.pt"), "--data", str(work / "packed"),
                 "--out", str(work / "emb.h5"), "progress=false", "device=cpu", "num_workers=0"]) == 2
    text = capsys.readouterr().err
    assert "data error" in text and not (work / "emb.h5").exists(), text
    assert_names_damage(text, path, row)

    # verify finds it; pack again rewrites exactly that shard, then everything verifies and equals the clean pack.
    assert main(["verify", str(work / "packed")]) == 2
    text = capsys.readouterr().err
    assert f"DAMAGED {path}: sha256 differs" in text and text.count("DAMAGED") == 1 and "sslsky pack" in text, text
    assert f"row {row} differs from its checksum" in text
    assert repack(work) == 0
    text = capsys.readouterr()
    assert f"rewriting {path.name}: it is damaged" in text.err and "skipped 3 finished shard(s)" in text.out
    assert main(["verify", str(work / "packed")]) == 0
    for i in range(4):
        assert sha256(shard(work, i)) == sha256(shard(master, i))
    stats = json.loads((work / "packed" / MANIFEST_NAME).read_text())["stats"]
    assert np.isfinite(stats["median"]).all() and (np.asarray(stats["sigma_mad"]) > 0).all()
    assert stats == json.loads((master / "packed" / MANIFEST_NAME).read_text())["stats"]


def test_a_truncated_shard_is_named_and_rewritten(work, capsys):
    path = shard(work, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:  # the folder: the size differs from the manifest's
        ShardDataset(work / "packed")
    assert_names_damage(str(err.value), path)
    assert f"{len(data) // 2} bytes, the manifest says {len(data)}" in str(err.value)
    with pytest.raises(DataError) as err:  # the file alone: not readable
        ShardDataset(path)
    assert_names_damage(str(err.value), path)
    assert main(["verify", str(work / "packed")]) == 2
    assert f"DAMAGED {path}: size {len(data) // 2} bytes" in capsys.readouterr().err
    assert repack(work) == 0
    assert "rewriting shard-000-00002.h5: it is damaged" in capsys.readouterr().err
    assert main(["verify", str(work / "packed")]) == 0


def test_a_missing_shard_is_named_and_rewritten(work, capsys):
    path = shard(work, 3)
    path.unlink()
    with pytest.raises(DataError) as err:
        index_shards(work / "packed")
    assert isinstance(err.value, FileNotFoundError)  # as callers caught before
    assert_names_damage(str(err.value), path)
    capsys.readouterr()
    assert main(tiny_pretrain_args(work / "packed", work / "run", *PRETRAIN)) == 2
    text = capsys.readouterr().err
    assert "sslsky pretrain: data error:" in text and f"shard {path} in the manifest is missing" in text, text
    assert main(["verify", str(work / "packed")]) == 2
    assert f"DAMAGED {path}: missing" in capsys.readouterr().err
    assert repack(work) == 0
    assert main(["verify", str(work / "packed")]) == 0


def test_a_truncated_or_foreign_manifest_is_a_data_error(work, master, capsys):
    manifest = work / "packed" / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 3])
    with pytest.raises(DataError, match="manifest.json cannot be read as JSON"):
        ShardDataset(work / "packed")
    capsys.readouterr()
    assert main(tiny_pretrain_args(work / "packed", work / "run", *PRETRAIN)) == 2
    err = capsys.readouterr().err
    assert "data error" in err and str(manifest) in err and "votes" not in err and "Traceback" not in err, err
    assert main(["verify", str(work / "packed")]) == 2
    assert f"DAMAGED {manifest}" in capsys.readouterr().err
    manifest.write_text("[1, 2, 3]\n")
    with pytest.raises(DataError, match="not an sslsky manifest"):
        ShardDataset(work / "packed")
    # pack again writes it again (the shards verify by their checksums and are kept)
    assert repack(work) == 0
    assert "skipped 4 finished shard(s)" in capsys.readouterr().out
    assert json.loads(manifest.read_text())["shards"] == json.loads(
        (master / "packed" / MANIFEST_NAME).read_text())["shards"]
    assert main(["verify", str(work / "packed")]) == 0


def test_swapped_shards_of_equal_size_are_named(work, capsys):
    """Two shards of one pack with the same size and rows, swapped by name: readers refuse them at open (the pack
    key of each file against its manifest entry), before any image is read."""
    first, second = shard(work, 0), shard(work, 1)
    assert first.stat().st_size == second.stat().st_size
    swap = first.with_name("swap.h5")
    first.rename(swap)
    second.rename(first)
    swap.rename(second)
    with pytest.raises(DataError, match="is not the shard its manifest entry describes"):
        ShardDataset(work / "packed")


def test_a_manifest_that_disagrees_with_a_shard_is_named(work, capsys):
    manifest_path = work / "packed" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][1]["size_bytes"] += 100
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        ShardDataset(work / "packed")
    assert_names_damage(str(err.value), shard(work, 1))
    assert "the manifest says" in str(err.value)
    manifest["shards"][1]["size_bytes"] -= 100
    manifest["shards"][1]["rows"] = 7
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 8 rows, the manifest says 7"):
        ShardDataset(work / "packed")
    manifest["shards"][1]["rows"] = 8
    manifest["stats"]["sigma_mad"][2] = float("nan")
    manifest_path.write_text(json.dumps(manifest))
    assert main(["verify", str(work / "packed")]) == 2
    assert "stats.sigma_mad is not finite" in capsys.readouterr().err


def test_old_shards_without_checksums_are_read_and_verified_by_sha256(work, capsys):
    """A shard packed before Fletcher32 (no filter, no size in the manifest) still reads; verify uses its sha256."""
    path = shard(work, 0)
    old = path.with_name("old.h5")
    with h5py.File(path, "r") as src, h5py.File(old, "w") as dst:
        for name, dataset in src.items():
            if name == "image_sum32":  # not in shards of that time
                continue
            dst.create_dataset(name, data=dataset[()], chunks=dataset.chunks if name == "images" else None)
            dst[name].attrs.update(dict(dataset.attrs))
        dst.attrs.update(dict(src.attrs))
    os.replace(old, path)
    manifest_path = work / "packed" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["shards"][0]["size_bytes"]
    manifest["shards"][0]["sha256"] = sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    ds = ShardDataset(work / "packed")
    assert np.isfinite(ds.read_image(3)).all()
    assert main(["verify", str(work / "packed")]) == 0
    damage_chunk(path, 3, "random")
    ds.read_image(3)  # no checksum to catch it on read ...
    capsys.readouterr()
    assert main(["verify", str(work / "packed")]) == 2  # ... but verify does, by the manifest's sha256
    assert f"DAMAGED {path}: sha256 differs" in capsys.readouterr().err


def test_statistics_come_from_finite_pixels_and_never_become_nan():
    rng = np.random.default_rng(0)
    samples = {row: rng.normal(1.0, 0.1, (2, 64)).astype(np.float32) for row in range(4)}
    samples[1][0, :5] = np.nan
    stats = band_statistics(samples, "gr")
    assert np.isfinite(stats["median"]).all() and np.isfinite(stats["sigma_mad"]).all()
    samples = {row: np.ones((2, 64), np.float32) for row in range(4)}  # a constant band: sigma_mad = 0
    with pytest.raises(DataError, match="sigma_mad must be finite and > 0"):
        band_statistics(samples, "gr")
    samples = {0: np.full((2, 8), np.nan, np.float32)}
    with pytest.raises(DataError, match="g: median nan"):
        band_statistics(samples, "gr")


def test_values_out_of_physical_range_are_rejected_and_listed(work, capsys):
    catalog = work / "survey" / "catalog.fits"
    table = Table.read(catalog)
    bad = {0: ("ra", 400.0), 1: ("ra", -10.0), 2: ("dec", -100.0), 3: ("z", -0.5), 4: ("ebv", -1.0),
           5: ("morph_class", 99), 6: ("morph_class", -3), 7: ("z", np.inf)}
    for row, (name, value) in bad.items():
        table[name][row] = value
    table["morph_class"][8], table["z"][9], table["ebv"][10] = -1, np.nan, np.nan  # unknown: packed
    table.write(catalog, overwrite=True)
    out = work / "bad_values"
    assert main(pack_args(catalog, out)) == 3
    with (out / REJECTED_NAME).open() as handle:
        listed = {int(r["row"]): r["reason"] for r in csv.DictReader(handle)}
    assert sorted(listed) == sorted(bad)
    assert "ra, dec = 400" in listed[0] and "360 added to negative ra" in listed[1]
    assert "dec = " in listed[2] and "z = -0.5 is not a redshift" in listed[3] and "ebv = -1" in listed[4]
    assert "morph_class 99 is not a declared class (0..6" in listed[5] and "morph_class -3" in listed[6]
    assert "z = inf" in listed[7]
    packed = read_packed(out)
    assert len(packed["object_id"]) == N - len(listed)
    assert packed["morph_class"].max() <= 6 and -1 in packed["morph_class"].tolist()
    assert np.isnan(packed["z"]).any() and np.isnan(packed["ebv"]).any()


SLEEP_PER_CUTOUT = 0.05  # seconds (SSLSKY_PACK_SLEEP_PER_CUTOUT): N cutouts take 1.6 s, time to kill in


def _run_pack(work: Path, out: Path, sleep: float) -> subprocess.Popen:
    env = dict(os.environ, SSLSKY_PACK_SLEEP_PER_CUTOUT=str(sleep), OMP_NUM_THREADS="1")
    args = pack_args(work / "survey" / "catalog.fits", out, "--shard-size", "4")
    return subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_points_of_pack_then_rerun_equals_a_clean_pack(work):
    """SIGKILL ``sslsky pack`` at seeded random times while it writes shards, run it again: the same shards and
    manifest as a clean pack, and no temp file ever looks like a shard."""
    clean = work / "clean"
    proc = _run_pack(work, clean, 0.0)
    assert proc.wait(timeout=120) == 0, proc.communicate()
    proc.communicate()
    reference = json.loads((clean / MANIFEST_NAME).read_text())["shards"]
    work_seconds = N * SLEEP_PER_CUTOUT
    resumed = 0
    for seed in (1, 2, 3):
        out = work / f"killed{seed}"
        proc = _run_pack(work, out, SLEEP_PER_CUTOUT)
        deadline = time.monotonic() + 60
        while not (out.is_dir() and any(out.glob(".shard-*"))):  # the first shard is being written
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.9)) * work_seconds)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run
        proc.communicate()
        # Whatever the kill left: files named like shards are whole shards (temp files have other names).
        for path in out.glob("shard-*.h5"):
            assert check_shard(path) == [], path
        proc = _run_pack(work, out, 0.0)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        resumed += "skipped" in stdout
        assert json.loads((out / MANIFEST_NAME).read_text())["shards"] == reference  # same rows, sizes, sha256
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files left
        assert main(["verify", str(out)]) == 0
    assert resumed >= 1  # at least one re-run kept the shards finished before the kill


# ---------------------------------------------------------------------------
# A manifest that lost what the checks need; statistics that cannot normalise; full and read-only disks; temp
# files of dead packs; catalog values past float32.
# ---------------------------------------------------------------------------


def edit_manifest(work: Path, change) -> Path:
    """Apply ``change(manifest)`` to the work pack's manifest.json; its path."""
    path = work / "packed" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def assert_repack_makes_it_whole(work: Path, master: Path, capsys) -> None:
    """``sslsky pack`` again keeps the shards (they verify by their checksums), writes the manifest again: whole."""
    capsys.readouterr()
    assert repack(work) == 0
    assert "skipped 4 finished shard(s)" in capsys.readouterr().out
    assert json.loads((work / "packed" / MANIFEST_NAME).read_text())["shards"] == json.loads(
        (master / "packed" / MANIFEST_NAME).read_text())["shards"]
    assert main(["verify", str(work / "packed")]) == 0
    assert "all whole (checked: sha256 of 4/4, sizes of 4/4, per-image checksums of 4/4" in capsys.readouterr().out


def test_a_removed_shard_entry_is_damage_not_fewer_rows(work, master, capsys):
    """The shard file stays, its manifest entry goes: readers refuse (counts.packed), verify names the stray."""
    manifest = edit_manifest(work, lambda m: m["shards"].pop(1))
    with pytest.raises(DataError) as err:
        index_shards(work / "packed")
    text = str(err.value)
    assert f"{manifest} is damaged" in text and "hold 24 rows but counts.packed says 32" in text, text
    assert "sslsky pack" in text and "sslsky verify" in text
    capsys.readouterr()
    assert main(tiny_pretrain_args(work / "packed", work / "run", *PRETRAIN)) == 2
    text = capsys.readouterr().err
    assert "sslsky pretrain: data error:" in text and "counts.packed says 32" in text, text
    assert not (work / "run" / "encoder.pt").exists()
    assert main(["verify", str(work / "packed")]) == 2
    text = capsys.readouterr().err
    assert f"DAMAGED {manifest}: its 3 listed shard(s) hold 24 rows but counts.packed says 32" in text, text
    assert f"DAMAGED {shard(work, 1)}: on disk but not listed in manifest.json (stray" in text, text
    assert "all whole" not in text
    assert_repack_makes_it_whole(work, master, capsys)


@pytest.mark.parametrize("what", ["sha256", "rows", "stats", "counts"])
def test_a_manifest_without_digests_stats_or_counts_is_damage(work, master, what, capsys):
    """What the manifest does not record cannot be checked: verify says so (never "all whole"); readers that need
    statistics or counts refuse."""
    changes = {"sha256": lambda m: m["shards"][2].pop("sha256"), "rows": lambda m: m["shards"][2].pop("rows"),
               "stats": lambda m: m.pop("stats"), "counts": lambda m: m.__setitem__("counts", {})}
    manifest = edit_manifest(work, changes[what])
    capsys.readouterr()
    assert main(["verify", str(work / "packed")]) == 2
    text = capsys.readouterr()
    assert "all whole" not in text.out + text.err and "1 damaged file(s)" in text.err, text
    if what in ("sha256", "rows"):
        assert f"DAMAGED {shard(work, 2)}: its manifest entry has no {what}, so its content cannot be checked" \
            in text.err, text.err
        assert len(ShardDataset(work / "packed")) == N  # readers need neither (size and row checks stay)
    else:
        expected = "has no per-band statistics (stats)" if what == "stats" else "has no row count (counts.packed"
        assert f"DAMAGED {manifest}: {expected}" in text.err, text.err
        with pytest.raises(DataError) as err:
            ShardDataset(work / "packed")
        assert f"{manifest} is damaged: {expected}" in str(err.value) and "sslsky pack" in str(err.value)
    assert_repack_makes_it_whole(work, master, capsys)


@pytest.mark.parametrize("median, sigma", [(float("nan"), None), (None, float("nan")), (None, 0.0), (None, -1.0)])
def test_unusable_statistics_are_a_data_error_when_the_data_is_opened(work, master, median, sigma, capsys):
    """NaN / 0 / negative per-band statistics: pretrain and embed stop with a data error naming manifest.json and
    the fix (not "config error: augment: per-band sigma must be > 0", not an encoder with NaN statistics)."""
    def change(m):
        if median is not None:
            m["stats"]["median"] = [median] * 5
        if sigma is not None:
            m["stats"]["sigma_mad"] = [sigma] * 5
    manifest = edit_manifest(work, change)
    with pytest.raises(DataError) as err:
        ShardDataset(work / "packed", split="train")
    text = str(err.value)
    assert f"{manifest} is damaged: stats." in text and "sslsky verify" in text and "sslsky pack" in text, text
    capsys.readouterr()
    assert main(tiny_pretrain_args(work / "packed", work / "run", *PRETRAIN)) == 2
    text = capsys.readouterr().err
    assert f"sslsky pretrain: data error: {manifest} is damaged: stats." in text, text
    assert "config error" not in text and "augment" not in text and "Traceback" not in text, text
    assert not (work / "run" / "encoder.pt").exists()
    assert main(["embed", "--ckpt", str(master / "run" / "encoder.pt"), "--data", str(work / "packed"),
                 "--out", str(work / "emb.h5"), "progress=false", "device=cpu", "num_workers=0"]) == 2
    text = capsys.readouterr().err
    assert f"data error: {manifest} is damaged: stats." in text and not (work / "emb.h5").exists(), text
    assert main(["verify", str(work / "packed")]) == 2
    assert f"DAMAGED {manifest}: stats." in capsys.readouterr().err
    assert_repack_makes_it_whole(work, master, capsys)


def _pack_subprocess(catalog: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``sslsky pack`` in a process of its own: a crash of HDF5 (a segfault) shows as its exit status."""
    return subprocess.run([sys.executable, "-m", "sslsky", *pack_args(catalog, out, *extra)], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)


def test_a_full_disk_while_packing_is_a_message_and_the_partial_shard_is_removed(work, master, capsys):
    """A real 200 KiB tmpfs holds two of the four 80 KiB shards: exit 2 with the no-space message naming the disk,
    no partial temp file, no segfault; the whole shards stay, and a run with room keeps them."""
    from conftest import tmpfs

    with tmpfs(work / "full", "size=200k") as disk:
        out = disk / "pk"
        proc = _pack_subprocess(work / "survey" / "catalog.fits", out, "--shard-size", str(SHARD_SIZE))
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not 139 (SIGSEGV) nor 1
        assert f"sslsky pack: no space left on the disk holding {out}" in proc.stderr, proc.stderr
        assert "while writing shard" in proc.stderr and "the partial file was removed" in proc.stderr
        assert "Traceback" not in proc.stderr and "Driver write request failed" not in proc.stderr, proc.stderr
        left = sorted(p.name for p in out.iterdir())
        assert left == ["shard-000-00000.h5", "shard-000-00001.h5"], left  # whole shards only, no .tmp file
        for name in left:
            assert check_shard(out / name) == []
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        capsys.readouterr()
        assert main(pack_args(work / "survey" / "catalog.fits", out, "--shard-size", str(SHARD_SIZE))) == 0
        assert "skipped 2 finished shard(s)" in capsys.readouterr().out
        assert main(["verify", str(out)]) == 0
        for i in range(4):
            assert sha256(out / f"shard-000-{i:05d}.h5") == sha256(shard(master, i))


def test_a_full_disk_while_writing_the_manifest_is_a_message_and_leaves_no_temp_file(tmp_path):
    from conftest import tmpfs

    from sslsky.errors import DiskFullError
    from sslsky.outputs import write_text_atomic

    with tmpfs(tmp_path / "full", "size=64k") as disk:
        with pytest.raises(OSError), open(disk / "filler", "wb") as filler:
            while True:
                filler.write(bytes(4096))
                filler.flush()
        with pytest.raises(DiskFullError) as err:
            write_text_atomic(disk / MANIFEST_NAME, "x" * 20000, "manifest")
        assert f"while writing manifest {disk / MANIFEST_NAME}; the partial file was removed" in str(err.value)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_read_only_or_file_out_is_a_message_before_any_work(work, capsys):
    from conftest import tmpfs

    catalog = work / "survey" / "catalog.fits"
    with tmpfs(work / "ro", "ro,size=1m") as disk:
        for out in (disk, disk / "pk"):
            assert main(pack_args(catalog, out)) == 2
            text = capsys.readouterr().err
            assert f"sslsky pack: config error: --out='{out}'" in text and "read-only" in text, text
            assert "choose another --out" in text and "Traceback" not in text
    for out in (catalog, catalog / "pk"):
        assert main(pack_args(catalog, out)) == 2
        text = capsys.readouterr().err
        assert f"config error: --out='{out}'" in text and "is a file, not a folder" in text, text


def test_pack_removes_the_temp_files_of_dead_packs_and_says_so(work, capsys):
    """Temp files a SIGKILLed pack left (rejected.csv, manifest, config, shards) go at the next start-up, counted;
    one of a process still running is kept."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    running = subprocess.Popen(["sleep", "60"])
    try:
        packed = work / "packed"
        stale = [f".{REJECTED_NAME}.tmp{dead.pid}", f".{MANIFEST_NAME}.tmp{dead.pid}", f".config.yaml.tmp{dead.pid}",
                 f".shard-000-00001.h5.tmp{dead.pid}"]
        kept = f".{REJECTED_NAME}.tmp{running.pid}"
        for name in [*stale, kept]:
            (packed / name).write_text("partial")
        capsys.readouterr()
        assert repack(work) == 0
        text = capsys.readouterr()
        assert f"sslsky pack: removed 4 temporary file(s) left in {packed} by an earlier pack" in text.err, text.err
        assert sorted(p.name for p in packed.iterdir() if p.name.startswith(".")) == [kept]
        assert "skipped 4 finished shard(s)" in text.out
    finally:
        running.kill()
        running.wait()


def test_catalog_values_past_float32_are_reported_as_written(work):
    """z = 1e308 is rejected as "z = 1e+308" (not "z = inf"), without numpy's overflow warning."""
    import warnings

    from sslsky.data.catalog import read_catalog

    catalog = work / "survey" / "catalog.fits"
    table = Table.read(catalog)
    table["z"][0], table["ebv"][1], table["z"][2] = 1e308, 1e39, -1e300
    table.write(catalog, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cat = read_catalog(catalog)
    reasons = {row: reason for row, _, _, reason in cat.rejected}
    assert reasons == {0: "z = 1e+308 is not a redshift (z >= 0; NaN if unknown)",
                       1: "ebv = 1e+39 is not an E(B-V) (>= 0; NaN if unknown)",
                       2: "z = -1e+300 is not a redshift (z >= 0; NaN if unknown)"}, reasons
    assert 0 not in cat.valid_rows and len(cat.valid_rows) == N - 3


def test_a_pack_whose_statistics_sample_was_all_rejected_writes_no_manifest(work, capsys):
    """Readers refuse a manifest without statistics, so pack never writes one: stats_sample=1 and that cutout bad."""
    from sslsky.data.catalog import read_catalog
    from sslsky.data.pack import stats_rows

    catalog = work / "survey" / "catalog.fits"
    cat = read_catalog(catalog)
    (row,) = stats_rows(cat.valid_rows, 1)
    Path(cat.cutout_path(int(row))).write_bytes(b"not a FITS file")
    out = work / "few_stats"
    assert main(pack_args(catalog, out, "stats_sample=1")) == 2
    text = capsys.readouterr().err
    assert "data error: none of the 1 cutout(s) sampled for the per-band statistics could be packed" in text, text
    assert not (out / MANIFEST_NAME).exists()


def test_verify_of_a_folder_that_is_no_pack_says_so(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a pack" in err and "DAMAGED" not in err
