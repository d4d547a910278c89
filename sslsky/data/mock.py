"""Mock survey: GalSim-rendered SDSS / DECaLS cutouts of galaxies with known truth.

    sslsky mock --survey sdss --n 1000 --seed 0 --out mock_sdss
    mpirun -n 4 sslsky mock --survey decals --n 10000 --seed 1 --out mock_decals

Three steps:

1. :func:`draw_population` -- the whole truth catalog, vectorised, from the master seed:
   redshift and luminosity from the Blanton et al. 2003 r-band luminosity
   function times the comoving volume, kept where the galaxy (with the
   K-correction of its own SED mix, :mod:`sslsky.data.mock_sed`) is brighter
   than the r-band limit of the SDSS Main Galaxy Sample; a Galaxy10-style
   morphology class that depends on luminosity; bulge / disk / bar / spiral-arm
   / merger-companion components with CWW template SEDs and Shen et al. 2003
   sizes; Milky-Way E(B-V), per-galaxy seeing, volunteer votes (:mod:`sslsky.data.votes`).
2. :func:`render_galaxy` -- one galaxy, all bands: GalSim profiles with the
   band fluxes of each component, reddened by 10^(-0.4 R_b E(B-V)), convolved
   with a Kolmogorov PSF of the galaxy's seeing, drawn noiselessly; then Gaussian
   sky noise from NumPy (sky-limited: no source shot noise, a fair approximation
   for SDSS/DECaLS galaxies whose surface brightness is mostly below the sky).
3. :func:`run_mock` -- ranks render contiguous blocks of the same population;
   galaxy i's noise comes from ``default_rng([seed, i])``, so the pixels do not
   depend on the number of ranks; rank 0 writes ``catalog.fits`` and ``config.yaml``.

Formats (``--format``). ``fits`` (default): ``cutouts/<object_id>.fits`` nanomaggy cubes and a catalog keyed
by the integer ``object_id``. ``png`` / ``jpeg``: the Galaxy Zoo DECaLS shape (galaxy-datasets convention),
for the path that trains on 8-bit colour images. Each galaxy is rendered exactly as for ``fits`` (same truth,
same noise), then :func:`sslsky.data.rgb.galaxy_zoo_rgb` makes a Lupton asinh composite (DECaLS z, r, g as
R, G, B; SDSS i, r, g) of a centred crop ~17 half-light radii wide (Galaxy Zoo's framing; at least half of
the cutout), north up, resampled with LANCZOS to ``image_size`` (424) and written to
``images/<iauname>.png`` (JPEG: quality 90). The catalog (:func:`galaxy_zoo_catalog`) has no ``object_id``:
it is keyed by IAU-style names ``id_str`` = ``iauname`` (``JHHMMSS.ss+DDMMSS.s``, truncated), with
``file_loc``, a two-class ``label`` (0 smooth, 1 featured) and vote fractions next to the counts.

Units: fluxes in nanomaggies, sizes in arcsec, angles in degrees.
Position angles are east of north: with the cutout WCS (x to the west, y to
the north) a major axis at PA points at ``PA + 90`` degrees counter-clockwise from +x.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import numpy as np
from astropy.table import Table

from sslsky.config import ConfigError, MockConfig, check_values, write_config
from sslsky.data.fits_io import write_cutout
from sslsky.data.mock_sed import TEMPLATES, Z_GRID, kcorrection
from sslsky.data.rgb import frame_pixels, galaxy_zoo_rgb
from sslsky.data.schema import FILE_LOC_COLUMN, VOTES_PREFIX
from sslsky.data.votes import MIN_VOLUNTEERS, draw_votes, image_difficulty, true_answers
from sslsky.outputs import atomic_output, output_dir
from sslsky.parallel import get_comm, split_evenly
from sslsky.surveys import (
    ABS_MAG_R_RANGE,
    BLANTON03_ALPHA,
    BLANTON03_MSTAR_H1,
    BLANTON03_P,
    BLANTON03_Q,
    BLANTON03_Z0,
    COSMOLOGY_H0,
    COSMOLOGY_OM0,
    DUST_R_V,
    EBV_LOGNORMAL,
    SERSIC_TRUNCATION_R50,
    SHEN03_EARLY,
    SHEN03_LATE,
    SHEN03_SCATTER_EARLY,
    SHEN03_SCATTER_LATE,
    SHEN03_SCATTER_M0,
    Survey,
    flux_to_mag,
    get_survey,
    mag_to_flux,
    reddening_factor,
)
from sslsky.vocabulary import MORPH_CLASSES, VOTE_TREE, vote_columns

__all__ = ["MORPH_CLASSES", "VOTE_TREE", "COMPONENTS", "vote_columns", "draw_population", "component_fluxes",
           "render_galaxy", "run_mock", "iau_names", "unique_iau_names", "galaxy_zoo_catalog", "FORMATS",
           "LABEL_NAMES"]

# ---------------------------------------------------------------------------
# Model choices (not measurements): the mock's morphology mix and structure.
# ---------------------------------------------------------------------------

#: Light components of a mock galaxy, in the order of :func:`component_fluxes` (``dust`` is negative flux).
COMPONENTS = ("bulge", "disk", "bar", "arms", "companion", "dust")
#: Early-type fraction against M_r: EARLY_MIN + EARLY_RANGE / (1 + exp((M - EARLY_M0) / EARLY_WIDTH));
#: ~15% at M_r = -18 rising to ~70% at -22.5, the trend of SDSS visual classifications (Nair & Abraham 2010).
EARLY_MIN, EARLY_RANGE, EARLY_M0, EARLY_WIDTH = 0.15, 0.6, -21.0, 0.6
#: Fraction of mergers / disturbed galaxies at any luminosity (Galaxy10 DECaLS: ~16% disturbed + merging).
MERGER_FRACTION = 0.10
#: Smooth classes 0, 1, 2 among early types; edge-on, barred, unbarred 3, 4, 5 among late types.
SMOOTH_SPLIT = (0.5, 0.4, 0.1)
DISK_SPLIT = (0.3, 0.25, 0.45)
#: Projected axis-ratio range of round, in-between, cigar smooth galaxies.
SMOOTH_Q = ((0.8, 1.0), (0.5, 0.8), (0.2, 0.5))
#: Quantised Sersic indices (a new n costs GalSim ~0.1 s of set-up): ellipticals, bulges, companions.
SMOOTH_N = (2.5, 3.0, 3.5, 4.0)
BULGE_N = (1.5, 2.5, 4.0)
COMPANION_N = (1.0, 4.0)
#: Intrinsic thickness of disks (Kregel et al. 2002: h_z / h_R ~ 0.1-0.2) and of their dust layer.
DISK_H_OVER_R = 0.12
DUST_H_OVER_R = 0.04
#: Largest half-light radius drawn, as a fraction of the cutout width (keeps GalSim's FFTs small).
MAX_R50_FRACTION = 0.3
#: Galactic E(B-V) is clipped here (the footprint avoids the plane).
EBV_MAX = 0.5
#: The patch of sky the mock galaxies are scattered over (deg), SDSS-north-like.
SKY_PATCH = (130.0, 230.0, 0.0, 60.0)
#: object_id = OBJECT_ID_BASE + row.
OBJECT_ID_BASE = 1_000_000_000
#: Knots per spiral arm.
KNOTS_PER_ARM = 10
#: Output formats: FITS cubes, or Galaxy-Zoo-style 8-bit colour images (file suffix of each).
FORMATS = {"fits": ".fits", "png": ".png", "jpeg": ".jpg"}
#: JPEG quality of ``--format jpeg`` images.
JPEG_QUALITY = 90
#: zlib level of ``--format png`` images: 1 writes a noisy 424^2 image ~4x faster than Pillow's default 6
#: (~20 ms against ~75 ms, more than the render) for ~20% more bytes; lossless either way.
PNG_COMPRESS_LEVEL = 1
#: Two-class ``label`` of the png/jpeg catalog: 0 = the smooth classes 0-2, 1 = featured (edge-on, barred,
#: unbarred, merger).
LABEL_NAMES = ("smooth", "featured")


@cache
def cosmology():
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=COSMOLOGY_H0, Om0=COSMOLOGY_OM0)


@cache
def _distance_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """On a fine z grid: z, distance modulus, angular-diameter distance [kpc], dV/dz/dOmega [Mpc^3/sr]."""
    cosmo = cosmology()
    z = np.linspace(1e-4, Z_GRID[-1], 5001)
    dm = cosmo.distmod(z).value
    da_kpc = cosmo.angular_diameter_distance(z).to_value("kpc")
    dvdz = cosmo.differential_comoving_volume(z).value
    return z, dm, da_kpc, dvdz


def distance_modulus(z: np.ndarray) -> np.ndarray:
    zg, dm, _, _ = _distance_grid()
    return np.interp(z, zg, dm)


def arcsec_per_kpc(z: np.ndarray) -> np.ndarray:
    zg, _, da, _ = _distance_grid()
    return 206264.806 / np.interp(z, zg, da)


def _inverse_cdf(x: np.ndarray, density: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Samples of a density tabulated on the grid x (piecewise-linear CDF) at uniforms u."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    return np.interp(u * cdf[-1], cdf, x)


def schechter_mag(m: np.ndarray) -> np.ndarray:
    """Blanton et al. 2003 Schechter function in absolute magnitude (h = 0.7), arbitrary normalisation."""
    mstar = BLANTON03_MSTAR_H1 + 5.0 * np.log10(COSMOLOGY_H0 / 100.0)
    x = 10.0 ** (-0.4 * (m - mstar))
    return x ** (BLANTON03_ALPHA + 1.0) * np.exp(-x)


def shen03_r50_kpc(m: np.ndarray, early: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half-light radius [kpc] from the Shen et al. 2003 size-luminosity relations with their scatter."""
    late = SHEN03_LATE
    log_late = (-0.4 * late["alpha"] * m + (late["beta"] - late["alpha"])
                * np.log10(1.0 + 10.0 ** (-0.4 * (m - late["m0"]))) + late["gamma"])
    log_early = -0.4 * SHEN03_EARLY["a"] * m + SHEN03_EARLY["b"]
    s1, s2 = np.where(early, SHEN03_SCATTER_EARLY[0], SHEN03_SCATTER_LATE[0]), \
        np.where(early, SHEN03_SCATTER_EARLY[1], SHEN03_SCATTER_LATE[1])
    sigma_ln = s2 + (s1 - s2) / (1.0 + 10.0 ** (-0.8 * (m - SHEN03_SCATTER_M0)))
    return 10.0 ** np.where(early, log_early, log_late) * np.exp(sigma_ln * rng.standard_normal(len(m)))


