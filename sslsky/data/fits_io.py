"""Cutout FITS files: one (bands, H, W) cube in nanomaggies per object.

The header follows the Legacy Survey cutout service: ``BANDS`` (e.g.
``"ugriz"``), ``PIXSCALE`` (arcsec/pixel), ``BUNIT`` and a celestial TAN WCS
centred on the object.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS

from sslsky.data.schema import BAND_PLACEHOLDER, RGB_BANDS, RGB_SUFFIXES
from sslsky.outputs import atomic_output

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
    with atomic_output(path, "cutout") as tmp:
        fits.PrimaryHDU(data=cube, header=header).writeto(tmp, overwrite=True)
    return path


# ---------------------------------------------------------------------------
# Readers: FITS cubes, SDSS one-file-per-band images, 8-bit colour images,
# rows of an ssl-sky-surveys HDF5 file. Every problem with one cutout raises
# CutoutError(path, reason) so the packer can list it and go on.
# ---------------------------------------------------------------------------


class CutoutError(Exception):
    """One cutout that cannot be packed: the file and what is wrong with it."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Cutout:
    """A cutout as read from disk, before the packer's checks."""

    data: np.ndarray  # (C, H, W) float32, uint8 for colour images
    bands: str  # one letter per plane, "RGB" for colour images
    pixel_scale: float | None  # arcsec / pixel, None when the file does not say
    survey: str = ""  # from the SURVEY keyword when present
    photometric: bool = True  # False for 8-bit colour images (not fluxes)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CutoutError(path, "file not found")
    if not path.is_file():
        raise CutoutError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise CutoutError(path, "empty file (0 bytes)")


#: BITPIX -> big-endian NumPy dtype of the FITS data array.
_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
FITS_BLOCK = 2880


def _card_value(field: str):
    """Value of the 70-character value field of a FITS card: str, bool, int or float (None when unparsable)."""
    text = field.strip()
    if text.startswith("'"):
        end, out = 1, []
        while end < len(text):
            quote = text.find("'", end)
            if quote < 0:
                return None
            out.append(text[end:quote])
            if text[quote + 1:quote + 2] == "'":  # '' is an escaped quote
                out.append("'")
                end = quote + 2
                continue
            return "".join(out).rstrip()
        return None
    text = text.split("/", 1)[0].strip()
    if text in ("T", "F"):
        return text == "T"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text.replace("D", "E"))
    except ValueError:
        return None


