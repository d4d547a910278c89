"""Two-view augmentation throughput: batched torch (sslsky.augment) against per-sample NumPy/scikit-image.

    python benchmarks/bench_augment.py [--batch 256] [--repeats 5] [--numpy-images 48] [--quick]

Both sides run the same stack on SDSS cutouts (5x107x107 -> 64x64), per view: flip, rotation by
any angle, log-uniform scale and centre jitter in one bilinear resampling (1/s^2 flux factor),
reddening to a log-normal E(B-V), Gaussian PSF blur by the quadrature difference, Gaussian noise by
the quadrature difference, asinh stretch. The torch side is ``AstroAugment("sdss")`` with the
default AugmentConfig on CPU float32 batches, timed with one thread (the per-core figure) and
with all threads. The reference loops over images in Python: ``skimage.transform.warp`` with an
affine map, ``scipy.ndimage.gaussian_filter``, NumPy noise and ``np.arcsinh`` (single-threaded).
Target: torch >= 10x the reference per core. Views/s count both views of each image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import scipy
import skimage
import torch
from scipy import ndimage
from skimage.transform import AffineTransform, warp

from sslsky.augment import FWHM_PER_SIGMA, AstroAugment
from sslsky.config import AugmentConfig
from sslsky.machine import describe_machine
from sslsky.surveys import EBV_LOGNORMAL, SURVEYS

SURVEY = SURVEYS["sdss"]
TARGET_SPEEDUP = 10.0


def machine() -> str:
    return (f"{describe_machine()}\nnumpy {np.__version__}, scipy {scipy.__version__}, "
            f"scikit-image {skimage.__version__}")


def mock_cutouts(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B, 5, 107, 107) float32 nanomaggies (an elliptical galaxy plus sky noise) and (B,) catalog E(B-V)."""
    rng = np.random.default_rng(seed)
    size = SURVEY.cutout_size
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.empty((batch, SURVEY.n_bands, size, size), dtype=np.float32)
    sky = np.asarray(SURVEY.sky_sigma, dtype=np.float32)[:, None, None]
    for i in range(batch):
        theta, q, r = rng.uniform(0, np.pi), rng.uniform(0.3, 1.0), rng.uniform(2.0, 8.0)
        u, v = np.cos(theta) * x + np.sin(theta) * y, -np.sin(theta) * x + np.cos(theta) * y
        profile = np.exp(-0.5 * ((u / r) ** 2 + (v / (q * r)) ** 2))
        images[i] = rng.uniform(0.5, 20.0, size=(SURVEY.n_bands, 1, 1)) * profile + sky * rng.normal(
            size=(SURVEY.n_bands, size, size))
    return images, rng.uniform(0.0, 0.1, size=batch)


# ---------------------------------------------------------------------------
# Per-sample NumPy / scikit-image reference of the same stack.
# ---------------------------------------------------------------------------


