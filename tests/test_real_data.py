"""Real data in: text ids, Parquet catalogs, resampling at pack time, 8-bit colour shards, Legacy Survey FITS shapes.

Inputs are written here with astropy, Pillow, pyarrow and h5py (not the mock), and every check is against an
independent NumPy / Pillow / hashlib computation. The last tests attack ``sslsky pack`` with broken inputs:
each must be a clear message naming the file or row, exit status 2 (config / catalog error) or 3 (rows
rejected and listed in rejected.csv), never a traceback.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from conftest import REPO, pack_args, read_packed
from PIL import Image

from sslsky.augment import largest_crop, resolve_geometry, survey_of_images
from sslsky.cli import main
from sslsky.config import AugmentConfig, ConfigError
from sslsky.data.fits_io import write_cutout
from sslsky.data.resample import noise_factor, resample_flux
from sslsky.data.schema import MANIFEST_NAME, REJECTED_NAME
from sslsky.data.shards import ShardDataset
from sslsky.data.splits import assign_splits, unit_hash
from sslsky.surveys import SURVEYS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECALS = SURVEYS["decals"]
LANCZOS = Image.Resampling.LANCZOS
E_NAME = "NGC 4414 é-ß"  # non-ASCII: kept exactly through shards, embeddings and search


# ---------------------------------------------------------------------------
# Helpers: inputs written directly, outputs read back directly (h5py, csv, json).
# ---------------------------------------------------------------------------


def random_rgb(rng: np.random.Generator, height: int, width: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 noise: every value 0..255 appears, so any lossy step shows."""
    return rng.integers(0, 256, (height, width or height, 3), dtype=np.uint8)


def write_table(path: Path, columns: dict) -> Path:
    """A catalog as CSV (every string quoted, None -> empty) or Parquet (None -> null)."""
    if path.suffix == ".parquet":
        pq.write_table(pa.table({name: pa.array(values) for name, values in columns.items()}), path)
        return path
    names = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(names)
        for row in zip(*columns.values()):
            writer.writerow(["" if value is None else value for value in row])
    return path


def png_catalog(root: Path, names: list, size: int = 16, seed: int = 0, suffix: str = ".csv",
                **extra) -> tuple[Path, list[np.ndarray]]:
    """One random PNG per name and a catalog keyed by ``iauname`` with ``file_loc``; (catalog, images)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, files = [], []
    for i in range(len(names)):
        image = random_rgb(rng, size)
        Image.fromarray(image).save(root / f"img{i}.png")
        images.append(image)
        files.append(f"img{i}.png")
    columns = {"iauname": names, "ra": list(rng.uniform(0.0, 360.0, len(names))),
               "dec": list(rng.uniform(-30.0, 30.0, len(names))), "file_loc": files, **extra}
    return write_table(root / f"catalog{suffix}", columns), images


def pack(catalog: Path, out: Path, *overrides: str) -> int:
    return main(["pack", "--catalog", str(catalog), "--out", str(out), "progress=false", *overrides])


def rejected(out: Path) -> dict[int, dict]:
    """rejected.csv keyed by catalog row."""
    with open(out / REJECTED_NAME, newline="", encoding="utf-8") as handle:
        return {int(row["row"]): row for row in csv.DictReader(handle)}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


def shard_ids(out: Path) -> list:
    """object_id of every shard row in manifest order: str via h5py's own UTF-8 decoding, or int."""
    ids = []
    for entry in manifest(out)["shards"]:
        with h5py.File(out / entry["path"], "r") as handle:
            dataset = handle["object_id"]
            if h5py.check_string_dtype(dataset.dtype) is not None:
                ids += list(dataset.asstr()[()])
            else:
                assert dataset.dtype == np.int64
                ids += [int(v) for v in dataset[()]]
    return ids


def chw(image_hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(image_hwc), -1, 0))


SALT = 0x5A1C5A1C2021
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix_unit(keys: np.ndarray) -> np.ndarray:
    """The split formula written out again: splitmix64 finaliser of uint64 keys -> [0, 1)."""
    with np.errstate(over="ignore"):
        x = np.asarray(keys, dtype=np.uint64) + np.uint64(SALT)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(M2)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


# ---------------------------------------------------------------------------
# 1. Text ids.
# ---------------------------------------------------------------------------

NAMES = ["J000411.19+020924.0", "J000412.00-010203.4", "  J235959.99-895959.9  ", "J120000.00+000000.0",
         "J000411.19+020924.0", "", "J010203.04+050607.8 ", "J000411.19+020924"]
