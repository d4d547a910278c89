"""The mock survey: physics against independent computations, the catalog contract, votes, determinism."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from PIL import Image
from scipy.stats import spearmanr

from sslsky.cli import main as cli_main
from sslsky.config import ConfigError, MockConfig
from sslsky.data.mock import (
    COMPONENTS,
    LABEL_NAMES,
    MORPH_CLASSES,
    check_config,
    component_fluxes,
    draw_population,
    iau_names,
    render_galaxy,
    run_mock,
    unique_iau_names,
)
from sslsky.data.mock_sed import TEMPLATES, ab_magnitude, kcorrection, load_sed
from sslsky.data.rgb import SURVEY_RGB_BANDS, frame_pixels, galaxy_zoo_rgb, lupton_rgb
from sslsky.data.schema import PER_BAND_COLUMNS, REQUIRED_COLUMNS, VOTES_PREFIX
from sslsky.data.votes import class_from_votes
from sslsky.surveys import SURVEYS, flux_to_mag, reddening_factor
from sslsky.vocabulary import VOTE_TREE, vote_columns

SDSS = SURVEYS["sdss"]
DECALS = SURVEYS["decals"]
N_RUN = 40
SEED = 7


def rows_of(table: Table) -> list[dict]:
    columns = {name: np.asarray(table[name]) for name in table.colnames}
    return [{name: col[i] for name, col in columns.items()} for i in range(len(table))]


@pytest.fixture(scope="module")
def population() -> Table:
    """A few hundred SDSS truth rows (no pixels), some unlabelled and without spec-z."""
    cfg = MockConfig(n=400, seed=11, unlabelled_fraction=0.25, specz_fraction=0.7)
    return draw_population(cfg, SDSS, np.random.default_rng(cfg.seed))


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory) -> Path:
    """``sslsky mock`` (through the CLI) of N_RUN SDSS galaxies; returns the output folder."""
    out = tmp_path_factory.mktemp("mock") / "sdss"
    rc = cli_main(["mock", "--survey", "sdss", "--n", str(N_RUN), "--seed", str(SEED), "--out", str(out),
                   "progress=false"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------
# SEDs and colours.
# ---------------------------------------------------------------------------


def test_ab_magnitude_matches_speclite():
    import speclite.filters

    wave, flam = load_sed("Sbc")
    z = 0.2
    shifted_wave = wave * (1 + z)  # the same spectrum redshifted, on its own grid
    for name in ("sdss2010-g", "decam2014-z"):
        ours = ab_magnitude(shifted_wave, flam / (1 + z), name)
        theirs = speclite.filters.load_filter(name).get_ab_magnitude(flam / (1 + z), shifted_wave)
        assert abs(float(ours) - float(theirs)) < 2e-3


def test_kcorrection_reddens_early_types_with_redshift():
    z = np.array([0.0, 0.1, 0.2, 0.3])
    k = kcorrection(np.zeros(4, dtype=int), z, SDSS.filters)  # E template
    g_r = k[:, 1] - k[:, 2]
    assert np.all(np.diff(g_r) > 0.05)
    assert k[0, 2] == pytest.approx(0.0, abs=1e-9)  # rest-frame r at z = 0 is the reference band
    # Late templates are bluer than early ones at every redshift.
    blue = kcorrection(np.full(4, TEMPLATES.index("Im")), z, SDSS.filters)
    assert np.all(blue[:, 1] - blue[:, 2] < g_r)


def test_colour_redshift_in_catalog(population):
    early = population["morph_class"] <= 2
    rho = spearmanr(population["z_true"][early], (population["mag_g"] - population["mag_r"])[early]).statistic
    assert rho > 0.5


def test_colour_redshift_in_pixels(population):
    """Aperture g - r measured on noisy cutouts of smooth galaxies rises with z."""
    smooth = np.flatnonzero((population["morph_class"] <= 2) & ~population["is_merger"])
    chosen = smooth[np.argsort(population["z_true"][smooth])][:: max(1, len(smooth) // 20)]
    rows = rows_of(population[chosen])
    size = SDSS.cutout_size
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    aperture = np.hypot(xx, yy) * SDSS.pixel_scale < 4.0
    g, r = SDSS.band_index("g"), SDSS.band_index("r")
    colours = []
    for i, row in enumerate(rows):
        cube = render_galaxy(row, SDSS, np.random.default_rng(i))
        colours.append(-2.5 * np.log10(cube[g][aperture].sum() / cube[r][aperture].sum()))
    rho = spearmanr(population["z_true"][chosen], colours).statistic
    assert rho > 0.5


# ---------------------------------------------------------------------------
# Pixels against the catalog.
# ---------------------------------------------------------------------------


def test_catalog_flux_matches_pixel_sum(mock_run):
    table = Table.read(mock_run / "catalog.fits")
    compact = (table["r50"] < 2.0) & ~table["is_merger"]
    assert compact.sum() >= 5
    npix = SDSS.cutout_size**2
    for row in table[compact]:
        cube = fits.getdata(mock_run / row["file"])
        for b, band in enumerate(SDSS.bands):
            flux = row[f"flux_{band}"]
            noise = row[f"sky_sigma_{band}"] * np.sqrt(npix)
            assert abs(cube[b].sum() - flux) < 5 * noise + 0.04 * flux, (row["object_id"], band)


def test_reddening_is_exactly_the_extinction_factor(population):
    classes = population["morph_class"]
    picks = [int(np.flatnonzero(classes == c)[0]) for c in range(len(MORPH_CLASSES))]
    for row in rows_of(population[picks]):
        reddened = render_galaxy(row, SDSS).astype(np.float64)
        clean = render_galaxy(dict(row, ebv=0.0), SDSS).astype(np.float64)
        factor = reddening_factor(SDSS.extinction, row["ebv"])
        np.testing.assert_allclose(reddened.sum(axis=(1, 2)) / clean.sum(axis=(1, 2)), factor, rtol=1e-5)
        bright = clean > 1e-3 * clean.max(axis=(1, 2), keepdims=True)
        ratio = (reddened / np.where(bright, clean, 1.0))
        expected = np.broadcast_to(factor[:, None, None], ratio.shape)
        np.testing.assert_allclose(ratio[bright], expected[bright], rtol=1e-5)
        # And the catalog says the same.
        for b, band in enumerate(SDSS.bands):
            assert row[f"flux_{band}"] == pytest.approx(row[f"flux_intrinsic_{band}"] * factor[b], rel=1e-12)


def test_dust_lane_dims_blue_more_and_never_goes_negative(population):
    edge = np.flatnonzero(population["morph_class"] == 3)[:3]
    for row in rows_of(population[edge]):
        row = dict(row, dust_tau_v=3.0)
        flux = component_fluxes({k: np.atleast_1d(v) for k, v in row.items()}, SDSS)[0]
        dust_depth = -flux[COMPONENTS.index("dust")] / flux[COMPONENTS.index("disk")]
        assert np.all(np.diff(dust_depth) < 0)  # u loses the most, z the least
        cube = render_galaxy(row, SDSS)
        assert cube.min() > -1e-6 * cube.max()


def test_decals_cutout_shape(tmp_path):
    cfg = MockConfig(survey="decals", n=1, seed=1)
    table = draw_population(cfg, DECALS, np.random.default_rng(1))
    cube = render_galaxy(rows_of(table)[0], DECALS, np.random.default_rng(0))
    assert cube.shape == (3, 152, 152) and cube.dtype == np.float32
    assert [c for c in table.colnames if c.startswith("flux_intrinsic_")] == [f"flux_intrinsic_{b}" for b in "grz"]


# ---------------------------------------------------------------------------
# The catalog contract and the population.
# ---------------------------------------------------------------------------


def test_catalog_contract(mock_run):
    table = Table.read(mock_run / "catalog.fits")
    assert len(table) == N_RUN
    for name in (*REQUIRED_COLUMNS, "z", "ebv", "morph_class", "morph_name", "z_true"):
        assert name in table.colnames
    assert table["object_id"].dtype.newbyteorder("=") == np.int64 and len(np.unique(table["object_id"])) == N_RUN
    assert all(table[c].dtype.newbyteorder("=") == np.float64 for c in ("ra", "dec", "z", "ebv"))
    assert np.issubdtype(table["morph_class"].dtype, np.integer)
    assert set(np.unique(table["morph_class"])) <= set(range(len(MORPH_CLASSES)))
    assert all(MORPH_CLASSES[c] == n for c, n in zip(table["morph_class"], table["morph_name"]))
    for prefix in PER_BAND_COLUMNS + ("flux", "mag", "flux_intrinsic"):
        for band in SDSS.bands:
            assert f"{prefix}_{band}" in table.colnames
    votes = [c for c in table.colnames if c.startswith(VOTES_PREFIX)]
    assert votes == vote_columns()
    assert all(np.issubdtype(table[c].dtype, np.integer) for c in votes)
    assert (mock_run / "config.yaml").is_file()
    assert not list(mock_run.glob(".*tmp*"))
    for row in table[:10]:
        assert not Path(row["file"]).is_absolute()
        path = mock_run / row["file"]
        with fits.open(path) as hdul:
            header, data = hdul[0].header, hdul[0].data
        assert data.shape == (5, 107, 107) and data.dtype.kind == "f"
        assert header["BANDS"] == "ugriz" and header["PIXSCALE"] == pytest.approx(0.396)
        assert header["BUNIT"] == "nanomaggy"
        centre = WCS(header, naxis=2).pixel_to_world_values((107 - 1) / 2, (107 - 1) / 2)
        assert centre[0] == pytest.approx(row["ra"], abs=1e-9) and centre[1] == pytest.approx(row["dec"], abs=1e-9)


def test_redshifts_and_magnitude_limit(population):
    z_true = np.asarray(population["z_true"])
    assert 0.07 < np.median(z_true) < 0.13
    assert 0.15 < np.percentile(z_true, 95) < 0.35
    dereddened_r = flux_to_mag(np.asarray(population["flux_intrinsic_r"]))
    assert dereddened_r.max() <= 17.77 + 1e-9
    np.testing.assert_allclose(population["mag_r"], flux_to_mag(np.asarray(population["flux_r"])))
    missing = np.isnan(population["z"])
    assert missing.sum() == round(0.3 * len(population))
    np.testing.assert_array_equal(population["z"][~missing], population["z_true"][~missing])


def test_brighter_galaxies_are_more_often_early_type(population):
    early = population["morph_class"] <= 2
    bright = population["abs_mag_r"] < np.median(population["abs_mag_r"])
    assert early[bright].mean() > early[~bright].mean()


# ---------------------------------------------------------------------------
# Votes.
# ---------------------------------------------------------------------------


def test_votes_follow_the_tree(population):
    votes = {c: np.asarray(population[c]) for c in vote_columns()}
    for q in VOTE_TREE:
        asked = sum(votes[f"{VOTES_PREFIX}{q.name}_{a}"] for a in q.answers)
        if q.parent is None:
            np.testing.assert_array_equal(asked, population["n_volunteers"])
        else:
            parent = votes[f"{VOTES_PREFIX}{q.parent[0]}_{q.parent[1]}"]
            assert np.all(asked <= parent)
            assert np.all(asked[parent == 0] == 0)  # unasked questions carry no votes
    unlabelled = population["n_volunteers"] == 0
    assert unlabelled.sum() == round(0.25 * len(population))
    assert all(np.all(votes[c][unlabelled] == 0) for c in votes)
    assert np.all(population["n_volunteers"][~unlabelled] >= 5)


def test_majority_vote_recovers_bright_classes(population):
    votes = {c: np.asarray(population[c]) for c in vote_columns()}
    voted = class_from_votes(votes)
    bright = (population["mag_r"] < 16.5) & (population["n_volunteers"] > 0)
    assert bright.sum() > 20
    assert np.mean(voted[bright] == population["morph_class"][bright]) > 0.7
    assert np.all(voted[population["n_volunteers"] == 0] == -1)


# ---------------------------------------------------------------------------
# Determinism, configuration, MPI.
# ---------------------------------------------------------------------------


def test_same_seed_same_mock_other_seed_differs():
    cfg = MockConfig(n=30, seed=5)
    a = draw_population(cfg, SDSS, np.random.default_rng(5))
    b = draw_population(cfg, SDSS, np.random.default_rng(5))
    c = draw_population(cfg, SDSS, np.random.default_rng(6))
    for name in ("z_true", "flux_r", "ebv", VOTES_PREFIX + "merging_none"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["z_true"], c["z_true"])
    row = rows_of(a)[0]
    np.testing.assert_array_equal(render_galaxy(row, SDSS, np.random.default_rng([5, 0])),
                                  render_galaxy(row, SDSS, np.random.default_rng([5, 0])))
    assert not np.array_equal(render_galaxy(row, SDSS, np.random.default_rng([5, 0])),
                              render_galaxy(row, SDSS, np.random.default_rng([6, 0])))


@pytest.mark.parametrize("override", ["n=0", "specz_fraction=1.5", "z_max=0.9", "survey=hsc", "format=tiff",
                                      "image_size=0"])
def test_bad_config_is_a_config_error(override, tmp_path):
    key, value = override.split("=")
    cfg = MockConfig(out=str(tmp_path))
    setattr(cfg, key, type(getattr(cfg, key))(value))
    with pytest.raises(ConfigError, match=key):
        check_config(cfg)


def test_cli_reports_config_errors(tmp_path, capsys):
    assert cli_main(["mock", "--n", "3", "--out", str(tmp_path / "x"), "unlabeled_fraction=0.1"]) == 2
    assert "unlabelled_fraction" in capsys.readouterr().err


def test_run_mock_small_decals(tmp_path):
    out = tmp_path / "decals"
    assert run_mock(MockConfig(survey="decals", n=3, seed=2, out=str(out), progress=False)) == 0
    table = Table.read(out / "catalog.fits")
    assert fits.getdata(out / table["file"][0]).shape == (3, 152, 152)


@pytest.mark.mpi
def test_two_mpi_ranks_equal_one_process(mock_run, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not on PATH: install OpenMPI (apt-get install openmpi-bin) to run the MPI test")
    sslsky = Path(sys.executable).with_name("sslsky")
    out = tmp_path / "mpi"
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", str(sslsky), "mock",
                           "--survey", "sdss", "--n", str(N_RUN), "--seed", str(SEED), "--out", str(out),
                           "progress=false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on 2 rank(s)" in proc.stdout
    one, two = Table.read(mock_run / "catalog.fits"), Table.read(out / "catalog.fits")
    assert one.colnames == two.colnames
    for name in one.colnames:
        np.testing.assert_array_equal(one[name], two[name])
    for name in one["file"]:
        np.testing.assert_array_equal(fits.getdata(mock_run / name), fits.getdata(out / name))


# ---------------------------------------------------------------------------
# The Galaxy Zoo shape: --format png / jpeg.
# ---------------------------------------------------------------------------

N_PNG, SEED_PNG, SIZE_PNG = 6, 3, 64
IAU_PATTERN = re.compile(r"^J(\d{2})(\d{2})(\d{2}\.\d{2})([+-])(\d{2})(\d{2})(\d{2}\.\d)$")


def parse_iau(name: str) -> tuple[float, float]:
    """(ra, dec) [deg] of the lower corner of an IAU name's cell."""
    hh, mm, ss, sign, dd, dm, ds = IAU_PATTERN.match(name).groups()
    ra = 15.0 * (int(hh) + int(mm) / 60 + float(ss) / 3600)
    dec = (int(dd) + int(dm) / 60 + float(ds) / 3600) * (-1 if sign == "-" else 1)
    return ra, dec


