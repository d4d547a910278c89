"""Resampling cutouts to another size at pack time (``sslsky pack image_size=N``).

- Fluxes (FITS, nanomaggies per pixel): exact area-weighted resampling. Output pixel ``i`` covers input
  coordinates ``[i f, (i + 1) f)`` with ``f = n_in / n_out``; it receives each input pixel's flux in
  proportion to the overlap, ``out = A x A^T`` with the (n_out, n_in) overlap matrix ``A`` of
  :func:`overlap_matrix`. Every input pixel hands out all of its flux (columns of ``A`` sum to 1), so the
  total flux is kept to rounding for any factor, up or down; the pixel scale becomes ``f`` times the input's.
  White noise of sigma per input pixel comes out with ``sigma x`` :func:`noise_factor` (``f`` for an integer
  downsampling factor ``f``).
- 8-bit colour images (PNG/JPEG): Pillow's Lanczos filter (anti-aliased), then back to uint8.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def overlap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: ``A[i, j]`` = the share of input pixel ``j`` that falls in output pixel ``i``."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    f = n_in / n_out
    out_lo = np.arange(n_out)[:, None] * f  # output pixel edges in input pixel units
    out_hi = out_lo + f
    in_lo = np.arange(n_in)[None, :].astype(np.float64)
    # An input pixel has width 1, so the length of its overlap with an output pixel is its share of flux.
    matrix = np.clip(np.minimum(out_hi, in_lo + 1.0) - np.maximum(out_lo, in_lo), 0.0, None)
    matrix.setflags(write=False)
    return matrix


def resample_flux(cube: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) fluxes per pixel -> (C, size, size) float32 with the total flux of each band kept."""
    cube = np.asarray(cube)
    _, height, width = cube.shape
    if height == size and width == size:
        return np.asarray(cube, dtype=np.float32)
    rows, cols = overlap_matrix(height, size), overlap_matrix(width, size)
    out = np.einsum("ij,cjk,lk->cil", rows, cube.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def noise_factor(n_in: int, n_out: int) -> float:
    """Output sigma / input sigma of white noise through :func:`resample_flux`, averaged over pixels.

    One axis multiplies the variance by ``g = mean_i sum_j A_ij^2``; both axes by ``g^2``, so sigma by ``g``.
    """
    return float((overlap_matrix(n_in, n_out) ** 2).sum(axis=1).mean())


def pixel_scale_after(pixel_scale: float | None, n_in: int, n_out: int) -> float | None:
    """Arcsec per pixel after resampling ``n_in`` to ``n_out`` pixels over the same field."""
    return None if pixel_scale is None else float(pixel_scale) * n_in / n_out


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(3, H, W) uint8 colour image -> (3, size, size) uint8, Pillow Lanczos (anti-aliased when shrinking)."""
    from PIL import Image

    image = np.asarray(image)
    if image.shape[1:] == (size, size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1), dtype=np.uint8), mode="RGB")
    resized = pil.resize((size, size), resample=Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.moveaxis(np.asarray(resized, dtype=np.uint8), -1, 0))
