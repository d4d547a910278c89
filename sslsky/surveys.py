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