# ---------------------------------------------------------------------------
# Population.
# ---------------------------------------------------------------------------


def _template_code(name: str) -> int:
    return TEMPLATES.index(name)


def _draw_intrinsic(rng: np.random.Generator, m: int, cfg: MockConfig, survey: Survey) -> dict[str, np.ndarray]:
    """Intrinsic truth of m proposed galaxies (before the magnitude limit), all (m,) arrays."""
    zg, _, _, dvdz = _distance_grid()
    inside = (zg >= cfg.z_min) & (zg <= cfg.z_max)
    # Blanton et al. 2003 evolution: density x 10^(0.4 P (z - z0)); the Schechter shape shifts by -Q (z - z0).
    density_evolution = 10.0 ** (0.4 * BLANTON03_P * (zg[inside] - BLANTON03_Z0))
    z = _inverse_cdf(zg[inside], dvdz[inside] * density_evolution, rng.random(m))
    mg = np.linspace(*ABS_MAG_R_RANGE, 2001)
    mag = _inverse_cdf(mg, schechter_mag(mg), rng.random(m)) - BLANTON03_Q * (z - BLANTON03_Z0)

    p_early = EARLY_MIN + EARLY_RANGE / (1.0 + np.exp((mag - EARLY_M0) / EARLY_WIDTH))
    u = rng.random(m)
    early = u < p_early
    cls = np.where(early, rng.choice(3, m, p=SMOOTH_SPLIT), 3 + rng.choice(3, m, p=DISK_SPLIT))
    merger = rng.random(m) < MERGER_FRACTION
    cls = np.where(merger, 6, cls)

    t = {"z_true": z, "abs_mag_r": mag, "morph_class": cls.astype(np.int16)}
    # Merger: companion / primary flux, primary and companion luminosities.
    ratio = np.where(merger, rng.uniform(0.15, 1.0, m), 0.0)
    primary_share = 1.0 / (1.0 + ratio)
    m_primary = mag - 2.5 * np.log10(primary_share)
    t["is_merger"] = merger
    t["companion_flux_ratio"] = ratio

    smooth = cls <= 2
    primary_early = smooth | (merger & (rng.random(m) < 0.5))
    t["primary_smooth"] = primary_early

    # Bulge fraction (of the primary's rest-frame r light).
    bulge_frac = np.select([smooth, cls == 3, cls == 4, cls == 5, merger],
                           [1.0, rng.uniform(0.0, 0.4, m), rng.uniform(0.05, 0.5, m), rng.uniform(0.02, 0.5, m),
                            np.where(primary_early, rng.uniform(0.7, 1.0, m), rng.uniform(0.1, 0.5, m))])
    has_bar = cls == 4
    has_arms = (cls == 4) | (cls == 5)
    bar_frac = np.where(has_bar, rng.uniform(0.08, 0.2, m), 0.0)  # of the disk light (Gadotti 2009: ~0.1)
    arm_frac = np.where(has_arms, rng.uniform(0.2, 0.35, m), 0.0)  # of the disk light, in star-forming knots
    disk_light = primary_share * (1.0 - bulge_frac)
    t["bulge_frac"] = bulge_frac
    t["lfrac_bulge"] = primary_share * bulge_frac
    t["lfrac_disk"] = disk_light * (1.0 - bar_frac - arm_frac)
    t["lfrac_bar"] = disk_light * bar_frac
    t["lfrac_arms"] = disk_light * arm_frac
    t["lfrac_companion"] = 1.0 - primary_share

    # SEDs: bulges and bars old (E); disks Sbc or Scd; arms one template bluer; companions by their n.
    disk_sed = np.where(rng.random(m) < 0.55, _template_code("Sbc"), _template_code("Scd"))
    companion_n = np.asarray(COMPANION_N)[rng.integers(0, len(COMPANION_N), m)]
    t["sed_bulge"] = np.full(m, _template_code("E"))
    t["sed_disk"] = disk_sed
    t["sed_bar"] = np.full(m, _template_code("E"))
    t["sed_arms"] = disk_sed + 1
    t["sed_companion"] = np.where(companion_n >= 2.5, _template_code("E"), _template_code("Sbc"))

    # Sizes: Shen et al. 2003; galaxies are measured by their dominant component.
    max_r50 = MAX_R50_FRACTION * survey.cutout_size * survey.pixel_scale
    scale = arcsec_per_kpc(z)
    r50 = np.minimum(shen03_r50_kpc(m_primary, primary_early, rng) * scale, max_r50)
    t["r50"] = r50
    t["bulge_n"] = np.where(smooth, np.asarray(SMOOTH_N)[rng.integers(0, len(SMOOTH_N), m)],
                            np.asarray(BULGE_N)[rng.integers(0, len(BULGE_N), m)])
    t["bulge_r50"] = np.where(primary_early & (bulge_frac > 0.6), r50, r50 * rng.uniform(0.15, 0.35, m))
    t["disk_r50"] = np.where(bulge_frac < 1.0, np.where(primary_early & (bulge_frac > 0.6), 1.5 * r50, r50), 0.0)
    q_lo = np.select([cls == 0, cls == 1, cls == 2], [SMOOTH_Q[0][0], SMOOTH_Q[1][0], SMOOTH_Q[2][0]], 0.6)
    q_hi = np.select([cls == 0, cls == 1, cls == 2], [SMOOTH_Q[0][1], SMOOTH_Q[1][1], SMOOTH_Q[2][1]], 1.0)
    t["bulge_q"] = rng.uniform(q_lo, q_hi)
    # Disks: isotropic orientations below 75 deg for face-on-ish spirals, 80-90 deg for edge-on ones.
    cos_i = np.where(cls == 3, np.cos(np.radians(rng.uniform(80.0, 90.0, m))),
                     rng.uniform(np.cos(np.radians(75.0)), 1.0, m))
    t["inclination"] = np.degrees(np.arccos(cos_i))
    t["disk_q"] = np.sqrt(cos_i**2 + DISK_H_OVER_R**2 * (1.0 - cos_i**2))
    t["pa"] = rng.uniform(0.0, 180.0, m)
    t["has_bar"] = has_bar
    t["bar_frac"] = bar_frac
    t["bar_r50"] = np.where(has_bar, t["disk_r50"] * rng.uniform(0.4, 0.8, m), 0.0)
    t["bar_q"] = np.where(has_bar, rng.uniform(0.25, 0.4, m), 0.0)
    t["bar_angle"] = np.where(has_bar, rng.uniform(0.0, 180.0, m), 0.0)  # in the disk plane, from the major axis
    t["n_arms"] = np.where(has_arms, rng.choice([2, 3, 4], m, p=[0.6, 0.25, 0.15]), 0).astype(np.int16)
    t["arm_pitch"] = np.where(has_arms, rng.uniform(10.0, 30.0, m), 0.0)
    t["arm_frac"] = arm_frac
    # Edge-on dust lane: mid-plane optical depth in V.
    t["dust_tau_v"] = np.where(cls == 3, rng.uniform(0.5, 2.0, m), 0.0)
    # Merger companion: 1-3 primary half-light radii away, tidally sheared along the separation.
    m_comp = mag - 2.5 * np.log10(np.where(merger, 1.0 - primary_share, 1.0))
    t["companion_n"] = np.where(merger, companion_n, 0.0)
    t["companion_r50"] = np.where(merger, np.minimum(shen03_r50_kpc(m_comp, companion_n >= 2.5, rng) * scale,
                                                     max_r50), 0.0)
    t["companion_q"] = np.where(merger, rng.uniform(0.4, 1.0, m), 0.0)
    t["companion_sep"] = np.where(merger, np.minimum(rng.uniform(1.0, 3.0, m) * r50, max_r50), 0.0)
    t["companion_angle"] = np.where(merger, rng.uniform(0.0, 360.0, m), 0.0)
    t["tidal_shear"] = np.where(merger, rng.uniform(0.1, 0.3, m), 0.0)
    t["dist_mod"] = distance_modulus(z)
    return t


