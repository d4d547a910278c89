"""Survey definitions and physical constants: the one place they live.

Every number here carries its source. Code elsewhere asks for
``SURVEYS["sdss"]`` rather than repeating a value.
"""

from __future__ import annotations

from dataclasses import dataclass

#: AB zero point of the nanomaggy: m = NMGY_ZEROPOINT - 2.5 log10(f / nmgy).
NMGY_ZEROPOINT = 22.5

#: Flat LambdaCDM used for distances in the mock (H0 in km/s/Mpc, Omega_m).
COSMOLOGY_H0 = 70.0
COSMOLOGY_OM0 = 0.3

#: Galactic E(B-V) over the footprint: scipy.stats.lognorm fit to the Legacy
#: Survey SFD values (shape, loc, scale); median about 0.03, most below 0.1.
EBV_LOGNORMAL = (0.673, 0.00115, 0.0334)

#: Blanton et al. 2003 (ApJ 592, 819) 0.1r-band Schechter function,
#: h = 1 units: M* - 5 log10 h, alpha, phi* [h^3 Mpc^-3].
BLANTON03_MSTAR_H1 = -20.44
BLANTON03_ALPHA = -1.05
BLANTON03_PHISTAR_H3 = 1.49e-2
#: Their evolution about z0 = 0.1 (Table 10, 0.1r): M*(z) = M*(z0) - Q (z - z0),
#: number density proportional to 10^(0.4 P (z - z0)).
BLANTON03_Q = 1.62
BLANTON03_P = 0.18
BLANTON03_Z0 = 0.1

#: SDSS Main Galaxy Sample spectroscopic limit (Strauss et al. 2002), r Petrosian.
MGS_R_LIMIT = 17.77


@dataclass(frozen=True)
class Survey:
    """Imaging properties of one survey; per-band tuples follow ``bands``."""

    name: str
    bands: tuple[str, ...]
    pixel_scale: float  # arcsec / pixel
    cutout_size: int  # pixels, square cutouts as distributed
    crop_size: int  # pixels the encoder sees after augmentation
    extinction: tuple[float, ...]  # A_band / E(B-V), Schlafly & Finkbeiner 2011
    sky_sigma: tuple[float, ...]  # nanomaggies / pixel, 1-sigma sky noise
    psf_fwhm: tuple[float, ...]  # arcsec, median seeing
    filters: tuple[str, ...]  # speclite response names

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    def band_index(self, band: str) -> int:
        try:
            return self.bands.index(band)
        except ValueError:
            raise ValueError(
                f"survey {self.name!r} has no band {band!r}; its bands are {', '.join(self.bands)}"
            ) from None


SURVEYS: dict[str, Survey] = {
    # Pasquet et al. 2019 (A&A 621, A26); Hayat et al. 2021 (ApJL 911, L33).
    "sdss": Survey(
        name="sdss",
        bands=("u", "g", "r", "i", "z"),
        pixel_scale=0.396,
        cutout_size=107,
        crop_size=64,
        extinction=(4.239, 3.303, 2.285, 1.698, 1.263),
        sky_sigma=(0.038, 0.018, 0.028, 0.043, 0.172),
        psf_fwhm=(1.69, 1.55, 1.43, 1.35, 1.28),
        filters=("sdss2010-u", "sdss2010-g", "sdss2010-r", "sdss2010-i", "sdss2010-z"),
    ),
    # DECaLS DR8-like: Dey et al. 2019 (AJ 157, 168). Sky noise per pixel from
    # the median 5-sigma point-source depths g=24.0, r=23.4, z=22.5 AB and
    # seeing 1.5/1.3/1.2": sigma_pix = f_5sigma / 5 / sqrt(4 pi sigma_psf^2).
    "decals": Survey(
        name="decals",
        bands=("g", "r", "z"),
        pixel_scale=0.262,
        cutout_size=152,
        crop_size=96,
        extinction=(3.214, 2.165, 1.211),
        sky_sigma=(0.0058, 0.0117, 0.029),
        psf_fwhm=(1.5, 1.3, 1.2),
        filters=("decam2014-g", "decam2014-r", "decam2014-z"),
    ),
}


def get_survey(name: str) -> Survey:
    """The survey called ``name`` (case-insensitive), with a clear error otherwise."""
    try:
        return SURVEYS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown survey {name!r}; choose one of {', '.join(SURVEYS)}") from None


def flux_to_mag(flux_nmgy):
    """AB magnitude of a flux in nanomaggies (NumPy arrays welcome)."""
    import numpy as np

    return NMGY_ZEROPOINT - 2.5 * np.log10(flux_nmgy)


def mag_to_flux(mag):
    """Flux in nanomaggies of an AB magnitude."""
    return 10.0 ** (-0.4 * (mag - NMGY_ZEROPOINT))


def reddening_factor(extinction, ebv):
    """Flux multiplier 10^(-0.4 R E(B-V)) for extinction coefficients R (per band).

    ``extinction`` has shape (C,), ``ebv`` any shape S; the result has shape S + (C,).
    """
    import numpy as np

    return 10.0 ** (-0.4 * np.multiply.outer(np.asarray(ebv, dtype=np.float64), np.asarray(extinction)))


# ---------------------------------------------------------------------------
# Added for the mock survey (sslsky/data/mock.py).
# ---------------------------------------------------------------------------

#: Absolute-magnitude range (r, AB, h = 0.7) over which the mock samples the Blanton et al. 2003
#: luminosity function; fainter galaxies almost never pass r <= 17.77 at z >= 0.005.
ABS_MAG_R_RANGE = (-24.0, -16.0)

#: Shen et al. 2003 (MNRAS 343, 978), r-band Petrosian half-light radius R50 [kpc, h = 0.7]
#: against M_r. Late types (Sersic n < 2.5), their eq. 15:
#: log10 R = -0.4 alpha M + (beta - alpha) log10(1 + 10^(-0.4 (M - M0))) + gamma.
SHEN03_LATE = {"alpha": 0.21, "beta": 0.53, "gamma": -1.31, "m0": -20.52}
#: Early types (n > 2.5), their eq. 14: log10 R = -0.4 a M + b.
SHEN03_EARLY = {"a": 0.65, "b": -5.06}
#: Scatter of ln R, their eq. 16: sigma = sigma2 + (sigma1 - sigma2) / (1 + 10^(-0.8 (M - M0))), with M0 = -20.52;
#: (sigma1, sigma2) from their Table 1 (late types 0.48, 0.25; early types 0.45, 0.27).
SHEN03_SCATTER_LATE = (0.48, 0.25)
SHEN03_SCATTER_EARLY = (0.45, 0.27)
SHEN03_SCATTER_M0 = -20.52

#: SDSS photo's de Vaucouleurs model is cut off beyond 7 r_e, reaching zero at 8 r_e
#: (Stoughton et al. 2002, AJ 123, 485); the mock truncates its Sersic profiles at 8 r50.
SERSIC_TRUNCATION_R50 = 8.0

#: R_V = A_V / E(B-V) of the Fitzpatrick (1999) curve behind the Schlafly & Finkbeiner 2011 coefficients;
#: A_band / A_V = R_band / R_V scales the dust lanes of edge-on mock disks.
DUST_R_V = 3.1