KEPT = [0, 1, 2, 3, 6, 7]  # row 4 repeats row 0; row 5 has no name


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_text_ids_kept_exactly(tmp_path, suffix, capsys):
    catalog, _ = png_catalog(tmp_path / "in", NAMES, suffix=suffix)
    out = tmp_path / "out"
    assert pack(catalog, out) == 3
    assert shard_ids(out) == [NAMES[i].strip() for i in KEPT]
    assert manifest(out)["id_column"] == "iauname"
    listed = rejected(out)
    assert sorted(listed) == [4, 5]
    assert "duplicate iauname 'J000411.19+020924.0' (first at row 0)" in listed[4]["reason"]
    assert listed[4]["object_id"] == "J000411.19+020924.0" and listed[4]["file"] == "img4.png"
    assert "missing iauname" in listed[5]["reason"] and listed[5]["file"] == "img5.png"
    assert "Traceback" not in capsys.readouterr().err
    assert pack(catalog, out) == 3  # a re-run keeps the finished shard: its key covers the text ids
    assert "skipped 1 finished shard(s)" in capsys.readouterr().out
    assert shard_ids(out) == [NAMES[i].strip() for i in KEPT]

    # The reader hands the same names back, and a split keeps exactly the names the hash puts there.
    ds = ShardDataset(out)
    assert [ds[i]["object_id"] for i in range(len(ds))] == [NAMES[i].strip() for i in KEPT]
    assert ds.read_batch([0, 2])["object_id"] == [NAMES[0], NAMES[2].strip()]
    train = ShardDataset(out, split="train")
    expected = [NAMES[i].strip() for i in KEPT if blake2b_unit(NAMES[i].strip()) < 0.8]
    assert [train[i]["object_id"] for i in range(len(train))] == expected


def blake2b_unit(name: str) -> float:
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    return float(splitmix_unit(np.array([key], dtype=np.uint64))[0])


def test_id_column_naming_a_missing_column_is_exit_2(tmp_path, capsys):
    catalog, _ = png_catalog(tmp_path / "in", NAMES[:3])
    assert pack(catalog, tmp_path / "out", "id_column=dr8_id") == 2
    err = capsys.readouterr().err
    assert "id_column='dr8_id' is not a column" in err and "iauname" in err and "Traceback" not in err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_integer_ids_stay_int64_and_their_split_is_unchanged(survey, tmp_path):
    out = tmp_path / "out"
    assert main(pack_args(survey, out)) == 0
    table = Table.read(survey)
    ids = shard_ids(out)  # asserts the dataset is int64
    assert ids == [int(v) for v in table["object_id"]]
    # unit_hash of ints is the splitmix of the int64 bit pattern, as before text ids existed.
    some = np.array([0, 1, -1, 42, 2**63 - 1, -(2**63), 1237648720693755918, *ids], dtype=np.int64)
    np.testing.assert_array_equal(unit_hash(some), splitmix_unit(some.view(np.uint64)))
    np.testing.assert_array_equal(assign_splits(some), np.searchsorted([0.8, 0.9], splitmix_unit(some.view(np.uint64)),
                                                                       side="right"))
    assert isinstance(ShardDataset(out)[0]["object_id"], int)
    assert ShardDataset(out).read_batch([0, 1])["object_id"].dtype == torch.int64


def test_string_splits_are_stable_and_80_10_10():
    rng = np.random.default_rng(3)
    names = np.array([f"J{h:02d}{m:02d}{s:05.2f}{sign}{d:02d}{dm:02d}{ds:04.1f}" for h, m, s, sign, d, dm, ds in zip(
        rng.integers(0, 24, 2000), rng.integers(0, 60, 2000), rng.uniform(0, 60, 2000),
        rng.choice(["+", "-"], 2000), rng.integers(0, 90, 2000), rng.integers(0, 60, 2000),
        rng.uniform(0, 60, 2000))])
    names = np.unique(names)
    assert len(names) > 1990
    u = unit_hash(names)
    np.testing.assert_array_equal(u, [blake2b_unit(str(n)) for n in names])  # BLAKE2b-64 of UTF-8, then splitmix
    order = rng.permutation(len(names))
    np.testing.assert_array_equal(unit_hash(names[order]), u[order])  # a galaxy's split is its own
    np.testing.assert_array_equal(unit_hash(np.char.encode(names, "utf-8")), u)  # bytes and str alike
    np.testing.assert_array_equal(unit_hash(list(names)), u)
    counts = np.bincount(assign_splits(names), minlength=3) / len(names)
    assert abs(counts[0] - 0.8) < 0.03 and abs(counts[1] - 0.1) < 0.02 and abs(counts[2] - 0.1) < 0.02


# ---------------------------------------------------------------------------
# 2. Parquet: nulls masked, a broken file is a catalog error.
# ---------------------------------------------------------------------------