def component_fluxes(t: Mapping, survey: Survey) -> np.ndarray:
    """Intrinsic (before Milky-Way reddening) flux of every component in every band [nmgy].

    F = 10^(-0.4 (M_r + DM - 22.5)) * lfrac * 10^(-0.4 K_b(z)) per component (:mod:`sslsky.data.mock_sed`);
    the dust lane of edge-on disks removes ``(h_dust / h_disk) (1 - exp(-tau_b))`` of the disk flux with
    tau_b = tau_V R_b / R_V, so its negative surface brightness never exceeds the disk's.

    Args:
        t: columns (each (N,)) as written by :func:`draw_population`.
    Returns:
        (N, len(COMPONENTS), C) float64.
    """
    z = np.atleast_1d(np.asarray(t["z_true"], dtype=np.float64))
    base = mag_to_flux(np.atleast_1d(t["abs_mag_r"]) + np.atleast_1d(t["dist_mod"]))
    out = np.zeros((len(z), len(COMPONENTS), survey.n_bands))
    for k, comp in enumerate(COMPONENTS[:-1]):
        sed = np.atleast_1d(t[f"sed_{comp}"])
        codes = sed if np.issubdtype(np.asarray(sed).dtype, np.integer) else np.array([_template_code(str(s))
                                                                                        for s in sed])
        out[:, k] = (base * np.atleast_1d(t[f"lfrac_{comp}"]))[:, None] * 10.0 ** (
            -0.4 * kcorrection(codes, z, survey.filters))
    tau = np.atleast_1d(t["dust_tau_v"])[:, None] * np.asarray(survey.extinction)[None, :] / DUST_R_V
    out[:, -1] = -out[:, COMPONENTS.index("disk")] * (DUST_H_OVER_R / DISK_H_OVER_R) * (1.0 - np.exp(-tau))
    return out


