"""Tests for sslsky.augment against independent NumPy / SciPy references.

References are computed in float64 NumPy from the physics (surveys.py constants, the documented
sampling convention) rather than from the module's own helpers, so each test can fail. Sizes are
kept small: the whole file runs in a few seconds on one core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import ndimage, stats

from sslsky.augment import (
    AffineCrop,
    AstroAugment,
    CenterCrop,
    FluxNormalize,
    GaussianNoise,
    PSFBlur,
    Reddening,
    gaussian_blur,
)
from sslsky.config import AugmentConfig
from sslsky.surveys import EBV_LOGNORMAL, SURVEYS

SDSS = SURVEYS["sdss"]
N, n = SDSS.cutout_size, SDSS.crop_size  # 107 -> 64
START = (N - n) // 2  # the plain centred slice [START:START + n]
CENTRE = START + (n - 1) / 2  # its centre in cutout pixel coordinates (52.5)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def only(*parts: str, **geometry) -> AugmentConfig:
    """AugmentConfig with only the named flux parts enabled (reddening, psf, noise) and no normalisation."""
    cfg = AugmentConfig()
    for name in ("reddening", "psf", "noise"):
        getattr(cfg, name).enabled = name in parts
    cfg.geometry.enabled = "geometry" in parts
    for key, value in geometry.items():
        setattr(cfg.geometry, key, value)
    cfg.normalize.mode = "none"
    return cfg


def np_sample_points(angle, flip, scale, shift, cutout=N, crop=n):
    """(B, n, n) x (column) and y (row) cutout coordinates of the crop's pixels, from the documented
    convention p_cutout = c + t + (1/s) R(angle) F p_out, written independently in NumPy."""
    angle, flip, scale = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in (angle, flip, scale))
    shift = np.asarray(shift, dtype=np.float64).reshape(-1, 2)
    centre = (cutout - crop) // 2 + (crop - 1) / 2
    off = np.arange(crop) - (crop - 1) / 2
    py, px = np.meshgrid(off, off, indexing="ij")
    px = np.where(flip > 0, -px, px)
    x = centre + shift[:, 0, None, None] + (np.cos(angle) * px - np.sin(angle) * py) / scale
    y = centre + shift[:, 1, None, None] + (np.sin(angle) * px + np.cos(angle) * py) / scale
    return x, y


def params(angle, flip, scale, shift) -> dict[str, torch.Tensor]:
    batch = len(angle)
    return {"angle": torch.tensor(angle, dtype=torch.float32), "flip": torch.tensor(flip, dtype=torch.bool),
            "scale": torch.tensor(scale, dtype=torch.float32),
            "shift": torch.tensor(shift, dtype=torch.float32).reshape(batch, 2)}


def gaussian_image(size: int, centre: float, sigma_x: float, sigma_y: float, theta: float = 0.0) -> np.ndarray:
    """(size, size) elliptical Gaussian of unit total flux (pixel-centre sampled, normalised)."""
    y, x = np.mgrid[:size, :size] - centre
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    image = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return image / image.sum()


def second_moment(image: np.ndarray) -> float:
    """Per-axis second moment (Ixx + Iyy) / 2 about the centroid, pixels^2, of (..., H, W) -> (...)."""
    h, w = image.shape[-2:]
    y, x = np.mgrid[:h, :w]
    total = image.sum(axis=(-2, -1))
    cx = (image * x).sum(axis=(-2, -1)) / total
    cy = (image * y).sum(axis=(-2, -1)) / total
    ixx = (image * (x - cx[..., None, None]) ** 2).sum(axis=(-2, -1)) / total
    iyy = (image * (y - cy[..., None, None]) ** 2).sum(axis=(-2, -1)) / total
    return 0.5 * (ixx + iyy)


# ---------------------------------------------------------------------------
# Reddening.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lognormal", "uniform"])
def test_reddening_is_exact_extinction_law(mode):
    """flux x 10^(-0.4 R_b (E_new - E_cat)) with R_b = Schlafly & Finkbeiner SDSS coefficients."""
    rng = np.random.default_rng(1)
    images = rng.lognormal(size=(6, 5, 9, 9))
    ebv_cat = rng.uniform(0.0, 0.2, size=6)
    red = Reddening(SDSS.extinction, mode=mode, ebv_max=0.15)
    drawn = red.sample_params(6, generator=torch.Generator().manual_seed(3))
    ebv_new = drawn["ebv"].double().numpy()
    ref = images * 10.0 ** (-0.4 * np.array([4.239, 3.303, 2.285, 1.698, 1.263])[None, :, None, None]
                            * (ebv_new - ebv_cat)[:, None, None, None])
    out64 = red.apply(torch.tensor(images), torch.tensor(ebv_cat), drawn).numpy()
    np.testing.assert_allclose(out64, ref, rtol=1e-13)
    out32 = red.apply(torch.tensor(images, dtype=torch.float32), torch.tensor(ebv_cat), drawn)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=2e-6)
    assert not np.allclose(ebv_new, ebv_new[0])  # one draw per image


@pytest.mark.parametrize("mode", ["lognormal", "uniform"])
def test_pipeline_reddening_on_the_centred_crop(mode):
    """AstroAugment with only reddening: centred slice x the extinction law of the drawn E(B-V)."""
    cfg = only("reddening")
    cfg.reddening.mode = mode
    rng = np.random.default_rng(2)
    images = rng.lognormal(size=(4, 5, N, N))
    ebv_cat = rng.uniform(0.0, 0.1, size=4)
    aug = AstroAugment("sdss", cfg)
    out, drawn = aug.view(torch.tensor(images), torch.tensor(ebv_cat), return_params=True,
                          generator=torch.Generator().manual_seed(0))
    delta = drawn["ebv"].double().numpy() - ebv_cat
    factor = 10.0 ** (-0.4 * np.multiply.outer(delta, np.asarray(SDSS.extinction)))
    ref = images[..., START:START + n, START:START + n] * factor[:, :, None, None]
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


def test_uniform_ebv_draws():
    ebv = Reddening(SDSS.extinction, "uniform", ebv_max=0.12).sample_params(
        20000, generator=torch.Generator().manual_seed(5))["ebv"].double().numpy()
    assert ebv.min() >= 0.0 and ebv.max() <= 0.12
    assert stats.kstest(ebv, stats.uniform(0.0, 0.12).cdf).pvalue > 1e-3


def test_lognormal_ebv_draws_follow_the_footprint_fit():
    ebv = Reddening(SDSS.extinction, "lognormal").sample_params(
        20000, generator=torch.Generator().manual_seed(6))["ebv"].double().numpy()
    shape, loc, scale = EBV_LOGNORMAL
    assert ebv.min() > loc
    # median of loc + scale exp(shape N) is loc + scale ~ 0.0345; binomial error of the sample median ~0.8%
    assert np.median(ebv) == pytest.approx(loc + scale, rel=0.03)
    assert 0.8 < np.mean(ebv < 0.1) < 0.99  # "most < 0.1"
    assert stats.kstest(ebv, stats.lognorm(shape, loc, scale).cdf).pvalue > 1e-3


# ---------------------------------------------------------------------------
# Geometry.
# ---------------------------------------------------------------------------


def test_identity_params_give_the_centred_slice():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 5, N, N))
    crop = AffineCrop(N, n, scale_range=(0.95, 1.1), jitter=4.0)
    slice_ = images[..., START:START + n, START:START + n]
    assert np.array_equal(CenterCrop(N, n)(torch.tensor(images)).numpy(), slice_)
    out64 = crop.apply(torch.tensor(images), crop.identity_params(2)).numpy()
    np.testing.assert_allclose(out64, slice_, rtol=0, atol=1e-12)
    # float32: exact up to the grid's float32 rounding (~1e-5 pixel of the neighbours)
    out32 = crop.apply(torch.tensor(images, dtype=torch.float32), crop.identity_params(2)).numpy()
    np.testing.assert_allclose(out32, slice_, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_right_angle_rotations_and_flips_match_numpy(k, flip):
    """angle = k pi/2 is np.rot90(k) of the centred slice; the flip mirrors columns before rotating."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=(1, 3, N, N))
    crop = AffineCrop(N, n, rotation="right")
    out = crop.apply(torch.tensor(images), params([k * math.pi / 2], [flip], [1.0], [0.0, 0.0])).numpy()
    slice_ = images[..., START:START + n, START:START + n]
    ref = np.rot90(slice_, k=k, axes=(-2, -1))
    if flip:
        ref = np.flip(ref, axis=-1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_right_angle_mode_draws_only_right_angles():
    crop = AffineCrop(N, n, rotation="right", flip=False)
    angle = crop.sample_params(400, generator=torch.Generator().manual_seed(0))["angle"].double().numpy()
    quarter = angle / (math.pi / 2)
    np.testing.assert_allclose(quarter, np.round(quarter), atol=1e-6)
    assert set(np.round(quarter).astype(int)) == {0, 1, 2, 3}


def test_any_affine_matches_scipy_interpolation():
    """Arbitrary angle, flip, scale and jitter equal scipy map_coordinates at the NumPy sample points."""
    rng = np.random.default_rng(5)
    images = rng.normal(size=(4, 2, N, N))
    angle, flip = [0.3, 1.9, 3.7, 5.5], [False, True, False, True]
    scale, shift = [0.95, 1.1, 1.02, 0.97], rng.uniform(-4, 4, size=(4, 2))
    crop = AffineCrop(N, n, scale_range=(0.95, 1.1), jitter=4.0, conserve_flux=False)
    out = crop.apply(torch.tensor(images), params(angle, flip, scale, shift)).numpy()
    # the float32 parameters are what the module sees
    p32 = params(angle, flip, scale, shift)
    x, y = np_sample_points(p32["angle"].double(), flip, p32["scale"].double(), p32["shift"].double())
    ref = np.stack([np.stack([ndimage.map_coordinates(images[b, c], [y[b], x[b]], order=1, mode="constant",
                                                      cval=np.nan) for c in range(2)]) for b in range(4)])
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_flux_is_conserved_by_rotation_and_scale(interpolation):
    """A smooth elliptical galaxy well inside the crop keeps its total flux: the 1/s^2 factor."""
    galaxy = gaussian_image(N, CENTRE, 4.0, 2.5, theta=0.4)
    images = torch.tensor(np.broadcast_to(galaxy, (6, 1, N, N)).copy())
    angle, scale = [0.7, 2.2, 4.0, 1.3, 5.9, 3.1], [0.9, 0.95, 1.0, 1.1, 1.3, 1.25]
    shift = [[1.5, -1.0], [0.0, 1.5], [-1.3, 0.2], [1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]
    crop = AffineCrop(N, n, scale_range=(0.9, 1.3), jitter=1.5, interpolation=interpolation)
    total = crop.apply(images, params(angle, [True, False] * 3, scale, shift)).sum(dim=(-2, -1)).numpy().ravel()
    np.testing.assert_allclose(total, 1.0, rtol=0.01)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_no_padding_reaches_the_crop_at_the_range_extremes(interpolation):
    """Smallest scale, largest jitter, 45-degree rotations: every sample reads only cutout pixels."""
    geo = AugmentConfig().geometry
    crop = AffineCrop(N, n, scale_range=(geo.scale_min, geo.scale_max), jitter=geo.jitter, interpolation=interpolation)
    corners = [(sx, sy) for sx in (-1, 1) for sy in (-1, 1)]
    angle = [math.pi / 4 + q * math.pi / 2 for q in range(4) for _ in corners]
    shift = [[sx * geo.jitter, sy * geo.jitter] for _ in range(4) for sx, sy in corners]
    p = params(angle, [False] * 16, [geo.scale_min] * 16, shift)
    x, y = np_sample_points(p["angle"].double(), [0] * 16, p["scale"].double(), p["shift"].double())
    margin = 1.0 if interpolation == "bicubic" else 0.0  # bicubic reads one more pixel each side
    assert x.min() >= margin and y.min() >= margin and x.max() <= N - 1 - margin and y.max() <= N - 1 - margin
    # the extreme does reach far out: within a few pixels of the usable edge
    assert min(x.min(), y.min(), N - 1 - x.max(), N - 1 - y.max()) < margin + 2.0
    # zero padding and border padding agree only if no sample reads outside the cutout
    images = torch.tensor(np.random.default_rng(6).lognormal(size=(16, 2, N, N)))
    out = crop.apply(images, p)
    zeros = F.grid_sample(images, crop.grid(p, images.dtype), mode=interpolation, padding_mode="zeros",
                          align_corners=False) / p["scale"].double().view(-1, 1, 1, 1) ** 2
    np.testing.assert_allclose(out.numpy(), zeros.numpy(), rtol=1e-12)


def test_ranges_that_would_leave_the_cutout_are_refused():
    geo = AugmentConfig().geometry
    half = (n - 1) / 2 * math.sqrt(2.0)
    limit = CENTRE - half / geo.scale_min  # largest jitter that keeps a 45-degree crop inside
    AffineCrop(N, n, scale_range=(geo.scale_min, 1.1), jitter=limit - 1e-6)
    with pytest.raises(ValueError, match="lower jitter"):
        AffineCrop(N, n, scale_range=(geo.scale_min, 1.1), jitter=limit + 0.01)
    with pytest.raises(ValueError, match="raise scale_min"):
        AffineCrop(N, n, scale_range=(0.6, 1.1))


# ---------------------------------------------------------------------------
# Noise and PSF.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("independent_bands", [True, False])
def test_noise_adds_the_quadrature_difference(independent_bands):
    """Measured added variance on a flat image equals target^2 - own^2 per (sample, band)."""
    batch, size = 12, 128
    rng = np.random.default_rng(7)
    own = rng.uniform(0.5, 2.0, size=(batch, 5))
    noise = GaussianNoise((1.0, 1.6), independent_bands=independent_bands)
    gen = torch.Generator().manual_seed(8)
    drawn = noise.sample_params(torch.tensor(own, dtype=torch.float32), gen)
    target = drawn["target"].double().numpy()
    factor = target / own
    assert factor.min() >= 1.0 - 1e-6 and factor.max() <= 1.6 + 1e-6
    if not independent_bands:
        np.testing.assert_allclose(factor, factor[:, :1].repeat(5, axis=1), rtol=1e-6)
    flat = torch.full((batch, 5, size, size), 3.0, dtype=torch.float64)
    out = noise.apply(flat, drawn, gen).numpy()
    added = (out - 3.0).var(axis=(-2, -1), ddof=1)
    expected = target**2 - own**2
    # sample variance of m Gaussian values: relative standard deviation sqrt(2 / (m - 1))
    spread = math.sqrt(2.0 / (size * size - 1))
    assert np.all(np.abs(added - expected) <= 5 * spread * expected + 1e-6)
    np.testing.assert_allclose((out - 3.0).mean(axis=(-2, -1)), 0.0, atol=5 * 1.6 * 2 / size)


def test_noise_adds_nothing_when_the_target_is_below_the_own_level():
    noise = GaussianNoise((0.5, 0.9))
    own = torch.ones(3, 5)
    drawn = noise.sample_params(own, torch.Generator().manual_seed(0))
    images = torch.arange(3 * 5 * 8 * 8, dtype=torch.float32).reshape(3, 5, 8, 8)
    assert torch.equal(noise.apply(images, drawn, torch.Generator().manual_seed(1)), images)


def test_psf_blur_adds_second_moments_in_quadrature():
    """A star of own sigma comes out with second moment own^2 + added^2 = target^2; a point source with added^2."""
    batch, size = 3, 65
    rng = np.random.default_rng(9)
    own = rng.uniform(1.0, 2.0, size=(batch, 5))
    own[0, :] = [1.0, 1.2, 1.4, 1.1, 1.3]
    psf = PSFBlur((1.02, 1.8), independent_bands=True)
    drawn = psf.sample_params(torch.tensor(own, dtype=torch.float32), torch.Generator().manual_seed(2))
    target, added = drawn["target"].double().numpy(), drawn["sigma_add"].double().numpy()
    assert added.min() > 0.2  # includes sub-pixel kernels, where a sampled Gaussian has the wrong variance
    np.testing.assert_allclose(own**2 + added**2, target**2, rtol=1e-5)
    stars = np.stack([[gaussian_image(size, 32.0, s, s) for s in row] for row in own])
    point = np.zeros((batch, 5, size, size))
    point[..., 32, 32] = 1.0
    before = second_moment(stars)
    out_stars = psf.apply(torch.tensor(stars), drawn).numpy()
    out_point = psf.apply(torch.tensor(point), drawn).numpy()
    np.testing.assert_allclose(out_stars.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(second_moment(out_point), added**2, rtol=1e-4)
    np.testing.assert_allclose(second_moment(out_stars), before + added**2, rtol=1e-4)
    np.testing.assert_allclose(second_moment(out_stars), target**2, rtol=2e-3)  # sampled star ~ own^2


def test_blur_reports_the_white_noise_variance_factor():
    gen = torch.Generator().manual_seed(3)
    sigma = torch.tensor([[0.4, 1.0, 2.5]], dtype=torch.float32)
    noise = torch.randn(1, 3, 192, 192, generator=gen, dtype=torch.float64)
    out, factor = gaussian_blur(noise, sigma)
    measured = out[..., 16:-16, 16:-16].var(dim=(-2, -1)).numpy()  # away from the replicated edges
    # white noise through a separable kernel k: variance x (sum k^2)^2; for a wide Gaussian ~ 1 / (4 pi sigma^2)
    np.testing.assert_allclose(measured, factor.numpy(), rtol=0.1)
    assert factor[0, 2].item() == pytest.approx(1 / (4 * math.pi * 2.5**2), rel=0.01)


def test_pipeline_noise_reaches_the_target_after_resampling():
    """Geometry then noise: the output noise is factor x the resampled image's own noise.

    Bilinear resampling of white noise sigma leaves sigma^2 mean((1 - fx)^2 + fx^2)((1 - fy)^2 + fy^2)
    per crop pixel (fx, fy the fractional sample positions, computed here in NumPy); 1/s^2 scales it.
    """
    cfg = only("geometry", "noise")
    cfg.noise.factor_min = cfg.noise.factor_max = 1.5
    aug = AstroAugment("sdss", cfg)
    batch = 24
    gen = torch.Generator().manual_seed(4)
    sky = np.asarray(SDSS.sky_sigma)
    images = torch.randn(batch, 5, N, N, generator=gen, dtype=torch.float64) * torch.tensor(sky)[:, None, None]
    out, drawn = aug.view(images, generator=gen, return_params=True)
    x, y = np_sample_points(drawn["angle"].double(), drawn["flip"].numpy(), drawn["scale"].double(),
                            drawn["shift"].double())
    fx, fy = x - np.floor(x), y - np.floor(y)
    smoothing = (((1 - fx) ** 2 + fx**2) * ((1 - fy) ** 2 + fy**2)).mean(axis=(-2, -1))  # (B,)
    own = sky[None, :] * np.sqrt(smoothing)[:, None] / drawn["scale"].double().numpy()[:, None] ** 2
    ratio = out.numpy().std(axis=(-2, -1)) / (1.5 * own)
    assert abs(ratio.mean() - 1.0) < 0.01
    assert np.abs(ratio - 1.0).max() < 0.08


def test_pipeline_psf_reaches_the_target_after_resampling():
    """Geometry then PSF blur: a star's second moment is (factor s)^2 (own^2 + bilinear blur).

    own^2 is the star's moment in the cutout; bilinear interpolation at a uniform fractional
    position f adds f (1 - f) per axis, 1/6 on average; magnification s scales lengths by s.
    """
    cfg = only("geometry", "psf")
    cfg.psf.factor_min = cfg.psf.factor_max = 1.3
    aug = AstroAugment("sdss", cfg)
    sigma = np.asarray(SDSS.psf_fwhm) / FWHM_PER_SIGMA / SDSS.pixel_scale  # native PSF sigma, pixels
    stars = np.stack([gaussian_image(N, CENTRE, s, s) for s in sigma])[None].repeat(16, axis=0)
    out, drawn = aug.view(torch.tensor(stars), psf_fwhm=torch.tensor(SDSS.psf_fwhm).expand(16, 5),
                          generator=torch.Generator().manual_seed(0), return_params=True)
    scale = drawn["scale"].double().numpy()[:, None]
    expected = (1.3 * scale) ** 2 * (second_moment(stars) + 1 / 6)
    ratio = second_moment(out.numpy()) / expected
    assert abs(ratio.mean() - 1.0) < 0.015
    assert np.abs(ratio - 1.0).max() < 0.05
    np.testing.assert_allclose(out.numpy().sum(axis=(-2, -1)), 1.0, rtol=0.01)  # flux kept through both


@pytest.mark.xfail(strict=True, reason="known approximation in AstroAugment.view: resampled noise is correlated, "
                   "so the PSF blur shrinks it less than the white-noise factor it assumes; the own level is "
                   "underestimated and the noise top-up falls short of the target (~0.83 x here)")
def test_pipeline_noise_reaches_the_target_after_resampling_and_blur():
    """Geometry, PSF blur, noise: output noise = factor x the noise the blurred crop really has."""
    def run(noise: bool) -> np.ndarray:
        cfg = only("geometry", "psf", "noise")
        cfg.psf.factor_min = cfg.psf.factor_max = 1.3
        cfg.noise.enabled = noise
        cfg.noise.factor_min = cfg.noise.factor_max = 1.5
        gen = torch.Generator().manual_seed(5)  # same geometry and PSF draws in both runs
        images = torch.randn(16, 5, N, N, generator=gen, dtype=torch.float64) * torch.tensor(sky_sigma_4d())
        return AstroAugment("sdss", cfg).view(images, generator=gen).numpy().std(axis=(-2, -1))

    own, out = run(noise=False), run(noise=True)
    assert abs((out / (1.5 * own)).mean() - 1.0) < 0.03


# ---------------------------------------------------------------------------
# Normalisation, photometric guard, randomness, devices.
# ---------------------------------------------------------------------------


def test_asinh_and_linear_normalisation_match_numpy():
    rng = np.random.default_rng(10)
    x = rng.normal(0.0, 3.0, size=(2, 5, 6, 6))
    sigma, median = np.asarray(SDSS.sky_sigma), rng.normal(size=5)
    out = FluxNormalize("asinh", sigma=sigma, asinh_k=1.04)(torch.tensor(x)).numpy()
    np.testing.assert_allclose(out, np.arcsinh(x / (1.04 * sigma[None, :, None, None])), rtol=1e-6)  # float32 stats
    out = FluxNormalize("linear", median=median, sigma=sigma)(torch.tensor(x)).numpy()
    ref = (x - median[None, :, None, None]) / sigma[None, :, None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)
    # the pipeline's eval view: plain slice, asinh with the survey's sky sigma by default
    images = rng.normal(0.0, 1.0, size=(2, 5, N, N))
    ev = AstroAugment("sdss").eval_view(torch.tensor(images)).numpy()
    ref = np.arcsinh(images[..., START:START + n, START:START + n] / sky_sigma_4d())
    np.testing.assert_allclose(ev, ref, rtol=1e-6)


def sky_sigma_4d() -> np.ndarray:
    return np.asarray(SDSS.sky_sigma)[None, :, None, None]


def test_photometric_false_refuses_flux_augmentations():
    with pytest.raises(ValueError, match=r"reddening, psf, noise.*photometric=False.*reddening\.enabled=false"):
        AstroAugment("sdss", AugmentConfig(), photometric=False)
    cfg = only("geometry")
    cfg.normalize.mode = "linear"
    aug = AstroAugment("sdss", cfg, photometric=False, median=[100.0] * 3, sigma=[50.0] * 3)
    # RGB values: no 1/s^2 flux factor, and the same normalisation as the eval view
    images = torch.full((4, 3, N, N), 150.0)
    view = aug.view(images, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(view.numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(aug.eval_view(images).numpy(), 1.0, rtol=1e-6)


def _galaxies(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(11)
    galaxy = gaussian_image(N, 53.0, 5.0, 3.0, theta=0.5)[None, None] * rng.uniform(10, 100, size=(batch, 5, 1, 1))
    sky = rng.normal(size=(batch, 5, N, N)) * sky_sigma_4d()
    return torch.tensor(galaxy + sky, dtype=torch.float32), torch.tensor(rng.uniform(0, 0.1, batch))


def test_same_seed_same_views_and_the_two_views_differ():
    aug = AstroAugment("sdss")
    images, ebv = _galaxies()
    a1, a2 = aug(images, ebv, generator=torch.Generator().manual_seed(42))
    b1, b2 = aug(images, ebv, generator=torch.Generator().manual_seed(42))
    c1, _ = aug(images, ebv, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == (3, 5, n, n)
    assert (a1 - a2).abs().amax(dim=(1, 2, 3)).min() > 0.1  # every sample's two views differ
    assert not torch.allclose(a1, c1)


@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_are_preserved(device, dtype):
    aug = AstroAugment("sdss").to(device)
    images, ebv = _galaxies(2)
    images, ebv = images.to(device=device, dtype=dtype), ebv.to(device)
    psf = torch.tensor(SDSS.psf_fwhm, device=device).expand(2, 5) * 1.1
    sky = torch.tensor(SDSS.sky_sigma, device=device).expand(2, 5) * 0.9
    v1, v2 = aug(images, ebv, psf, sky, generator=torch.Generator(device=device).manual_seed(0))
    for v in (v1, v2, aug.eval_view(images)):
        assert v.device.type == torch.device(device).type and v.dtype == dtype and v.shape == (2, 5, n, n)
        assert torch.isfinite(v).all()