@pytest.fixture(scope="module")
def png_run(tmp_path_factory) -> Path:
    """``sslsky mock --format png --image-size 64`` of N_PNG DECaLS galaxies, a third unlabelled."""
    out = tmp_path_factory.mktemp("mock_png") / "decals"
    rc = cli_main(["mock", "--survey", "decals", "--n", str(N_PNG), "--seed", str(SEED_PNG), "--out", str(out),
                   "--format", "png", "--image-size", str(SIZE_PNG), "unlabelled_fraction=0.34", "progress=false"])
    assert rc == 0
    return out


def test_png_images_are_8bit_rgb_galaxies(png_run):
    table = Table.read(png_run / "catalog.fits")
    assert not (png_run / "cutouts").exists() and not list((png_run / "images").glob(".*tmp*"))
    assert sorted(p.name for p in (png_run / "images").iterdir()) == sorted(Path(f).name for f in table["file_loc"])
    for name in table["file_loc"]:
        with Image.open(png_run / name) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE_PNG, SIZE_PNG)
            rgb = np.asarray(image)
        assert rgb.dtype == np.uint8
        grey = rgb.astype(np.float64).mean(axis=2)
        c, k = SIZE_PNG // 2, SIZE_PNG // 8
        centre = grey[c - k:c + k, c - k:c + k].mean()
        corners = np.mean([grey[:k, :k].mean(), grey[:k, -k:].mean(), grey[-k:, :k].mean(), grey[-k:, -k:].mean()])
        assert centre > corners + 30  # a galaxy in the middle, not a blank frame
        assert grey.max() > 100
        assert np.mean(rgb == 255) < 0.02  # not saturated