def _read_simple_fits(path: Path) -> tuple[np.ndarray, dict] | None:
    """Fast path for the common cutout: an unscaled image in the primary HDU.

    Parses the header cards directly (astropy spends ~1 ms per file building
    its Header). Returns None for anything else -- compressed, scaled, data in
    an extension, not FITS at all -- which then goes through astropy.
    """
    raw = path.read_bytes()
    if not raw.startswith(b"SIMPLE  ="):
        return None
    header, offset = {}, 0
    while True:
        block = raw[offset:offset + FITS_BLOCK]
        if len(block) < FITS_BLOCK:
            return None  # header cut short: let astropy describe it
        offset += FITS_BLOCK
        ended = False
        for start in range(0, FITS_BLOCK, 80):
            card = block[start:start + 80].decode("ascii", errors="replace")
            key = card[:8].strip()
            if key == "END":
                ended = True
                break
            if card[8:10] == "= " and key not in header:
                header[key] = _card_value(card[10:])
        if ended:
            break
    naxis, bitpix = header.get("NAXIS"), header.get("BITPIX")
    if header.get("SIMPLE") is not True or naxis not in (2, 3) or bitpix not in _BITPIX_DTYPES:
        return None
    if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or "BLANK" in header:
        return None
    shape = tuple(header.get(f"NAXIS{i}") for i in range(naxis, 0, -1))
    if not all(isinstance(n, int) and n > 0 for n in shape):
        return None
    dtype = np.dtype(_BITPIX_DTYPES[bitpix])
    needed = dtype.itemsize * int(np.prod(shape))
    if len(raw) - offset < needed:
        raise CutoutError(path, f"truncated FITS file: the header announces {needed} data bytes, "
                                f"the file holds {len(raw) - offset}")
    padded = -(-needed // FITS_BLOCK) * FITS_BLOCK
    if len(raw) > offset + padded and raw[offset + padded:offset + padded + 8] == b"XTENSION":
        return None  # more HDUs follow (one plane per band): astropy reads them all
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    return data.astype(np.float32), header


#: Header keywords kept from each image HDU: bands, pixel scale (or the WCS that gives it), survey.
_HEADER_KEYS = ("BANDS", "BAND", "FILTER", "EXTNAME", "PIXSCALE", "SURVEY", "CD1_1", "CD1_2", "CD2_1", "CD2_2",
                "CDELT1", "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2")


def _header_dict(header) -> dict:
    keys = [key for key in header if key in _HEADER_KEYS or (key.startswith("BAND") and key[4:].isdigit())]
    return {key: header[key] for key in keys}


def _check_length(hdu, path: Path) -> None:
    """Truncation of an uncompressed image HDU, reported per file (astropy only warns)."""
    if isinstance(hdu, fits.CompImageHDU):
        return
    header = hdu.header
    naxes = [header[f"NAXIS{i}"] for i in range(1, header["NAXIS"] + 1)]
    needed = abs(header["BITPIX"]) // 8 * int(np.prod(naxes))
    have = path.stat().st_size - hdu.fileinfo()["datLoc"]
    if have < needed:
        raise CutoutError(path, f"truncated FITS file: the header announces {needed} data bytes, "
                                f"the file holds {max(have, 0)}")


def _hdu_band(header: dict) -> str:
    """The band of a one-plane HDU: BAND, FILTER, or a one-letter EXTNAME ("" when none says)."""
    for key in ("BAND", "FILTER", "BAND0"):
        value = str(header.get(key, "")).strip()
        if value:
            return value
    name = str(header.get("EXTNAME", "")).strip()
    return name.lower() if len(name) == 1 else ""  # FITS writers upper-case EXTNAME ('G' for band g)


def _read_fits_image(path: Path) -> tuple[np.ndarray, dict]:
    """Data (native float32) and header keywords of the image, with truncation detected.

    The image is the first image HDU; when it is one 2D plane and more 2D planes of the same size follow in
    further HDUs (a cutout saved one HDU per band), they are stacked into a (bands, H, W) cube whose BANDS
    come from each HDU's BAND / FILTER / one-letter EXTNAME.
    """
    _check_file(path)
    simple = _read_simple_fits(path)
    if simple is not None:
        return simple
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)  # truncation is reported below, per file
            with fits.open(path, memmap=False) as hdul:
                hdus = [hdu for hdu in hdul if hdu.is_image and hdu.header.get("NAXIS", 0) > 0]
                if not hdus:
                    raise CutoutError(path, "FITS file holds no image HDU")
                _check_length(hdus[0], path)
                data, header = hdus[0].data, _header_dict(hdus[0].header)
                planes = [hdu for hdu in hdus if hdu.header.get("NAXIS") == 2]
                if data is not None and data.ndim == 2 and len(planes) > 1:
                    for hdu in planes[1:]:
                        _check_length(hdu, path)
                    arrays = [np.asarray(hdu.data, dtype=np.float32) for hdu in planes]
                    if any(a.shape != arrays[0].shape for a in arrays):
                        raise CutoutError(path, "its image HDUs differ in size: "
                                                + ", ".join(f"{a.shape[0]}x{a.shape[1]}" for a in arrays))
                    bands = [_hdu_band(_header_dict(hdu.header)) for hdu in planes]
                    data = np.stack(arrays)
                    header.pop("BAND0", None)
                    header["BANDS"] = "".join(bands) if all(len(b) == 1 for b in bands) else ""
    except CutoutError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        raise CutoutError(path, f"not a readable FITS file ({type(err).__name__}: {err})") from None
    if data is None:
        raise CutoutError(path, "FITS image HDU has no data")
    return np.asarray(data, dtype=np.float32), header