def _select_population(cfg: MockConfig, survey: Survey, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Proposals from phi(M) dV/dz until cfg.n pass r <= cfg.r_limit (exact rejection sampling)."""
    r_index = survey.band_index("r")
    parts: list[dict[str, np.ndarray]] = []
    kept, proposed, accepted = 0, 0, 0
    while kept < cfg.n:
        rate = (accepted + 1) / (proposed + 100) if proposed else 0.01
        batch = int(min(max(2.0 * (cfg.n - kept) / rate, 10_000), 2_000_000))
        t = _draw_intrinsic(rng, batch, cfg, survey)
        r_flux = component_fluxes(t, survey)[:, :, r_index].sum(axis=1)
        keep = flux_to_mag(r_flux) <= cfg.r_limit
        parts.append({k: v[keep] for k, v in t.items()})
        proposed += batch
        accepted += int(keep.sum())
        kept += int(keep.sum())
    return {k: np.concatenate([p[k] for p in parts])[: cfg.n] for k in parts[0]}


def draw_population(cfg: MockConfig, survey: Survey, rng: np.random.Generator) -> Table:
    """Truth catalog of ``cfg.n`` galaxies (no pixels): contract columns, truth, fluxes, votes.

    Everything comes from ``rng`` in a fixed order, so every MPI rank draws the same table.
    """
    t = _select_population(cfg, survey, rng)
    n = cfg.n
    out = Table()
    out["object_id"] = OBJECT_ID_BASE + np.arange(n, dtype=np.int64)
    ra_lo, ra_hi, dec_lo, dec_hi = SKY_PATCH
    out["ra"] = rng.uniform(ra_lo, ra_hi, n)
    sin_dec = rng.uniform(np.sin(np.radians(dec_lo)), np.sin(np.radians(dec_hi)), n)  # uniform on the sphere
    out["dec"] = np.degrees(np.arcsin(sin_dec))
    z = t["z_true"].copy()
    z[rng.permutation(n)[: int(round((1.0 - cfg.specz_fraction) * n))]] = np.nan
    out["z"] = z
    from scipy.stats import lognorm

    out["ebv"] = np.clip(lognorm(*EBV_LOGNORMAL).rvs(size=n, random_state=rng), 0.0, EBV_MAX)
    out["file"] = [f"cutouts/{oid}.fits" for oid in out["object_id"]]
    out["morph_class"] = t["morph_class"].astype(np.int16)
    out["morph_name"] = np.array([MORPH_CLASSES[c] for c in t["morph_class"]])

    for name in ("z_true", "abs_mag_r", "dist_mod", "r50", "bulge_frac", "bulge_n", "bulge_r50", "bulge_q",
                 "disk_r50", "disk_q", "inclination", "pa", "has_bar", "bar_frac", "bar_r50", "bar_q", "bar_angle",
                 "n_arms", "arm_pitch", "arm_frac", "dust_tau_v", "is_merger", "companion_flux_ratio",
                 "companion_n", "companion_r50", "companion_q", "companion_sep", "companion_angle", "tidal_shear",
                 "primary_smooth"):
        out[name] = t[name]
    for comp in COMPONENTS[:-1]:
        out[f"sed_{comp}"] = np.array([TEMPLATES[c] for c in t[f"sed_{comp}"]])
        out[f"lfrac_{comp}"] = t[f"lfrac_{comp}"]
    out["structure_seed"] = rng.integers(0, 2**62, n, dtype=np.int64)  # arm knots of galaxy i

    seeing = np.exp(cfg.seeing_scatter * rng.standard_normal(n))
    out["seeing_factor"] = seeing
    for b, band in enumerate(survey.bands):
        out[f"psf_fwhm_{band}"] = survey.psf_fwhm[b] * seeing
        out[f"sky_sigma_{band}"] = np.full(n, survey.sky_sigma[b])
    intrinsic = component_fluxes(t, survey).sum(axis=1)  # (N, C)
    observed = intrinsic * reddening_factor(survey.extinction, np.asarray(out["ebv"]))
    for b, band in enumerate(survey.bands):
        out[f"flux_intrinsic_{band}"] = intrinsic[:, b]
        out[f"flux_{band}"] = observed[:, b]
        out[f"mag_{band}"] = flux_to_mag(observed[:, b])

    # Volunteer votes.
    volunteers = np.maximum(rng.poisson(cfg.volunteers_mean, n), MIN_VOLUNTEERS)
    volunteers[rng.permutation(n)[: int(round(cfg.unlabelled_fraction * n))]] = 0
    truth = true_answers(np.asarray(t["morph_class"]), t["primary_smooth"], t["bulge_q"], t["companion_flux_ratio"])
    mag_r = flux_to_mag(intrinsic[:, survey.band_index("r")])
    difficulty = image_difficulty(mag_r, t["r50"], np.asarray(out["psf_fwhm_r"]))
    out["vote_difficulty"] = difficulty
    out["n_volunteers"] = volunteers.astype(np.int32)
    for name, counts in draw_votes(rng, truth, difficulty, volunteers).items():
        out[name] = counts
    return out


# ---------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------


def _truncated_sersic(n: float, r50: float):
    import galsim

    return galsim.Sersic(n=float(n), half_light_radius=float(r50), trunc=SERSIC_TRUNCATION_R50 * float(r50))


def _arm_knots(row: Mapping, rng: np.random.Generator):
    """Face-on logarithmic spiral arms of Gaussian knots, unit flux (x along the disk's major axis)."""
    import galsim

    n_arms = int(row["n_arms"])
    scale_length = float(row["disk_r50"]) / 1.678  # exponential: r50 = 1.678 h
    pitch = np.radians(float(row["arm_pitch"]))
    r = scale_length * rng.uniform(0.6, 3.5, (n_arms, KNOTS_PER_ARM))
    phase = rng.uniform(0.0, 2.0 * np.pi) + 2.0 * np.pi * np.arange(n_arms)[:, None] / n_arms
    theta = phase + np.log(r / scale_length) / np.tan(pitch) + rng.normal(0.0, 0.15, r.shape)
    weight = r * np.exp(-r / scale_length) * rng.lognormal(0.0, 0.4, r.shape)  # follow the disk's annular light
    weight = (weight / weight.sum()).ravel()
    sigma = max(0.2 * scale_length, 0.1)
    x, y = (r * np.cos(theta)).ravel(), (r * np.sin(theta)).ravel()
    return galsim.Sum([galsim.Gaussian(sigma=sigma, flux=w).shift(dx, dy) for w, dx, dy in zip(weight, x, y)])


def galaxy_shapes(row: Mapping) -> dict:
    """Unit-flux GalSim profile of each present component of one galaxy, positioned and oriented."""
    import galsim

    beta = (float(row["pa"]) + 90.0) * galsim.degrees
    q_disk = float(row["disk_q"])
    shapes = {}
    if row["lfrac_bulge"] > 0:
        shapes["bulge"] = _truncated_sersic(row["bulge_n"], row["bulge_r50"]).shear(q=float(row["bulge_q"]),
                                                                                     beta=beta)
    if row["lfrac_disk"] > 0:
        if row["morph_class"] == 3:
            incl = float(row["inclination"]) * galsim.degrees
            r50 = float(row["disk_r50"])
            shapes["disk"] = galsim.InclinedExponential(incl, half_light_radius=r50,
                                                        scale_h_over_r=DISK_H_OVER_R).rotate(beta)
            if row["dust_tau_v"] > 0:
                shapes["dust"] = galsim.InclinedExponential(incl, half_light_radius=r50,
                                                            scale_h_over_r=DUST_H_OVER_R).rotate(beta)
        else:
            # Thin disk seen at inclination i: face-on profile squeezed by cos i along y, then rotated.
            def project(face_on):
                return face_on.transform(1.0, 0.0, 0.0, q_disk).rotate(beta)

            shapes["disk"] = project(galsim.Exponential(half_light_radius=float(row["disk_r50"])))
            if row["lfrac_bar"] > 0:
                # n = 0.5 Sersic bar (a Gaussian) in the disk plane.
                bar = galsim.Gaussian(half_light_radius=float(row["bar_r50"])).shear(q=float(row["bar_q"]),
                                                                                     beta=0.0 * galsim.degrees)
                shapes["bar"] = project(bar.rotate(float(row["bar_angle"]) * galsim.degrees))
            if row["lfrac_arms"] > 0:
                shapes["arms"] = project(_arm_knots(row, np.random.default_rng(int(row["structure_seed"]))))
    if row["lfrac_companion"] > 0:
        angle = np.radians(float(row["companion_angle"]))
        sep = float(row["companion_sep"])
        tidal = galsim.Shear(g=float(row["tidal_shear"]), beta=float(row["companion_angle"]) * galsim.degrees)
        companion = _truncated_sersic(row["companion_n"], row["companion_r50"]).shear(
            q=float(row["companion_q"]), beta=(float(row["pa"]) + 45.0) * galsim.degrees)
        shapes["companion"] = companion.shear(tidal).shift(sep * np.cos(angle), sep * np.sin(angle))
        for name in ("bulge", "disk"):
            if name in shapes:
                shapes[name] = shapes[name].shear(tidal)
    return shapes


def render_galaxy(row: Mapping, survey: Survey, noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """All bands of one galaxy in nanomaggies per pixel.

    Args:
        row: one catalog row (astropy Row or dict of scalars) from :func:`draw_population`.
        noise_rng: Gaussian sky noise of ``survey.sky_sigma`` from this generator; None: noiseless.
    Returns:
        (C, H, W) float32, C = survey.n_bands, H = W = survey.cutout_size.
    """
    import galsim

    fluxes = component_fluxes({k: np.atleast_1d(row[k]) for k in _FLUX_KEYS}, survey)[0]  # (K, C)
    fluxes = fluxes * reddening_factor(survey.extinction, float(row["ebv"]))[None, :]
    shapes = galaxy_shapes(row)
    size = survey.cutout_size
    image = galsim.ImageD(size, size, scale=survey.pixel_scale)
    cube = np.empty((survey.n_bands, size, size), dtype=np.float64)
    for b, band in enumerate(survey.bands):
        parts = [shape.withFlux(fluxes[COMPONENTS.index(name), b]) for name, shape in shapes.items()]
        psf = galsim.Kolmogorov(fwhm=float(row[f"psf_fwhm_{band}"]))
        galsim.Convolve([galsim.Sum(parts), psf]).drawImage(image=image)
        cube[b] = image.array
    if noise_rng is not None:
        cube += noise_rng.standard_normal(cube.shape) * np.asarray(survey.sky_sigma)[:, None, None]
    return cube.astype(np.float32)


_FLUX_KEYS = ("z_true", "abs_mag_r", "dist_mod", "dust_tau_v") + tuple(
    f"{p}_{c}" for c in COMPONENTS[:-1] for p in ("sed", "lfrac"))


# ---------------------------------------------------------------------------
# The Galaxy Zoo shape (png / jpeg).
# ---------------------------------------------------------------------------

#: One unit of the last digit of an IAU name: 0.01 s of right ascension [deg].
_RA_UNIT_DEG = 0.01 * 15.0 / 3600.0


def iau_names(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """IAU-style names ``JHHMMSS.ss+DDMMSS.s`` of positions [deg], truncated (not rounded), the SDSS convention."""
    ra = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
    dec = np.asarray(dec, dtype=np.float64)
    ra_cs = np.minimum(np.floor(ra / 15.0 * 360000.0), 24 * 360000 - 1).astype(np.int64)  # centiseconds of time
    dec_ds = np.minimum(np.floor(np.abs(dec) * 36000.0), 90 * 36000).astype(np.int64)  # deci-arcseconds
    names = []
    for t, d, sign in zip(ra_cs, dec_ds, np.where(dec < 0, "-", "+")):
        names.append(f"J{t // 360000:02d}{t // 6000 % 60:02d}{t % 6000 // 100:02d}.{t % 100:02d}"
                     f"{sign}{d // 36000:02d}{d // 600 % 60:02d}{d % 600 // 10:02d}.{d % 10:d}")
    return np.array(names)


def unique_iau_names(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IAU names made unique: (names, ra) with the ra of a later row that shares a name moved east by 0.01 s.

    Two mock galaxies fall in the same 0.15" x 0.1" name cell only by chance (~n^2 / 10^13 pairs); the later
    row's right ascension is shifted one name unit (0.15", far below a pixel) until its name is free, so
    the names stay unique and consistent with the catalog's ra.
    """
    ra = np.mod(np.array(ra, dtype=np.float64), 360.0)
    names = iau_names(ra, dec)
    while True:
        _, first = np.unique(names, return_index=True)
        later = np.setdiff1d(np.arange(len(names)), first)
        if not len(later):
            return names, ra
        ra[later] = np.mod(ra[later] + _RA_UNIT_DEG, 360.0)
        names[later] = iau_names(ra[later], np.asarray(dec)[later])


def galaxy_zoo_catalog(table: Table, survey: Survey, cfg: MockConfig) -> Table:
    """The truth table of :func:`draw_population` in the galaxy-datasets (Galaxy Zoo DECaLS) convention.

    Columns, in order: ``id_str``, ``iauname`` (the same IAU-style name), ``file_loc``
    (``images/<name>.png``), ``ra``, ``dec``, ``z``, ``ebv``, ``morph_class``, ``morph_name``, ``label``
    (0 smooth = morph_class 0-2, 1 featured), ``label_name``, ``image_pixel_scale`` (arcsec per pixel of
    the written image), then every other truth and vote-count column as :func:`draw_population` writes
    them, then per question ``<question>_total-votes`` and ``<question>_<answer>_fraction`` (count / total
    answers to the question; NaN where nobody answered it). No ``object_id`` and no ``file``.
    """
    names, ra = unique_iau_names(np.asarray(table["ra"]), np.asarray(table["dec"]))
    morph = np.asarray(table["morph_class"])
    frames = np.array([frame_pixels(r, survey.pixel_scale, survey.cutout_size) for r in np.asarray(table["r50"])])
    out = Table()
    out["id_str"] = names
    out["iauname"] = names
    out[FILE_LOC_COLUMN] = np.array([f"images/{name}{FORMATS[cfg.format]}" for name in names])
    out["ra"] = ra
    out["dec"] = table["dec"]
    for name in ("z", "ebv", "morph_class", "morph_name"):
        out[name] = table[name]
    label = (morph >= 3).astype(np.int16)
    out["label"] = label
    out["label_name"] = np.array([LABEL_NAMES[v] for v in label])
    out["image_pixel_scale"] = frames * survey.pixel_scale / cfg.image_size
    for name in table.colnames:
        if name not in out.colnames and name not in ("object_id", "file"):
            out[name] = table[name]
    for q in VOTE_TREE:
        counts = {a: np.asarray(table[f"{VOTES_PREFIX}{q.name}_{a}"]) for a in q.answers}
        total = sum(counts.values())
        out[f"{q.name}_total-votes"] = total.astype(np.int32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for a, c in counts.items():
                out[f"{q.name}_{a}_fraction"] = np.where(total > 0, c / total, np.nan)
    return out


def _write_rgb(path: Path, rgb: np.ndarray, fmt: str) -> None:
    """8-bit RGB PNG / JPEG, atomically (temp name in the same folder, then rename)."""
    from PIL import Image

    image = Image.fromarray(rgb, mode="RGB")
    with atomic_output(path, "image") as tmp:
        if fmt == "jpeg":
            image.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def check_config(cfg: MockConfig) -> Survey:
    """The survey of ``cfg``; ConfigError naming the key for values out of range."""
    try:
        survey = get_survey(cfg.survey)
    except ValueError as err:
        raise ConfigError(f"survey: {err}") from None
    problems = check_values(cfg)  # the ranges of MockConfig (sslsky.config), for a config built in code too
    if cfg.z_max > Z_GRID[-1]:
        problems.append(f"z_max={cfg.z_max}: the SED grid reaches z={Z_GRID[-1]}; choose z_max <= {Z_GRID[-1]}")
    if not cfg.out:
        problems.append("out: give an output folder (--out DIR)")
    if cfg.format not in FORMATS:
        problems.append(f"format={cfg.format!r}: must be one of {', '.join(FORMATS)}")
    if problems:
        raise ConfigError("; ".join(problems))
    return survey


def _row_dicts(table: Table):
    """Rows of a table as dicts of scalars (much faster to index than astropy Rows)."""
    columns = {name: np.asarray(table[name]) for name in table.colnames}
    for i in range(len(table)):
        yield i, {name: col[i] for name, col in columns.items()}


def run_mock(cfg: MockConfig) -> int:
    """``sslsky mock``: cutouts (or PNG/JPEG images) of rank-owned galaxies, then rank 0 writes catalog.fits.

    Returns 0.
    """
    survey = check_config(cfg)
    output_dir(cfg.out, "out")  # a file or a read-only folder: a message before any galaxy is drawn (every rank)
    comm = get_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(cfg.out)
    start = time.perf_counter()
    rgb = cfg.format != "fits"
    if rank == 0:
        (out / ("images" if rgb else "cutouts")).mkdir(parents=True, exist_ok=True)
    table = draw_population(cfg, survey, np.random.default_rng(cfg.seed))
    if rgb:
        table = galaxy_zoo_catalog(table, survey, cfg)
    comm.barrier()

    mine = split_evenly(len(table), size, rank)
    rows = _row_dicts(table[mine.start:mine.stop])
    if rank == 0 and cfg.progress:
        from sslsky.progress import track

        rows = track(rows, f"mock {survey.name} (rank 0 of {size})", "gal", total=len(mine))
    render_start = time.perf_counter()
    for local, row in rows:
        i = mine.start + local
        cube = render_galaxy(row, survey, np.random.default_rng([cfg.seed, i]))
        if rgb:
            frame = frame_pixels(row["r50"], survey.pixel_scale, survey.cutout_size)
            image = galaxy_zoo_rgb(cube, survey.bands, survey.name, cfg.image_size, frame)
            _write_rgb(out / row[FILE_LOC_COLUMN], image, cfg.format)
        else:
            write_cutout(out / row["file"], cube, survey.bands, survey.pixel_scale, row["ra"], row["dec"],
                         survey.name)
    render_time = time.perf_counter() - render_start
    timings = comm.gather((len(mine), render_time), root=0)
    comm.barrier()

    if rank == 0:
        table.meta["SURVEY"] = survey.name
        table.meta["SEED"] = cfg.seed
        if rgb:
            table.meta["FORMAT"] = cfg.format
            table.meta["IMSIZE"] = cfg.image_size
        with atomic_output(out / "catalog.fits", "catalog") as tmp:
            table.write(tmp, format="fits", overwrite=True)
        write_config(cfg, out / "config.yaml")
        done = sum(n for n, _ in timings)
        busy = sum(t for _, t in timings)
        rate = done / busy if busy > 0 else float("nan")
        shape = (f"{cfg.format} RGB {cfg.image_size}x{cfg.image_size}" if rgb else
                 f"{survey.n_bands}x{survey.cutout_size}x{survey.cutout_size}")
        print(f"sslsky mock: {len(table)} {survey.name} galaxies ({shape}) -> {out}/catalog.fits; "
              f"{time.perf_counter() - start:.1f} s on {size} rank(s), "
              f"{rate:.1f} galaxies/s per core; median z {np.median(table['z_true']):.3f}, "
              f"r <= {cfg.r_limit}", flush=True)
    comm.barrier()
    return 0
