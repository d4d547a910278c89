"""Colour composites of flux cubes: Lupton et al. (2004) asinh RGB images of three bands.

:func:`lupton_rgb` turns a ``(C, H, W)`` cube in nanomaggies into an ``(H, W, 3)`` uint8 image keeping
each pixel's colour and stretching its intensity by asinh. It serves the neighbour grids of
``sslsky search`` (:mod:`sslsky.eval.plots`) and the Galaxy-Zoo-shaped PNG/JPEG mock
(``sslsky mock --format png``, :func:`galaxy_zoo_rgb`).

The composite's rows are those of the cube (row 0 = the cube's first row, y = south with the cutout WCS);
:func:`galaxy_zoo_rgb` flips them so that north is up in the written image, as in Galaxy Zoo cutouts.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SURVEY_RGB_BANDS", "SURVEY_RGB_SCALES", "GZ_STRETCH", "GZ_MINIMUM", "GZ_Q", "GZ_FRAME_R50", "lupton_rgb",
           "resample_rgb", "frame_pixels", "galaxy_zoo_rgb"]

#: Bands shown as red, green, blue by default, per survey (DECaLS: z, r, g; SDSS: i, r, g).
SURVEY_RGB_BANDS = {"sdss": "irg", "decals": "zrg"}
#: Per-band multipliers (red, green, blue) applied before the stretch in the Galaxy-Zoo-style composite.
#: DECaLS: the Legacy Survey viewer's grz weights (z 2.2, r 3.4, g 6.0), which make a red-sequence galaxy
#: look yellow-white and a star-forming disk blue. SDSS: the same divided by ~2.3 (its 0.396" pixels hold
#: 2.3x the flux of DECaLS 0.262" ones), so a galaxy and its sky noise look alike in both surveys.
SURVEY_RGB_SCALES = {"decals": (2.2, 3.4, 6.0), "sdss": (1.0, 1.5, 2.6)}
#: Lupton stretch, black point [both scaled nanomaggies] and softening Q of the Galaxy-Zoo-style composite.
#: Chosen by eye on mock galaxies against Galaxy Zoo DECaLS cutouts: outskirts visible, bright near-white
#: cores, (almost) no saturated pixels, and a dark sky with sparse colour speckle (the black point is ~half
#: the scaled sky noise of either survey).
GZ_STRETCH = 0.2
GZ_MINIMUM = 0.03
GZ_Q = 10.0
#: Galaxy Zoo DECaLS frames a galaxy 424 x 0.04 petro_th50 ~ 17 half-light radii wide (Walmsley et al.
#: 2022); the mock crops its cutout's centre to that width, but never below half of the cutout (its
#: smallest galaxies would otherwise be blown up from a few pixels) nor beyond the whole cutout.
GZ_FRAME_R50 = 17.0
GZ_MIN_FRAME_FRACTION = 0.5


def lupton_rgb(image: np.ndarray, bands: str, rgb_bands: str, stretch: float = 0.5, q: float = 10.0,
               scales: tuple[float, float, float] | None = None, minimum: float = 0.0) -> np.ndarray:
    """``(C, H, W)`` nanomaggies -> ``(H, W, 3)`` uint8 asinh composite (Lupton et al. 2004).

    ``rgb_bands`` names the bands shown as red, green and blue (e.g. ``irg`` for SDSS, ``zrg`` for
    DECaLS); the colour of each pixel is kept and its intensity stretched by asinh. ``scales``
    multiplies the red, green and blue planes first (None: 1, 1, 1); ``minimum`` (in the scaled units)
    is the black point.
    """
    from astropy.visualization import make_lupton_rgb

    missing = [b for b in rgb_bands if b not in bands]
    if len(rgb_bands) != 3 or missing:
        raise ValueError(f"rgb_bands={rgb_bands!r} must name 3 of the image's bands {bands!r}")
    scales = (1.0, 1.0, 1.0) if scales is None else scales
    red, green, blue = (np.asarray(image[bands.index(b)], dtype=np.float64) * s for b, s in zip(rgb_bands, scales))
    return make_lupton_rgb(red, green, blue, minimum=minimum, stretch=stretch, Q=q)


def resample_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8 with Pillow's LANCZOS filter (unchanged if already so)."""
    from PIL import Image

    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((size, size), Image.Resampling.LANCZOS))


def frame_pixels(r50: float, pixel_scale: float, cutout_size: int) -> int:
    """Width [pixels] of the centred crop that frames a galaxy of half-light radius ``r50`` [arcsec] like Galaxy Zoo.

    ``GZ_FRAME_R50 * r50``, clipped to [``GZ_MIN_FRAME_FRACTION * cutout_size``, ``cutout_size``]; same parity as
    the cutout, so the crop stays centred on the cutout's centre pixel.
    """
    lo = int(np.ceil(GZ_MIN_FRAME_FRACTION * cutout_size))
    width = int(np.clip(round(GZ_FRAME_R50 * float(r50) / pixel_scale), lo, cutout_size))
    if (cutout_size - width) % 2:
        width += 1 if width < cutout_size else -1
    return width


def galaxy_zoo_rgb(cube: np.ndarray, bands: str, survey: str, size: int, frame: int | None = None) -> np.ndarray:
    """A flux cube as a Galaxy-Zoo-DECaLS-like colour image: ``(size, size, 3)`` uint8, north up.

    Lupton composite of the survey's :data:`SURVEY_RGB_BANDS` with :data:`SURVEY_RGB_SCALES`,
    :data:`GZ_STRETCH`, :data:`GZ_MINIMUM` and :data:`GZ_Q` of the centred ``frame`` x ``frame`` crop (None: the whole
    cutout; see :func:`frame_pixels`), resampled to ``size`` with LANCZOS.
    """
    n = cube.shape[-1]
    frame = n if frame is None else int(frame)
    if not 0 < frame <= n:
        raise ValueError(f"frame={frame}: must lie in [1, {n}]")
    lo = (n - frame) // 2
    crop = cube[:, lo:lo + frame, lo:lo + frame]
    rgb = lupton_rgb(crop, bands, SURVEY_RGB_BANDS[survey], GZ_STRETCH, GZ_Q, SURVEY_RGB_SCALES[survey], GZ_MINIMUM)
    return resample_rgb(np.ascontiguousarray(rgb[::-1]), size)