def test_png_pixels_are_the_fits_render(png_run):
    """Same physics and noise as --format fits: the image is the composite of render_galaxy's cube."""
    cfg = MockConfig(survey="decals", n=N_PNG, seed=SEED_PNG, unlabelled_fraction=0.34)
    truth = draw_population(cfg, DECALS, np.random.default_rng(SEED_PNG))
    table = Table.read(png_run / "catalog.fits")
    for name in ("z_true", "r50", "morph_class", "flux_r", "ebv", "z", "dec", "structure_seed", *vote_columns()):
        np.testing.assert_array_equal(table[name], truth[name])
    np.testing.assert_allclose(table["ra"], truth["ra"], atol=1e-4)  # moved only to make a name unique
    i = 2
    row = rows_of(truth)[i]
    cube = render_galaxy(row, DECALS, np.random.default_rng([SEED_PNG, i]))
    frame = frame_pixels(row["r50"], DECALS.pixel_scale, DECALS.cutout_size)
    assert DECALS.cutout_size // 2 <= frame <= DECALS.cutout_size
    assert table["image_pixel_scale"][i] == pytest.approx(frame * DECALS.pixel_scale / SIZE_PNG)
    expected = galaxy_zoo_rgb(cube, DECALS.bands, "decals", SIZE_PNG, frame)
    np.testing.assert_array_equal(np.asarray(Image.open(png_run / table["file_loc"][i])), expected)


