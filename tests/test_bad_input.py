"""Bad inputs: each bad row or cutout is listed in rejected.csv with its reason; the run goes on.

A catalog that cannot be packed at all (missing column, unknown format) and
a bad config stop before any work with exit status 2.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from conftest import BANDS, SIZE, galaxy_cube, pack_args, read_packed
from PIL import Image

from sslsky.cli import main
from sslsky.data.catalog import CatalogError, read_catalog
from sslsky.data.fits_io import CutoutError, read_cutout, write_cutout
from sslsky.data.schema import REJECTED_FIELDS, REJECTED_NAME

# Catalog row -> words the rejection reason must contain.
EXPECTED = {
    0: "file not found",
    1: "empty file",
    2: "truncated",
    3: "not a readable FITS",
    4: "wrong number of bands",
    5: "wrong image size",
    6: "too many NaN/inf",
    9: "missing ra",
    10: "missing object_id",
    11: "missing file",
    14: "duplicate object_id",
    16: "wrong number of bands",
    17: "wrong bands",
}
FILLED_ROW = 7  # one NaN and one inf: filled, packed
BIG_ROW = 15  # a pixel of 1e5: fine in float32, overflows float16


@pytest.fixture
def bad_survey(survey):
    """The synthetic survey with one problem per row listed in EXPECTED; returns the catalog path."""
    root = survey.parent
    table = Table.read(survey, character_as_bytes=False)
    path = {i: root / table["file"][i] for i in range(len(table))}
    rng = np.random.default_rng(9)
    path[0].unlink()
    path[1].write_bytes(b"")
    path[2].write_bytes(path[2].read_bytes()[:4000])  # header (2880 bytes) and part of the data
    path[3].write_text("SIMPLE? no, this is a text file pretending to be FITS\n" * 20)
    write_cutout(path[4], galaxy_cube(rng, 3), "grz", 0.262, 0.0, 0.0)
    write_cutout(path[5], galaxy_cube(rng, 5, size=20), BANDS, 0.396, 0.0, 0.0)
    cube = galaxy_cube(rng)
    cube[:, :4, :] = np.nan  # 25% of the pixels
    write_cutout(path[6], cube, BANDS, 0.396, 0.0, 0.0)
    cube = fits.getdata(path[FILLED_ROW]).astype(np.float32)
    cube[2, 3, 4], cube[4, 0, 0] = np.nan, np.inf
    write_cutout(path[FILLED_ROW], cube, BANDS, 0.396, 0.0, 0.0)
    cube = fits.getdata(path[BIG_ROW]).astype(np.float32)
    cube[0, 8, 8] = 1.0e5
    write_cutout(path[BIG_ROW], cube, BANDS, 0.396, 0.0, 0.0)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "colour.png")
    table["file"][16] = "colour.png"
    write_cutout(path[17], galaxy_cube(rng), "grizy", 0.396, 0.0, 0.0)

    ra = MaskedColumn(table["ra"])
    ra.mask[9] = True
    table["ra"] = ra
    object_id = MaskedColumn(table["object_id"])
    object_id.mask[10] = True
    table["object_id"] = object_id
    table["file"][11] = ""
    table["object_id"][14] = table["object_id"][13]
    out = root / "catalog_bad.ecsv"  # ECSV keeps masks of every column type
    table.write(out, format="ascii.ecsv")
    return out


def read_rejected(out):
    with open(out / REJECTED_NAME, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == REJECTED_FIELDS
        return list(reader)


def test_every_bad_item_is_listed_and_the_rest_packed(bad_survey, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(pack_args(bad_survey, out, "--shard-size", "4")) == 3
    assert "rejected 13" in capsys.readouterr().out
    rejected = read_rejected(out)
    assert [int(r["row"]) for r in rejected] == sorted(EXPECTED)
    table = Table.read(bad_survey)
    for item in rejected:
        row = int(item["row"])
        assert EXPECTED[row] in item["reason"], item
        if row not in (11,):
            assert item["file"] == str(table["file"][row]), item
        if row not in (10,):
            assert item["object_id"] == str(table["object_id"][row])
    packed = read_packed(out)
    good = [row for row in range(len(table)) if row not in EXPECTED]
    np.testing.assert_array_equal(packed["catalog_row"], good)
    assert packed["manifest"]["counts"] == {"input_rows": 30, "packed": len(good), "rejected": len(EXPECTED)}
    filled = packed["filled_pixels"][good.index(FILLED_ROW)]
    assert filled == 2
    image = packed["images"][good.index(FILLED_ROW)]
    assert image[2, 3, 4] == 0.0 and image[4, 0, 0] == 0.0 and np.isfinite(image).all()
    assert packed["filled_pixels"].sum() == 2
    assert packed["images"][good.index(BIG_ROW)].max() == np.float32(1.0e5)


def test_float16_overflow_is_rejected(bad_survey, tmp_path):
    out = tmp_path / "packed16"
    assert main(pack_args(bad_survey, out, "--dtype", "float16", "fill_value=-1")) == 3
    reasons = {int(r["row"]): r["reason"] for r in read_rejected(out)}
    assert "overflows float16" in reasons[BIG_ROW] and "100000" in reasons[BIG_ROW]
    assert set(reasons) == set(EXPECTED) | {BIG_ROW}
    packed = read_packed(out)
    assert packed["images"].dtype == np.float16 and np.isfinite(packed["images"]).all()
    image = packed["images"][list(packed["catalog_row"]).index(FILLED_ROW)]
    assert image[2, 3, 4] == -1.0


def test_missing_required_column_fails_before_any_work(survey, tmp_path, capsys):
    table = Table.read(survey)
    table.remove_column("dec")
    catalog = survey.parent / "no_dec.fits"
    table.write(catalog)
    out = tmp_path / "never"
    assert main(pack_args(catalog, out)) == 2
    err = capsys.readouterr().err
    assert "'dec'" in err and "no_dec.fits" in err and "it has object_id, ra" in err
    assert not out.exists()  # nothing was done
    with pytest.raises(CatalogError, match=r"missing required column\(s\) 'dec'"):
        read_catalog(catalog)


def test_missing_file_column_mentions_file_loc(survey):
    table = Table.read(survey)
    table.remove_column("file")
    catalog = survey.parent / "no_file.csv"
    table.write(catalog)
    with pytest.raises(CatalogError, match=r"'file'.*'file_loc'"):
        read_catalog(catalog)


@pytest.mark.parametrize("override", ["dtype=float64", "shard_size=0", "survey=hsc", "max_bad_fraction=2"])
def test_config_errors_exit_2(survey, tmp_path, override, capsys):
    assert main(pack_args(survey, tmp_path / "x", override)) == 2
    assert "config error" in capsys.readouterr().err


def test_unknown_catalog_format_and_missing_catalog(tmp_path, capsys):
    (tmp_path / "cat.votable").write_bytes(b"<VOTABLE/>")
    assert main(pack_args(tmp_path / "cat.votable", tmp_path / "x")) == 2
    assert "unknown format" in capsys.readouterr().err
    (tmp_path / "cat.parquet").write_bytes(b"PAR1")  # a truncated Parquet file: named, with pyarrow's reason
    assert main(pack_args(tmp_path / "cat.parquet", tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "cat.parquet: cannot be read as parquet" in err and "Traceback" not in err
    assert main(pack_args(tmp_path / "nope.fits", tmp_path / "x")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_readable_cutout_is_a_clear_error(survey, tmp_path, capsys):
    table = Table.read(survey)
    table["file"] = [f"elsewhere/{name}" for name in table["file"]]
    catalog = survey.parent / "moved.fits"
    table.write(catalog)
    assert main(pack_args(catalog, tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "none of the first 30 cutouts" in err and "file not found" in err and "relative to" in err


def test_missing_band_file_names_the_band_file(tmp_path):
    for band in "ugiz":  # no r
        fits.PrimaryHDU(np.zeros((SIZE, SIZE), np.float32)).writeto(tmp_path / f"frame-{band}.fits")
    with pytest.raises(CutoutError, match=r"frame-r\.fits: file not found"):
        read_cutout(tmp_path / "frame-{band}.fits", BANDS)