def header_bands(header: dict, n_planes: int) -> str:
    """Bands of the planes: BANDS, else BAND0..BANDn-1 (the Legacy Survey cutout service), else ""."""
    bands = str(header.get("BANDS", "")).strip()
    if bands:
        return bands
    numbered = [str(header.get(f"BAND{i}", "")).strip() for i in range(n_planes)]
    if all(len(b) == 1 for b in numbered):
        return "".join(numbered)
    return _hdu_band(header) if n_planes == 1 else ""


def header_pixel_scale(header: dict) -> float | None:
    """Arcsec per pixel: PIXSCALE, else from the WCS (sqrt |det CD|, or sqrt |CDELT1 CDELT2 det PC| as astropy
    writes a CD matrix), else None."""
    if header.get("PIXSCALE") is not None:
        return float(header["PIXSCALE"])
    cd = [header.get(key) for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")]
    if cd[0] is not None and cd[3] is not None:
        c11, c12, c21, c22 = (float(v or 0.0) for v in cd)
        return float(np.sqrt(abs(c11 * c22 - c12 * c21)) * 3600.0)
    if header.get("CDELT2") is not None:
        cdelt1 = float(header.get("CDELT1", header["CDELT2"]))
        p11, p12, p21, p22 = (float(header.get(key, default)) for key, default in
                              (("PC1_1", 1.0), ("PC1_2", 0.0), ("PC2_1", 0.0), ("PC2_2", 1.0)))
        return float(np.sqrt(abs(cdelt1 * float(header["CDELT2"]) * (p11 * p22 - p12 * p21))) * 3600.0)
    return None


def read_fits_cube(path: str | os.PathLike) -> Cutout:
    """A (C, H, W) cube with BANDS/PIXSCALE in the header (a 2D image counts as one band)."""
    path = Path(path)
    data, header = _read_fits_image(path)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise CutoutError(path, f"expected a (bands, H, W) cube, got an array of shape {data.shape}")
    bands = header_bands(header, data.shape[0])
    return Cutout(data, bands, header_pixel_scale(header), str(header.get("SURVEY", "")).strip())


def read_band_files(template: str | os.PathLike, bands: str | tuple[str, ...]) -> Cutout:
    """SDSS-style cutouts: one 2D FITS image per band, ``template`` holding ``{band}``."""
    planes, scale = [], None
    for band in bands:
        path = Path(str(template).replace(BAND_PLACEHOLDER, band))
        data, header = _read_fits_image(path)
        if data.ndim == 3 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 2:
            raise CutoutError(path, f"expected one 2D image for band {band!r}, got an array of shape {data.shape}")
        if planes and data.shape != planes[0].shape:
            raise CutoutError(path, f"band {band!r} image is {data.shape[0]}x{data.shape[1]}, the "
                                    f"{bands[0]!r} image is {planes[0].shape[0]}x{planes[0].shape[1]}")
        planes.append(data)
        scale = header_pixel_scale(header) or scale
    return Cutout(np.stack(planes), "".join(bands), scale)


def read_rgb_image(path: str | os.PathLike) -> Cutout:
    """8-bit colour PNG/JPEG -> (3, H, W) uint8; not photometric."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("RGBA", "P", "PA"):
                image = image.convert("RGB")
            elif mode != "RGB":
                raise CutoutError(path, f"expected an 8-bit RGB image (3 bands), got Pillow mode {mode!r}")
            data = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    except CutoutError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CutoutError(path, f"not a readable PNG/JPEG image ({type(err).__name__}: {err})") from None
    return Cutout(np.ascontiguousarray(np.moveaxis(data, -1, 0)), RGB_BANDS, None, photometric=False)


def read_cutout(path: str | os.PathLike, bands: str = "") -> Cutout:
    """Dispatch on the file name: ``{band}`` template, PNG/JPEG, else a FITS cube.

    ``bands`` is needed only for ``{band}`` templates (which files to open).
    """
    name = str(path)
    if BAND_PLACEHOLDER in name:
        if not bands:
            raise CutoutError(path, f"{BAND_PLACEHOLDER} file template but no bands known; set survey=sdss or decals")
        return read_band_files(name, bands)
    if name.lower().endswith(RGB_SUFFIXES):
        return read_rgb_image(name)
    return read_fits_cube(name)


def read_legacy_image(images, index: int, channels_last: bool, where: str) -> np.ndarray:
    """Row ``index`` of an ssl-sky-surveys ``images`` dataset as a (C, H, W) float32 array."""
    try:
        image = np.asarray(images[index], dtype=np.float32)
    except (OSError, ValueError) as err:
        raise CutoutError(where, f"cannot read images[{index}] ({err})") from None
    return np.ascontiguousarray(np.moveaxis(image, -1, 0)) if channels_last else image


def check_cutout(data: np.ndarray, path, expected_bands: str, bands: str, shape: tuple[int, int] | None,
                 max_bad_fraction: float, fill_value: float, dtype: str) -> tuple[np.ndarray, int]:
    """Refuse a cutout the shard cannot hold; fill a few NaN/inf pixels.

    Args:
        data: (C, H, W) float32 cutout.
        expected_bands / bands: the pack's bands and this cutout's ("" when the file does not say).
        shape: expected (H, W); None: any square size (colour images, resampled to the pack's size).
    Returns:
        (C, H, W) data (float32; uint8 colour images as they are) with non-finite pixels set to ``fill_value``,
        in the pack's band order, and how many pixels were filled.
    """
    n_expected = len(expected_bands)
    if data.shape[0] != n_expected:
        got = f" ({bands})" if bands else ""
        raise CutoutError(path, f"wrong number of bands: {data.shape[0]}{got}, "
                                f"expected {n_expected} ({expected_bands})")
    if bands and bands != expected_bands:
        if sorted(bands) != sorted(expected_bands) or len(set(bands)) != len(bands):
            raise CutoutError(path, f"wrong bands: {bands}, expected {expected_bands}")
        data = data[[bands.index(band) for band in expected_bands]]  # the same bands in another order
    if data.shape[1] != data.shape[2] and (shape is None or shape[0] == shape[1]):
        raise CutoutError(path, f"image is {data.shape[1]}x{data.shape[2]}, not square; cut it square first")
    if shape is not None and tuple(data.shape[1:]) != tuple(shape):
        raise CutoutError(path, f"wrong image size: {data.shape[1]}x{data.shape[2]}, expected {shape[0]}x{shape[1]} "
                                "like the other cutouts of this pack (their pixel scale must agree)")
    if data.dtype == np.uint8:
        return data, 0
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        fraction = n_bad / data.size
        if fraction > max_bad_fraction:
            raise CutoutError(path, f"too many NaN/inf pixels: {n_bad} of {data.size} ({fraction:.2%}) "
                                    f"> max_bad_fraction={max_bad_fraction:g}")
        data = np.where(bad, np.float32(fill_value), data)
    if dtype == "float16":
        check_float16(data, path)
    return data, n_bad


def check_float16(data: np.ndarray, path, when: str = "") -> None:
    """CutoutError when a pixel of ``data`` would overflow float16 (``when``: e.g. " after resampling")."""
    peak = float(np.abs(data).max()) if data.size else 0.0
    limit = float(np.finfo(np.float16).max)
    if peak > limit:
        raise CutoutError(path, f"pixel value {peak:.6g}{when} overflows float16 (|x| <= {limit:g}); "
                                "pack with dtype=float32")