def test_png_catalog_follows_galaxy_zoo(png_run):
    table = Table.read(png_run / "catalog.fits")
    assert len(table) == N_PNG
    assert table.colnames[:5] == ["id_str", "iauname", "file_loc", "ra", "dec"]
    assert "object_id" not in table.colnames and "file" not in table.colnames
    ids = [str(v) for v in table["id_str"]]
    assert len(set(ids)) == N_PNG and ids == [str(v) for v in table["iauname"]]
    for name, ra, dec, loc in zip(ids, table["ra"], table["dec"], table["file_loc"]):
        assert IAU_PATTERN.match(name), name
        assert loc == f"images/{name}.png"
        ra_name, dec_name = parse_iau(name)
        assert 0 <= (ra - ra_name) * 3600 / 15 < 0.01 + 1e-9  # truncated to 0.01 s of time
        assert 0 <= (abs(dec) - abs(dec_name)) * 3600 < 0.1 + 1e-9  # and 0.1 arcsec
    morph = np.asarray(table["morph_class"])
    np.testing.assert_array_equal(table["label"], np.where(np.isin(morph, [0, 1, 2]), 0, 1))
    assert np.issubdtype(table["label"].dtype, np.integer)
    assert [str(v) for v in table["label_name"]] == [LABEL_NAMES[v] for v in table["label"]]
    assert all(MORPH_CLASSES[c] == n for c, n in zip(table["morph_class"], table["morph_name"]))
    assert (table["n_volunteers"] == 0).sum() == 2
    for q in VOTE_TREE:
        counts = np.stack([np.asarray(table[f"{VOTES_PREFIX}{q.name}_{a}"], dtype=np.float64) for a in q.answers])
        total = counts.sum(axis=0)
        np.testing.assert_array_equal(table[f"{q.name}_total-votes"], total)
        for a, c in zip(q.answers, counts):
            fraction = np.asarray(table[f"{q.name}_{a}_fraction"])
            assert np.array_equal(np.isnan(fraction), total == 0)
            np.testing.assert_allclose(fraction[total > 0], c[total > 0] / total[total > 0], rtol=1e-12)
    assert np.isnan(np.asarray(table["smooth-or-featured_smooth_fraction"])[table["n_volunteers"] == 0]).all()


