"""``sslsky pack``: round trips, catalog formats, cutout kinds, MPI ranks, resume after SIGKILL."""

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
from astropy.io import fits
from astropy.table import Table
from conftest import BANDS, SIZE, VOTE_COLUMNS, galaxy_cube, pack_args, read_packed
from PIL import Image

from sslsky.cli import main
from sslsky.data.pack import FLOAT16_TINY, SLEEP_ENV, shard_glob
from sslsky.data.schema import (
    LEGACY_LAYOUT,
    MANIFEST_NAME,
    PACK_KEY_ATTR,
    REJECTED_FIELDS,
    REJECTED_NAME,
    SHARD_COLUMNS,
    VOTES_COLUMNS_ATTR,
)

REPO = Path(__file__).resolve().parents[1]
SSLSKY = str(REPO / ".venv" / "bin" / "sslsky") if (REPO / ".venv" / "bin" / "sslsky").exists() else "sslsky"
MPIRUN = shutil.which("mpirun")
MPI_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def fits_pixels(path: Path) -> np.ndarray:
    return fits.getdata(path).astype(np.float32)


def rejected_rows(out: Path) -> list[dict]:
    with open(out / REJECTED_NAME, newline="") as handle:
        return list(csv.DictReader(handle))


def test_round_trip_float32(survey, tmp_path):
    out = tmp_path / "packed"
    assert main(pack_args(survey, out, "--shard-size", "8")) == 0
    packed = read_packed(out)
    manifest = packed["manifest"]
    table = Table.read(survey)
    n = len(table)

    assert manifest["counts"] == {"input_rows": n, "packed": n, "rejected": 0}
    assert [entry["rows"] for entry in manifest["shards"]] == [8, 8, 8, 6]
    for entry in manifest["shards"]:  # checksums are those of the files
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["bands"] == BANDS and manifest["survey"] == "sdss" and manifest["photometric"] is True
    assert manifest["image_shape"] == [5, SIZE, SIZE] and manifest["dtype"] == "float32"
    assert manifest["float16_error"] is None
    assert manifest["config"]["shard_size"] == 8 and manifest["sslsky_version"]
    assert (out / "config.yaml").is_file()
    assert [row for row in csv.reader(open(out / REJECTED_NAME))] == [list(REJECTED_FIELDS)]

    # Pixels equal the FITS pixels exactly, metadata equals the catalog.
    assert packed["images"].dtype == np.float32 and packed["images"].shape == (n, 5, SIZE, SIZE)
    for i in range(n):
        np.testing.assert_array_equal(packed["images"][i], fits_pixels(survey.parent / table["file"][i]))
    np.testing.assert_array_equal(packed["catalog_row"], np.arange(n))
    np.testing.assert_array_equal(packed["object_id"], table["object_id"])
    np.testing.assert_array_equal(packed["ra"], table["ra"])
    np.testing.assert_array_equal(packed["dec"], table["dec"])
    np.testing.assert_array_equal(packed["z"], table["z"].astype(np.float32))
    np.testing.assert_array_equal(packed["ebv"], table["ebv"].astype(np.float32))
    np.testing.assert_array_equal(packed["morph_class"], table["morph_class"])
    np.testing.assert_array_equal(packed["filled_pixels"], 0)
    for name, dtype in SHARD_COLUMNS.items():
        assert packed[name].dtype == dtype, name
    np.testing.assert_array_equal(packed["votes"], np.stack([table[c] for c in VOTE_COLUMNS], axis=1))
    np.testing.assert_array_equal(packed["psf_fwhm"], np.stack([table[f"psf_fwhm_{b}"] for b in BANDS], axis=1))
    np.testing.assert_array_equal(packed["sky_sigma"], np.stack([table[f"sky_sigma_{b}"] for b in BANDS], axis=1))
    with h5py.File(out / manifest["shards"][0]["path"], "r") as handle:
        assert list(handle["votes"].attrs[VOTES_COLUMNS_ATTR]) == list(VOTE_COLUMNS)
        assert handle["images"].chunks == (1, 5, SIZE, SIZE)
        assert handle.attrs["bands"] == BANDS and handle.attrs["survey"] == "sdss"
        assert handle.attrs["pixel_scale"] == pytest.approx(0.396) and handle.attrs["schema_version"] == 1
        assert bool(handle.attrs["photometric"]) is True

    # Statistics: all 30 cutouts sampled here; independent numpy computation over the same pixels.
    stats = manifest["stats"]
    assert stats["n_cutouts"] == n
    step = max(1, SIZE * SIZE // 256)
    pixels = packed["images"].reshape(n, 5, -1)[:, :, ::step].transpose(1, 0, 2).reshape(5, -1).astype(np.float64)
    median = np.median(pixels, axis=1)
    np.testing.assert_allclose(stats["median"], median)
    np.testing.assert_allclose(stats["sigma_mad"], 1.4826 * np.median(np.abs(pixels - median[:, None]), axis=1))
    np.testing.assert_allclose(stats["p01"], np.percentile(pixels, 1, axis=1))
    np.testing.assert_allclose(stats["p99"], np.percentile(pixels, 99, axis=1))


def test_round_trip_float16_and_reported_error(survey, tmp_path):
    out = tmp_path / "packed16"
    assert main(pack_args(survey, out, "--dtype", "float16")) == 0
    packed = read_packed(out)
    table = Table.read(survey)
    exact = np.stack([fits_pixels(survey.parent / f) for f in table["file"]]).astype(np.float64)
    assert packed["images"].dtype == np.float16
    stored = packed["images"].astype(np.float64)
    error = np.abs(stored - exact)
    normal = np.abs(exact) >= np.finfo(np.float16).smallest_normal
    relative = error[normal] / np.abs(exact[normal])
    assert relative.max() <= 2.0**-11  # float16 rounding: half a unit in the last of 10 mantissa bits
    report = packed["manifest"]["float16_error"]
    assert report["max_relative_error"] == pytest.approx(relative.max(), rel=1e-12)
    assert report["max_absolute_error"] == pytest.approx(error.max(), rel=1e-12)
    assert FLOAT16_TINY == np.finfo(np.float16).smallest_normal


def test_csv_ecsv_and_file_loc_catalogs_pack_the_same(survey, tmp_path):
    assert main(pack_args(survey, tmp_path / "ref")) == 0
    reference = read_packed(tmp_path / "ref")
    table = Table.read(survey)
    table.write(survey.parent / "catalog.csv", format="ascii.csv")
    table.write(survey.parent / "catalog.ecsv", format="ascii.ecsv")
    gz = table.copy()
    gz.rename_column("file", "file_loc")  # Galaxy Zoo convention
    gz.write(survey.parent / "catalog_gz.fits")
    for name in ("catalog.csv", "catalog.ecsv", "catalog_gz.fits"):
        out = tmp_path / name.replace(".", "_")
        assert main(pack_args(survey.parent / name, out)) == 0, name
        packed = read_packed(out)
        for key in ("images", "object_id", "ra", "dec", "z", "ebv", "morph_class", "votes", "psf_fwhm"):
            np.testing.assert_array_equal(packed[key], reference[key], err_msg=f"{name}: {key}")


def test_sdss_one_file_per_band(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "sdss_frames"
    (root / "frames").mkdir(parents=True)
    cubes, files = [], []
    for i in range(5):
        cube = galaxy_cube(rng)
        for b, band in enumerate(BANDS):
            fits.PrimaryHDU(cube[b]).writeto(root / "frames" / f"frame-{band}-{i:04d}.fits")
        cubes.append(cube)
        files.append(f"frames/frame-{{band}}-{i:04d}.fits")
    Table({"object_id": np.arange(5), "ra": np.ones(5), "dec": np.ones(5), "file": files}).write(root / "cat.fits")
    out = tmp_path / "packed"
    assert main(pack_args(root / "cat.fits", out, "survey=sdss")) == 0
    packed = read_packed(out)
    np.testing.assert_array_equal(packed["images"], np.stack(cubes))
    assert packed["manifest"]["bands"] == BANDS and packed["manifest"]["photometric"] is True
    np.testing.assert_array_equal(packed["z"], np.float32(np.nan))  # optional columns filled


def test_png_and_jpeg_cutouts_are_not_photometric(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "gz"
    root.mkdir()
    arrays, files = [], []
    for i in range(4):
        rgb = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        suffix = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(rgb).save(root / f"img{i}.{suffix}")
        arrays.append(rgb)
        files.append(f"img{i}.{suffix}")
    Table({"object_id": np.arange(4), "ra": np.ones(4), "dec": np.ones(4), "file_loc": files}).write(root / "c.csv")
    out = tmp_path / "packed"
    assert main(["pack", "--catalog", str(root / "c.csv"), "--out", str(out), "progress=false"]) == 0
    packed = read_packed(out)
    manifest = packed["manifest"]
    assert manifest["photometric"] is False and manifest["bands"] == "RGB"
    assert manifest["image_shape"] == [3, SIZE, SIZE]
    assert all(bool(a["photometric"]) is False for a in packed["attrs"])
    np.testing.assert_array_equal(packed["images"][0], np.moveaxis(arrays[0], -1, 0).astype(np.float32))  # PNG exact
    np.testing.assert_array_equal(packed["images"][2], np.moveaxis(arrays[2], -1, 0).astype(np.float32))
    jpeg = np.asarray(Image.open(root / "img1.jpg"), dtype=np.float32)
    np.testing.assert_array_equal(packed["images"][1], np.moveaxis(jpeg, -1, 0))  # what Pillow decodes
    assert packed["images"].min() >= 0 and packed["images"].max() <= 255


@pytest.mark.parametrize("channels_last", [False, True])
def test_legacy_ssl_sky_surveys_hdf5(tmp_path, channels_last):
    rng = np.random.default_rng(5)
    n = 6
    cubes = np.stack([galaxy_cube(rng) for _ in range(n)])  # (N, C, H, W)
    path = tmp_path / "sdss_legacy.h5"
    columns = {"specz_redshift": rng.uniform(0, 0.3, n), "e_bv": rng.uniform(0, 0.1, n),
               "ObjID": np.arange(587722981742084000, 587722981742084000 + n), "ra": rng.uniform(0, 360, n),
               "dec": rng.uniform(-10, 60, n)}
    assert set(columns) | {"images"} == set(LEGACY_LAYOUT)
    with h5py.File(path, "w") as handle:
        handle["images"] = np.moveaxis(cubes, 1, -1) if channels_last else cubes
        for name, values in columns.items():
            handle[name] = values
    out = tmp_path / "packed"
    assert main(pack_args(path, out)) == 0
    packed = read_packed(out)
    np.testing.assert_array_equal(packed["images"], cubes)
    np.testing.assert_array_equal(packed["object_id"], columns["ObjID"])
    np.testing.assert_array_equal(packed["z"], columns["specz_redshift"].astype(np.float32))
    np.testing.assert_array_equal(packed["ebv"], columns["e_bv"].astype(np.float32))
    np.testing.assert_array_equal(packed["ra"], columns["ra"])
    assert packed["manifest"]["survey"] == "sdss"


def test_shard_reader_reads_the_pack(survey, tmp_path):
    pytest.importorskip("torch")
    from sslsky.data.shards import ShardDataset

    out = tmp_path / "packed"
    assert main(pack_args(survey, out, "--shard-size", "7")) == 0
    dataset = ShardDataset(out)
    table = Table.read(survey)
    assert len(dataset) == len(table)
    item = dataset[9]
    np.testing.assert_array_equal(item["image"].numpy(), fits_pixels(survey.parent / table["file"][9]))
    assert item["object_id"] == table["object_id"][9]


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
def test_two_mpi_ranks_equal_one(survey, tmp_path):
    # A few bad rows too, so rejections from both ranks are merged.
    table = Table.read(survey)
    (survey.parent / table["file"][3]).write_bytes(b"")
    (survey.parent / table["file"][25]).unlink()
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(pack_args(survey, one, "--shard-size", "4", "stats_sample=11")) == 3
    result = subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", SSLSKY,
                             *pack_args(survey, two, "--shard-size", "4", "stats_sample=11")],
                            capture_output=True, text=True, env=MPI_ENV, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    a, b = read_packed(one), read_packed(two)
    assert b["manifest"]["ranks"] == 2 and {e["rank"] for e in b["manifest"]["shards"]} == {0, 1}
    for key in ("images", "catalog_row", "object_id", "ra", "dec", "z", "ebv", "votes", "psf_fwhm", "filled_pixels"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["manifest"]["stats"] == b["manifest"]["stats"]
    assert a["manifest"]["counts"] == b["manifest"]["counts"] == {"input_rows": 30, "packed": 28, "rejected": 2}
    assert (one / REJECTED_NAME).read_text() == (two / REJECTED_NAME).read_text()


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob(shard_glob()))


def test_resume_after_sigkill_equals_uninterrupted_pack(survey, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    args = pack_args(survey, out, "--shard-size", "3")
    assert main(pack_args(survey, reference, "--shard-size", "3")) == 0

    env = {**os.environ, SLEEP_ENV: "0.05"}  # 30 cutouts x 0.05 s: time to kill it half-way
    process = subprocess.Popen([sys.executable, "-m", "sslsky", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not len(_shard_files(out)) >= 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the pack finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()

    finished = _shard_files(out)
    assert 1 <= len(finished) < 10 and not (out / MANIFEST_NAME).exists()
    for path in finished:  # every file that looks like a shard is whole and equals the reference's
        assert path.read_bytes() == (reference / path.name).read_bytes()
        with h5py.File(path, "r") as handle:
            assert PACK_KEY_ATTR in handle.attrs
    leftovers = [p for p in out.iterdir() if p not in finished]
    assert all(p.name.startswith(".") and ".tmp" in p.name for p in leftovers), leftovers

    result = subprocess.run([sys.executable, "-m", "sslsky", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(finished)} finished shard(s)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    a, b = (json.loads((d / MANIFEST_NAME).read_text()) for d in (reference, out))
    for manifest in (a, b):
        manifest.pop("created")
        manifest["config"].pop("out")
    assert a == b  # same shards, checksums, statistics, counts and config


def test_fits_reader_fast_path_and_astropy_fallback_agree(tmp_path):
    from sslsky.data.fits_io import _read_simple_fits, read_fits_cube, write_cutout

    rng = np.random.default_rng(6)
    cube = galaxy_cube(rng)
    plain = write_cutout(tmp_path / "plain.fits", cube, BANDS, 0.396, 10.0, 20.0, "sdss")
    assert _read_simple_fits(plain) is not None  # the cutout-service shape takes the fast path
    cutout = read_fits_cube(plain)
    np.testing.assert_array_equal(cutout.data, cube)
    assert (cutout.bands, cutout.pixel_scale, cutout.survey) == (BANDS, 0.396, "sdss")

    scaled = tmp_path / "scaled.fits"  # int16 with BSCALE/BZERO: astropy applies the scaling
    hdu = fits.PrimaryHDU(cube.copy())  # scale() works in place
    hdu.header["BANDS"] = "ugriz"
    hdu.scale("int16", bscale=0.001, bzero=1.0)
    hdu.writeto(scaled)
    assert _read_simple_fits(scaled) is None
    np.testing.assert_allclose(read_fits_cube(scaled).data, cube, atol=0.001)

    compressed = tmp_path / "compressed.fits.fz"  # data in a tile-compressed extension
    header = fits.Header({"BANDS": "ugriz", "PIXSCALE": 0.396})
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(cube, header=header, compression_type="GZIP_2",
                                                      quantize_level=0.0)]).writeto(compressed)
    result = read_fits_cube(compressed)
    np.testing.assert_array_equal(result.data, cube)
    assert result.bands == BANDS and result.pixel_scale == 0.396
