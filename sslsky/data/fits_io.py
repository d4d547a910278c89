"""Cutout FITS files: one (bands, H, W) cube in nanomaggies per object.

The header follows the Legacy Survey cutout service: ``BANDS`` (e.g.
``"ugriz"``), ``PIXSCALE`` (arcsec/pixel), ``BUNIT`` and a celestial TAN WCS
centred on the object.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

BUNIT = "nanomaggy"


def cutout_header(bands: str | tuple[str, ...], pixel_scale: float, ra: float, dec: float,
                  size: tuple[int, int], survey: str = "") -> fits.Header:
    """FITS header of a cutout: BANDS, PIXSCALE, BUNIT and a TAN WCS centred on (ra, dec)."""
    height, width = size
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [float(ra), float(dec)]
    wcs.wcs.crpix = [(width + 1) / 2.0, (height + 1) / 2.0]
    wcs.wcs.cd = np.array([[-pixel_scale / 3600.0, 0.0], [0.0, pixel_scale / 3600.0]])
    header = wcs.to_header()
    header["BANDS"] = ("".join(bands), "band of each plane, first axis")
    header["PIXSCALE"] = (float(pixel_scale), "arcsec / pixel")
    header["BUNIT"] = (BUNIT, "m = 22.5 - 2.5 log10(flux)")
    if survey:
        header["SURVEY"] = survey
    return header


def write_cutout(path: str | os.PathLike, cube: np.ndarray, bands, pixel_scale: float,
                 ra: float, dec: float, survey: str = "") -> Path:
    """Write a (C, H, W) float32 cube atomically (temp name, then rename)."""
    path = Path(path)
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3 or cube.shape[0] != len(bands):
        raise ValueError(f"{path}: cube of shape {cube.shape} does not match {len(bands)} bands")
    header = cutout_header(bands, pixel_scale, ra, dec, cube.shape[1:], survey)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fits.PrimaryHDU(data=cube, header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path