def test_jpeg_mock(tmp_path):
    out = tmp_path / "sdss"
    assert run_mock(MockConfig(survey="sdss", n=2, seed=4, out=str(out), format="jpeg", image_size=48,
                               progress=False)) == 0
    table = Table.read(out / "catalog.fits")
    for name in table["file_loc"]:
        assert name.endswith(".jpg")
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 48)


def test_iau_names_truncate_and_stay_unique():
    ra = 15.0 * (4 / 60 + 11.199 / 3600)
    dec = 2 + 9 / 60 + 24.09 / 3600
    assert list(iau_names([ra, 359.99999], [dec, -0.5])) == ["J000411.19+020924.0", "J235959.99-003000.0"]
    ra_in = np.array([10.0, 10.0, 10.0, 20.0])
    dec_in = np.array([5.0, 5.0, 5.0, -5.0])
    names, ra_out = unique_iau_names(ra_in, dec_in)
    assert len(set(names)) == 4 and list(names) == list(iau_names(ra_out, dec_in))
    assert np.all(np.abs(ra_out - ra_in) < 1e-3) and ra_out[0] == 10.0


def test_lupton_rgb_lives_in_data_rgb():
    from sslsky.eval import plots

    assert plots.lupton_rgb is lupton_rgb
    assert SURVEY_RGB_BANDS == {"sdss": "irg", "decals": "zrg"}
    cube = np.full((3, 8, 8), 1e-3, dtype=np.float32)
    cube[:, 3:5, 3:5] = [[[1.0]], [[2.0]], [[3.0]]]
    rgb = lupton_rgb(cube, "grz", "zrg")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].max() < 5 and rgb[4, 4, 0] > rgb[4, 4, 2] > 0  # z (red) brightest
    with pytest.raises(ValueError, match="rgb_bands"):
        lupton_rgb(cube, "grz", "irg")