class NumpyAugment:
    """The AstroAugment stack written the conventional way: one image at a time, (C, H, W) arrays."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        self.n, self.size = SURVEY.crop_size, SURVEY.cutout_size
        self.centre = (self.size - self.n) // 2 + (self.n - 1) / 2
        self.extinction = np.asarray(SURVEY.extinction)
        self.sky = np.asarray(SURVEY.sky_sigma)
        self.psf_pix = np.asarray(SURVEY.psf_fwhm) / FWHM_PER_SIGMA / SURVEY.pixel_scale

    def view(self, image: np.ndarray, ebv: float) -> np.ndarray:
        cfg, rng, n = self.cfg, self.rng, self.n
        geo = cfg.geometry
        # Geometry: output (col, row) -> cutout (col, row) = c + t + (1/s) R F (p - (n - 1) / 2).
        angle = rng.uniform(0.0, 2 * np.pi)
        mirror = -1.0 if (geo.flip and rng.random() < 0.5) else 1.0
        scale = math.exp(rng.uniform(math.log(geo.scale_min), math.log(geo.scale_max)))
        shift = rng.uniform(-geo.jitter, geo.jitter, size=2)
        linear = np.array([[math.cos(angle) * mirror, -math.sin(angle)],
                           [math.sin(angle) * mirror, math.cos(angle)]]) / scale
        offset = self.centre + shift - linear @ np.full(2, (n - 1) / 2)
        matrix = np.eye(3)
        matrix[:2, :2], matrix[:2, 2] = linear, offset
        x = warp(np.moveaxis(image, 0, -1), AffineTransform(matrix=matrix), output_shape=(n, n), order=1,
                 mode="edge", preserve_range=True)
        x = np.moveaxis(x, -1, 0)
        # Flux per pixel and reddening: one per-band gain.
        shape, loc, ebv_scale = EBV_LOGNORMAL
        ebv_new = loc + ebv_scale * math.exp(shape * rng.normal())
        gain = 10.0 ** (-0.4 * self.extinction * (ebv_new - ebv)) / scale**2
        x = x * gain[:, None, None]
        # PSF: own sigma in crop pixels (bilinear adds ~1/6 pixel^2), target = factor x own.
        own_psf = np.sqrt(self.psf_pix**2 + 1 / 6) * scale
        target = rng.uniform(cfg.psf.factor_min, cfg.psf.factor_max) * own_psf
        sigma_add = np.sqrt(np.maximum(target**2 - own_psf**2, 0.0))
        x = np.stack([ndimage.gaussian_filter(band, s, mode="nearest", truncate=4.0) for band, s in zip(x, sigma_add)])
        # Noise: own level after resampling (x 2/3 per axis in variance) and the blur (~1 / (4 pi sigma^2)).
        blur_var = np.where(sigma_add > 0.5, 1.0 / (4 * np.pi * np.maximum(sigma_add, 0.5) ** 2), 1.0)
        own_noise = self.sky * gain * np.sqrt(4 / 9 * blur_var)
        target = rng.uniform(cfg.noise.factor_min, cfg.noise.factor_max, size=len(own_noise)) * own_noise
        std_add = np.sqrt(np.maximum(target**2 - own_noise**2, 0.0))
        x = x + rng.normal(size=x.shape) * std_add[:, None, None]
        return np.arcsinh(x / (cfg.normalize.asinh_k * self.sky[:, None, None])).astype(np.float32)

    def __call__(self, images: np.ndarray, ebv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.stack([self.view(image, e) for image, e in zip(images, ebv)])
        second = np.stack([self.view(image, e) for image, e in zip(images, ebv)])
        return first, second


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def time_views(fn, n_images: int, repeats: int) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Median views/s over ``repeats`` calls (after one warm-up call); also the last call's output."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 2 * n_images / statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="images per torch batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--numpy-images", type=int, default=48, help="images per call of the per-sample reference")
    parser.add_argument("--quick", action="store_true", help="small run: batch 64, 2 repeats, 16 reference images")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats, args.numpy_images = 64, 2, 16

    all_threads = torch.get_num_threads()
    print(machine())
    images, ebv = mock_cutouts(max(args.batch, args.numpy_images))
    cfg = AugmentConfig()
    aug = AstroAugment("sdss", cfg)
    batch = torch.from_numpy(images[:args.batch])
    ebv_t = torch.from_numpy(ebv[:args.batch])
    generator = torch.Generator().manual_seed(0)
    print(f"SDSS {SURVEY.n_bands}x{SURVEY.cutout_size}x{SURVEY.cutout_size} -> {SURVEY.crop_size}x{SURVEY.crop_size}, "
          f"two views per image; torch batch {args.batch}, reference {args.numpy_images} images, "
          f"median of {args.repeats} calls")

    reference = NumpyAugment(cfg)
    ref_rate, ref_out = time_views(lambda: reference(images[:args.numpy_images], ebv[:args.numpy_images]),
                                   args.numpy_images, args.repeats)
    print(f"  numpy/skimage per sample (1 thread) : {ref_rate:9.1f} views/s")

    rates = {}
    for threads in (1, all_threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            rates[threads], out = time_views(lambda: aug(batch, ebv_t, generator=generator), args.batch, args.repeats)
        print(f"  torch batched, {threads:2d} thread(s)        : {rates[threads]:9.1f} views/s "
              f"({rates[threads] / threads:8.1f} per thread)")
    torch.set_num_threads(all_threads)

    # The two stacks should give statistically alike views (a check that the same work is done).
    torch_pix, ref_pix = out[0].numpy(), ref_out[0]
    print(f"  view pixels: torch median {np.median(torch_pix):.3f}, 99th pct {np.percentile(torch_pix, 99):.2f}; "
          f"reference median {np.median(ref_pix):.3f}, 99th pct {np.percentile(ref_pix, 99):.2f}")
    speedup = rates[1] / ref_rate
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
    print(f"speed-up per core (torch 1 thread / numpy): {speedup:.1f}x ({verdict} the >= {TARGET_SPEEDUP:g}x target); "
          f"with all {all_threads} threads: {rates[all_threads] / ref_rate:.1f}x")


if __name__ == "__main__":
    main()