def test_parquet_nulls_and_truncated_file(tmp_path, capsys):
    big = 1237648720693755918  # > 2^53: a trip through float64 would change it
    ids = [big, big + 1, None, big + 3, big + 4]
    catalog, _ = png_catalog(tmp_path / "in", ["x"] * 5, suffix=".parquet")
    table = pq.read_table(catalog).drop_columns(["iauname"])
    table = table.append_column("objid", pa.array(ids, pa.int64()))
    table = table.set_column(table.column_names.index("ra"), "ra", pa.array([1.0, None, 3.0, 4.0, 5.0]))
    table = table.append_column("z", pa.array([0.1, 0.2, 0.3, None, 0.5]))
    pq.write_table(table, catalog)
    out = tmp_path / "out"
    assert pack(catalog, out) == 3
    listed = rejected(out)
    assert sorted(listed) == [1, 2]
    assert "missing ra" in listed[1]["reason"] and listed[1]["object_id"] == str(big + 1)
    assert "missing objid" in listed[2]["reason"]
    data = read_packed(out)
    assert data["object_id"].dtype == np.int64 and data["object_id"].tolist() == [big, big + 3, big + 4]
    np.testing.assert_array_equal(data["z"], np.array([0.1, np.nan, 0.5], dtype=np.float32))

    raw = catalog.read_bytes()
    broken = tmp_path / "in" / "broken.parquet"
    broken.write_bytes(raw[: len(raw) // 2])
    capsys.readouterr()
    assert pack(broken, tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "cannot be read as parquet" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# 3. Resampling FITS fluxes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_in, n_out", [(107, 72), (152, 64), (64, 100)])
def test_resample_flux_keeps_each_band_total(n_in, n_out):
    cube = np.random.default_rng(n_in).lognormal(0.0, 1.0, (3, n_in, n_in)).astype(np.float32)
    out = resample_flux(cube, n_out)
    assert out.shape == (3, n_out, n_out) and out.dtype == np.float32 and (out > 0).all()
    np.testing.assert_allclose(out.sum(axis=(1, 2), dtype=np.float64), cube.sum(axis=(1, 2), dtype=np.float64),
                               rtol=1e-5)


def test_resample_flux_integer_factor_is_block_sums():
    cube = np.random.default_rng(1).normal(size=(2, 152, 152)).astype(np.float32)
    blocks = cube.astype(np.float64).reshape(2, 76, 2, 76, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(resample_flux(cube, 76), blocks, rtol=1e-5, atol=1e-5)
    assert noise_factor(152, 76) == pytest.approx(2.0)


@pytest.mark.parametrize("n_in, n_out", [(152, 72), (107, 72), (64, 100)])
def test_noise_factor_matches_monte_carlo(n_in, n_out):
    noise = np.random.default_rng(7).normal(0.0, 1.0, (24, n_in, n_in))
    std = np.concatenate([resample_flux(plane[None], n_out).ravel() for plane in noise]).std()
    assert std == pytest.approx(noise_factor(n_in, n_out), rel=0.03)


def test_pack_image_size_resamples_fits_flux_conserving(tmp_path):
    root = tmp_path / "in"
    (root / "cutouts").mkdir(parents=True)
    rng = np.random.default_rng(11)
    n, bands = 4, "".join(DECALS.bands)
    cubes = rng.uniform(0.01, 3.0, (n, 3, 152, 152)).astype(np.float32)
    table = Table()
    table["object_id"] = np.arange(500, 500 + n, dtype=np.int64)
    table["ra"], table["dec"] = rng.uniform(0, 360, n), rng.uniform(-10, 10, n)
    table["file"] = [f"cutouts/c{i}.fits" for i in range(n)]
    sky = rng.uniform(0.002, 0.01, (n, 3)).astype(np.float32)
    for k, band in enumerate(bands):
        table[f"sky_sigma_{band}"] = sky[:, k]
    for i in range(n):
        write_cutout(root / table["file"][i], cubes[i], bands, DECALS.pixel_scale, table["ra"][i], table["dec"][i],
                     "decals")
    table.write(root / "catalog.fits")
    out = tmp_path / "out"
    assert pack(root / "catalog.fits", out, "image_size=72") == 0
    data = read_packed(out)
    images = data["images"]
    assert images.shape == (n, 3, 72, 72) and images.dtype == np.float32
    np.testing.assert_allclose(images.sum(axis=(2, 3), dtype=np.float64), cubes.sum(axis=(2, 3), dtype=np.float64),
                               rtol=1e-4)
    scale = 0.262 * 152 / 72
    m = data["manifest"]
    assert m["pixel_scale"] == pytest.approx(scale, rel=1e-9)
    assert all(attrs["pixel_scale"] == pytest.approx(scale, rel=1e-9) for attrs in data["attrs"])
    assert m["noise_scale"] == pytest.approx(noise_factor(152, 72), rel=1e-12)
    assert m["source_size"] == 152 and m["image_shape"] == [3, 72, 72] and m["survey"] == "decals"
    np.testing.assert_allclose(data["sky_sigma"], sky * noise_factor(152, 72), rtol=1e-6)
    # What training sees of it: the pack's size and scale, the survey's sky noise per stored pixel.
    survey = survey_of_images(ShardDataset(out).attrs)
    assert (survey.name, survey.cutout_size) == ("decals", 72)
    assert survey.pixel_scale == pytest.approx(scale, rel=1e-9)
    np.testing.assert_allclose(survey.sky_sigma, np.array(DECALS.sky_sigma) * noise_factor(152, 72), rtol=1e-9)
    assert survey.crop_size == min(round(DECALS.crop_size * 72 / 152), empirical_largest_crop(72, 0.95, 4.0))


def test_float16_range_is_checked_after_resampling(tmp_path):
    """Downsampling adds up pixels: 4 pixels of 30000 (fine in float16) make one of 120000 (not)."""
    rng = np.random.default_rng(2)
    for i in range(3):
        cube = rng.normal(0.0, 0.1, (5, 32, 32)).astype(np.float32)
        if i == 1:
            cube[0, 4:6, 4:6] = 30000.0
        write_cutout(tmp_path / f"c{i}.fits", cube, "ugriz", 0.396, 0.0, 0.0, "sdss")
    write_table(tmp_path / "catalog.csv", {"object_id": [0, 1, 2], "ra": [1.0] * 3, "dec": [1.0] * 3,
                                           "file": [f"c{i}.fits" for i in range(3)]})
    out = tmp_path / "out"
    assert pack(tmp_path / "catalog.csv", out, "image_size=16", "dtype=float16") == 3
    assert rejected(out)[1]["reason"].startswith("pixel value 120000 after resampling to 16x16 overflows float16")
    data = read_packed(out)
    assert data["images"].dtype == np.float16 and np.isfinite(data["images"]).all()
    assert data["object_id"].tolist() == [0, 2]


# ---------------------------------------------------------------------------
# 4. 8-bit colour images stay uint8.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_colour_images_round_trip_as_uint8(tmp_path, suffix):
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(5)
    n = 6
    files = [f"g{i}{suffix}" for i in range(n)]
    for name in files:
        Image.fromarray(random_rgb(rng, 40)).save(root / name, **({"quality": 90} if suffix == ".jpg" else {}))
    write_table(root / "catalog.csv", {"id_str": [f"G{i}" for i in range(n)], "ra": [1.0] * n, "dec": [2.0] * n,
                                       "file_loc": files})
    decoded = [np.asarray(Image.open(root / name).convert("RGB")) for name in files]  # Pillow's own decode

    out = tmp_path / "plain"
    assert pack(root / "catalog.csv", out) == 0
    data = read_packed(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (n, 3, 40, 40)
    np.testing.assert_array_equal(data["images"], np.stack([chw(d) for d in decoded]))
    m = data["manifest"]
    assert m["dtype"] == "uint8" and m["bands"] == "RGB" and m["photometric"] is False and m["pixel_scale"] is None

    ds = ShardDataset(out)
    batch = ds.read_batch([0, 3, 5])
    assert batch["image"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["image"].numpy(), data["images"][[0, 3, 5]])
    item = ds[3]["image"]
    assert item.dtype == torch.float32
    np.testing.assert_array_equal(item.numpy(), data["images"][3].astype(np.float32))

    out = tmp_path / "resized"
    assert pack(root / "catalog.csv", out, "image_size=24") == 0
    data = read_packed(out)
    expected = [chw(Image.open(root / name).convert("RGB").resize((24, 24), LANCZOS)) for name in files]
    assert data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["images"], np.stack(expected))
    assert data["manifest"]["image_shape"] == [3, 24, 24]


# ---------------------------------------------------------------------------
# 5. Legacy Survey cutout-service FITS shapes.
# ---------------------------------------------------------------------------


def cd_header(size: int, scale: float = 0.262) -> fits.Header:
    """A TAN WCS with an explicit CD matrix (what the cutout service writes), no BANDS, no PIXSCALE."""
    header = fits.Header()
    for key, value in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CRVAL1", 150.0), ("CRVAL2", 2.0),
                       ("CRPIX1", (size + 1) / 2), ("CRPIX2", (size + 1) / 2), ("CD1_1", -scale / 3600),
                       ("CD1_2", 0.0), ("CD2_1", 0.0), ("CD2_2", scale / 3600)):
        header[key] = value
    return header


def write_legacy(path: Path, cube: np.ndarray, shape: str) -> None:
    """``cube`` (g, r, z planes) as one of the Legacy Survey shapes."""
    size = cube.shape[-1]
    if shape == "band_keywords":
        header = cd_header(size)
        header["BAND0"], header["BAND1"], header["BAND2"] = "g", "r", "z"
        fits.PrimaryHDU(cube, header).writeto(path)
    elif shape == "one_hdu_per_band":  # astropy writes EXTNAME upper-case ('G')
        hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(cube[k], cd_header(size), name=band)
                                      for k, band in enumerate("grz")]
        fits.HDUList(hdus).writeto(path)
    elif shape == "bands_zrg":
        header = cd_header(size)
        header["BANDS"] = "zrg"
        fits.PrimaryHDU(cube[::-1], header).writeto(path)
    elif shape == "astropy_wcs":  # WCS.to_header turns a CD matrix into PC + CDELT
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [(size + 1) / 2] * 2
        wcs.wcs.cd = np.array([[-0.262 / 3600, 0.0], [0.0, 0.262 / 3600]])
        header = wcs.to_header()
        assert "CD1_1" not in header and "PC1_1" in header
        header["BANDS"] = "grz"
        fits.PrimaryHDU(cube, header).writeto(path)


@pytest.fixture(scope="module")
def legacy_cubes() -> np.ndarray:
    return np.random.default_rng(21).uniform(-0.01, 2.0, (3, 3, 152, 152)).astype(np.float32)


@pytest.mark.parametrize("shape", ["band_keywords", "one_hdu_per_band", "bands_zrg", "astropy_wcs"])
def test_legacy_survey_fits_shapes_pack_as_decals(tmp_path, legacy_cubes, shape):
    root = tmp_path / "in"
    root.mkdir()
    n = len(legacy_cubes)
    for i in range(n):
        write_legacy(root / f"c{i}.fits", legacy_cubes[i], shape)
    write_table(root / "catalog.csv", {"object_id": list(range(n)), "ra": [150.0] * n, "dec": [2.0] * n,
                                       "file": [f"c{i}.fits" for i in range(n)]})
    out = tmp_path / "out"
    assert pack(root / "catalog.csv", out) == 0
    data = read_packed(out)
    m = data["manifest"]
    assert (m["survey"], m["bands"], m["image_shape"]) == ("decals", "grz", [3, 152, 152])
    assert m["pixel_scale"] == pytest.approx(0.262)
    assert all(attrs["bands"] == "grz" and attrs["pixel_scale"] == pytest.approx(0.262) for attrs in data["attrs"])
    np.testing.assert_array_equal(data["images"], legacy_cubes)  # planes in g, r, z order, bit for bit


# ---------------------------------------------------------------------------
# 6. Colour packs need no survey; crops that cannot fit are config errors.
# ---------------------------------------------------------------------------

RGB_SIZE, RGB_N = 40, 24


def empirical_largest_crop(size: int, scale_min: float, jitter: float) -> int:
    """Largest crop whose corners, rotated by any angle, magnified by 1/scale_min and shifted by +-jitter per
    axis, stay on the cutout's pixel centres [0, size - 1] (the sampling grid of a bilinear crop)."""
    theta = np.linspace(0.0, np.pi / 2, 181)[:, None]  # includes 45 degrees
    best = 0
    for crop in range(1, size + 1):
        centre = (size - crop) // 2 + (crop - 1) / 2
        half = (crop - 1) / 2
        corners = np.array([[-half, -half], [-half, half], [half, -half], [half, half]])
        x = (corners[:, 0] * np.cos(theta) - corners[:, 1] * np.sin(theta)) / scale_min  # (angles, 4)
        if centre + x.min() - jitter >= -1e-9 and centre + x.max() + jitter <= size - 1 + 1e-9:
            best = crop
    return best


@pytest.fixture(scope="module")
def rgb_pack(tmp_path_factory) -> Path:
    """RGB_N random 40x40 PNGs packed (ids are names, one non-ASCII)."""
    root = tmp_path_factory.mktemp("rgb")
    names = [f"J0100{i:02d}.00+020000.0" for i in range(RGB_N)]
    names[5] = E_NAME
    catalog, _ = png_catalog(root / "in", names, size=RGB_SIZE, seed=2)
    assert pack(catalog, root / "packed") == 0
    return root / "packed"


def pretrain_args(packed: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["pretrain", "--config", str(REPO / "config" / "pretrain_demo.yaml"), f"data.path={packed}",
            f"run_dir={run_dir}", "optim.total_steps=2", "data.batch_size=8", "model.moco.queue_size=16",
            "tensorboard=false", "progress=false", "val_every=100", "checkpoint_every=100", "log_every=1",
            "device=cpu", *overrides]


FLUX_OFF = ("augment.reddening.enabled=false", "augment.psf.enabled=false", "augment.noise.enabled=false")


def test_rgb_pack_sizes_and_crops(rgb_pack, tmp_path, capsys):
    attrs = ShardDataset(rgb_pack).attrs
    survey = survey_of_images(attrs)
    geo = AugmentConfig.Geometry()
    fit = largest_crop(RGB_SIZE, geo.rotation, geo.scale_min, geo.jitter, geo.interpolation)
    assert fit == empirical_largest_crop(RGB_SIZE, geo.scale_min, geo.jitter) == 21
    assert survey.bands == ("R", "G", "B") and survey.cutout_size == RGB_SIZE and survey.crop_size == fit
    assert largest_crop(RGB_SIZE, "none", 1.0, 0.0) == RGB_SIZE

    too_big = AugmentConfig(geometry=dataclasses.replace(geo, crop_size=32))
    with pytest.raises(ConfigError, match=f"the largest crop that fits is {fit}"):
        resolve_geometry(too_big, survey)
    resolved = resolve_geometry(AugmentConfig(), survey)
    assert (resolved.geometry.cutout_size, resolved.geometry.crop_size) == (RGB_SIZE, fit)
    # Images too small for any crop under the default geometry: said so, not "crop_size=0 must be in [1, 8]".
    tiny = survey_of_images({"photometric": False, "image_shape": [3, 8, 8], "bands": "RGB"})
    assert tiny.crop_size == empirical_largest_crop(8, geo.scale_min, geo.jitter) == 0
    with pytest.raises(ConfigError, match="no crop fits the 8x8 images"):
        resolve_geometry(AugmentConfig(), tiny)
    assert resolve_geometry(AugmentConfig(geometry=dataclasses.replace(geo, crop_size=6, jitter=0.0,
                                                                       rotation="right")), tiny).geometry.crop_size == 6

    # The demo config asks for 32x32 crops: a config error naming the crop that fits, before any training.
    assert main(pretrain_args(rgb_pack, tmp_path / "big_crop", *FLUX_OFF)) == 2
    err = capsys.readouterr().err
    assert f"augment.geometry.crop_size={fit}" in err and "Traceback" not in err
    # Flux augmentations cannot take 8-bit colour images.
    assert main(pretrain_args(rgb_pack, tmp_path / "flux_on", "augment.geometry.crop_size=0")) == 2
    err = capsys.readouterr().err
    assert "augment.reddening.enabled=false" in err and "photometric" in err and "Traceback" not in err
    assert not (tmp_path / "flux_on" / "checkpoints").exists() or not any((tmp_path / "flux_on" / "checkpoints")
                                                                          .iterdir())


def test_non_ascii_name_through_pretrain_embed_search(rgb_pack, tmp_path, capsys):
    assert E_NAME in shard_ids(rgb_pack)
    run = tmp_path / "run"
    assert main(pretrain_args(rgb_pack, run, *FLUX_OFF, "augment.geometry.crop_size=0")) == 0
    emb = tmp_path / "emb.h5"
    assert main(["embed", "--ckpt", str(run / "encoder.pt"), "--data", str(rgb_pack), "--out", str(emb),
                 "device=cpu", "progress=false"]) == 0
    with h5py.File(emb, "r") as handle:
        assert list(handle["object_id"].asstr()[()]) == shard_ids(rgb_pack)
    capsys.readouterr()
    assert main(["search", "--embeddings", str(emb), "--query", E_NAME, "--k", "3", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert f"query {E_NAME} (row 5)" in out
    assert main(["search", "--embeddings", str(emb), "--query", "NGC 4414 e-ss", "--k", "3",
                 "progress=false"]) == 2  # the ASCII look-alike is another name
    err = capsys.readouterr().err
    assert "NGC 4414 e-ss" in err and "not in" in err


# ---------------------------------------------------------------------------
# 7. The mock's Galaxy Zoo shape read back by sslsky pack.
# ---------------------------------------------------------------------------


def test_mock_png_catalog_packs(tmp_path):
    mock = tmp_path / "mock"
    assert main(["mock", "--survey", "decals", "--n", "12", "--seed", "4", "--format", "png", "--image-size", "96",
                 "--out", str(mock), "progress=false"]) == 0
    out = tmp_path / "packed"
    assert pack(mock / "catalog.fits", out, "image_size=48", "label_column=label") == 0
    table = Table.read(mock / "catalog.fits", character_as_bytes=False)
    data = read_packed(out)
    m = data["manifest"]
    assert m["counts"] == {"input_rows": 12, "packed": 12, "rejected": 0}
    assert shard_ids(out) == [str(v).strip() for v in table["id_str"]]
    assert m["id_column"] == "id_str" and m["label_column"] == "label"
    np.testing.assert_array_equal(data["morph_class"], np.asarray(table["label"]))
    assert set(np.asarray(table["label"]).tolist()) == {0, 1}
    assert m["label_names"] == {"0": "smooth", "1": "featured"}
    vote_names = [c for c in table.colnames if c.startswith("votes_")]
    assert m["votes_columns"] == vote_names and vote_names
    np.testing.assert_array_equal(data["votes"], np.stack([np.asarray(table[c]) for c in vote_names], axis=1))
    expected = [chw(Image.open(mock / f).convert("RGB").resize((48, 48), LANCZOS)) for f in table["file_loc"]]
    np.testing.assert_array_equal(data["images"], np.stack(expected))


# ---------------------------------------------------------------------------
# 8. Hostile inputs.
# ---------------------------------------------------------------------------


def png_bytes(width: int, height: int, bit_depth: int, rows: bytes) -> bytes:
    """A colour (type 2) PNG written by hand: Pillow cannot write 16-bit RGB, nor lie about the size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces a huge image (Pillow refuses it as a decompression bomb)."""
    return png_bytes(width, height, 8, b"\0" * 64)


def rgb16_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint16 as a 48-bit RGB PNG (filter 0 on every row)."""
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in image)
    return png_bytes(image.shape[1], image.shape[0], 16, rows)


@pytest.fixture
def hostile_pngs(tmp_path) -> tuple[Path, dict]:
    """A catalog of 20x20 PNGs, most rows with one problem; returns (catalog, {row: words of the reason})."""
    names = [f"J02000{i:02d}.00-100000.0" for i in range(12)]
    names[9] = E_NAME
    files = [f"img{i}.png" for i in range(12)]
    files[10] = "img10.jpg"
    catalog, _ = png_catalog(tmp_path / "in", names, size=20, seed=8, file_loc=files)
    root = catalog.parent
    rng = np.random.default_rng(9)
    (root / "img1.png").write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())  # random bytes
    good = (root / "img2.png").read_bytes()
    (root / "img2.png").write_bytes(good[: len(good) // 2])  # cut short
    Image.fromarray(rng.integers(0, 2**16, (20, 20), dtype=np.uint16)).save(root / "img3.png")  # 16-bit grey
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "img4.png")  # 8-bit grey
    Image.fromarray(random_rgb(rng, 20, 26)).save(root / "img5.png")  # not square
    Image.fromarray(random_rgb(rng, 32)).save(root / "img6.png")  # another size
    (root / "img7.png").write_bytes(bomb_png(30000, 30000))
    (root / "img8.png").unlink()
    (root / "img8.png").mkdir()  # a folder named like an image
    Image.fromarray(random_rgb(rng, 20)).convert("CMYK").save(root / "img10.jpg")
    rgb16 = rng.integers(0, 2**16, (20, 20, 3), dtype=np.uint16)  # 48-bit colour: packed as its top 8 bits
    (root / "img11.png").write_bytes(rgb16_png(rgb16))
    np.save(root / "img11.npy", rgb16)
    reasons = {1: "not a readable PNG/JPEG image", 2: "truncated", 3: "Pillow mode 'I;16'", 4: "Pillow mode 'L'",
               5: "20x26, not square", 6: "wrong image size: 32x32, expected 20x20", 7: "decompression bomb",
               8: "not a regular file", 10: "Pillow mode 'CMYK'"}
    return catalog, reasons


def test_hostile_colour_images_are_listed(hostile_pngs, tmp_path, capsys):
    catalog, reasons = hostile_pngs
    root = catalog.parent

    # Without image_size: the pack's size is the common one; every broken or other-sized image is listed.
    out = tmp_path / "plain"
    assert pack(catalog, out) == 3
    listed = rejected(out)
    assert sorted(listed) == sorted(reasons)
    for row, words in reasons.items():
        assert words in listed[row]["reason"], (row, listed[row])
        assert listed[row]["file"] == (f"img{row}.png" if row != 10 else "img10.jpg")
        assert listed[row]["object_id"] == f"J02000{row:02d}.00-100000.0"
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "img6.png" in captured.err  # the probe names the odd size
    kept = [i for i in range(12) if i not in reasons]
    data = read_packed(out)
    assert data["catalog_row"].tolist() == kept
    assert shard_ids(out)[kept.index(9)] == E_NAME
    top_bits = (np.load(root / "img11.npy") >> 8).astype(np.uint8)
    np.testing.assert_array_equal(data["images"][kept.index(11)], chw(top_bits))

    # With image_size: every readable square image is resized, whatever its size; the broken ones are listed.
    out = tmp_path / "resized"
    assert pack(catalog, out, "image_size=16") == 3
    listed = rejected(out)
    assert sorted(listed) == sorted(set(reasons) - {6})
    data = read_packed(out)
    assert data["images"].shape == (len(kept) + 1, 3, 16, 16)
    row6 = list(data["catalog_row"]).index(6)
    np.testing.assert_array_equal(data["images"][row6], chw(Image.open(root / "img6.png").resize((16, 16), LANCZOS)))
    assert "Traceback" not in capsys.readouterr().err


def test_hostile_catalogs_and_config(tmp_path, survey, capsys):
    names = [f"J03000{i}.00+100000.0" for i in range(4)]

    # A text label column: exit 2 naming the column and a value.
    catalog, _ = png_catalog(tmp_path / "text_label", names, label=["smooth", "featured", "smooth", "x"])
    assert pack(catalog, tmp_path / "o1", "label_column=label") == 2
    err = capsys.readouterr().err
    assert "label column 'label' holds text" in err and "'smooth'" in err and "Traceback" not in err

    # Numbers and text mixed, or fractions: no silent -1 or truncation to a class.
    catalog, _ = png_catalog(tmp_path / "mixed_label", names, label=["1", "featured", "0", "1"])
    assert pack(catalog, tmp_path / "o2", "label_column=label") == 2
    assert "row 1: 'featured'" in capsys.readouterr().err
    catalog, _ = png_catalog(tmp_path / "frac_label", names, label=[0.0, 0.7, 1.0, 1.0])
    assert pack(catalog, tmp_path / "o3", "label_column=label") == 2
    assert "row 1: 0.7" in capsys.readouterr().err

    # An integer label column with a missing value: -1 (unknown), the row packed.
    catalog, _ = png_catalog(tmp_path / "int_label", names, label=[0, None, 1, 1])
    assert pack(catalog, tmp_path / "o4", "label_column=label") == 0
    assert read_packed(tmp_path / "o4")["morph_class"].tolist() == [0, -1, 1, 1]

    # Ids that are not whole numbers are rejected per row with the value as written.
    catalog, _ = png_catalog(tmp_path / "float_ids", names, objid=[1.0, 2.5, 3.0, 4.0])
    assert pack(catalog, tmp_path / "o5", "id_column=objid") == 3
    assert rejected(tmp_path / "o5")[1]["reason"] == "objid 2.5 is not a whole number"

    # Positions off the sky (ra and dec swapped, ra past 360): listed per row, not packed.
    catalog, _ = png_catalog(tmp_path / "off_sky", names)
    write_table(catalog, {"iauname": names, "ra": [10.0, 20.0, 400.0, 30.0], "dec": [5.0, 215.0, 0.0, -90.0],
                          "file_loc": [f"img{i}.png" for i in range(4)]})
    assert pack(catalog, tmp_path / "o8") == 3
    listed = rejected(tmp_path / "o8")
    assert sorted(listed) == [1, 2]
    assert "ra, dec = 20, 215 is not a sky position" in listed[1]["reason"] and "swapped" in listed[1]["reason"]
    assert "ra, dec = 400, 0 is not a sky position" in listed[2]["reason"]

    # No rows at all, or a CSV that is not UTF-8: catalog errors naming the file.
    (tmp_path / "empty.csv").write_text("iauname,ra,dec,file_loc\n")
    capsys.readouterr()
    assert pack(tmp_path / "empty.csv", tmp_path / "o9") == 2
    assert f"{tmp_path / 'empty.csv'} has no rows" in capsys.readouterr().err
    (tmp_path / "latin1.csv").write_bytes(f"iauname,ra,dec,file_loc\n{E_NAME},1,2,x.png\n".encode("latin-1"))
    assert pack(tmp_path / "latin1.csv", tmp_path / "o10") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "latin1.csv") in err and "UnicodeDecodeError" in err and "Traceback" not in err

    # A truncated JPEG is one rejected row.
    root = catalog.parent
    Image.fromarray(random_rgb(np.random.default_rng(1), 16)).save(root / "cut.jpg", quality=90)
    jpeg = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    write_table(catalog, {"iauname": names, "ra": [1.0] * 4, "dec": [2.0] * 4,
                          "file_loc": ["img0.png", "cut.jpg", "img2.png", "img3.png"]})
    assert pack(catalog, tmp_path / "o11") == 3
    assert "not a readable PNG/JPEG image" in rejected(tmp_path / "o11")[1]["reason"]

    # image_size too small, uint8 for fluxes: exit 2 before any shard.
    catalog, _ = png_catalog(tmp_path / "small", names)
    capsys.readouterr()
    assert pack(catalog, tmp_path / "o6", "image_size=3") == 2
    assert "image_size=3" in capsys.readouterr().err
    assert main(pack_args(survey, tmp_path / "o7", "dtype=uint8")) == 2
    err = capsys.readouterr().err
    assert "dtype=uint8 is for 8-bit colour images" in err and ".fits" in err and "Traceback" not in err
    assert not list((tmp_path / "o7").glob("shard-*.h5"))
