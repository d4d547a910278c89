"""Batched, on-device astro augmentations for self-supervised pretraining.

Everything acts on a whole batch ``(B, C, H, W)`` of fluxes (nanomaggies per pixel) on the
batch's own device; per-sample random parameters are drawn as tensors (with an optional
:class:`torch.Generator` on that device), so there is no per-sample Python in the training path.

Each augmentation is an ``nn.Module`` with two steps, so tests and users can see what was drawn:
``sample_params(...) -> dict of tensors`` and ``apply(images, params) -> images``; ``forward``
does both. :class:`AstroAugment` chains them into one view and returns two independent views:

1. :class:`AffineCrop` -- flips, rotation by any angle, size scaling and centre jitter fused into
   one resampling of the full cutout straight to the crop size (one ``grid_sample``), with the
   flux per pixel scaled by 1/s^2 so the total flux is kept. A rotation by 90 degrees is
   exact and the identity transform is a plain centred slice (:class:`CenterCrop`) -- exactly
   in float64; in float32 the sampling grid's rounding mixes in ~1e-5 of the neighbours.
2. :class:`Reddening` -- de-redden with the catalog E(B-V), re-redden with a drawn one:
   flux x 10^(-0.4 R_b (E_new - E_cat)) with the survey's coefficients (Schlafly & Finkbeiner 2011).
3. :class:`PSFBlur` -- Gaussian blur adding only the quadrature difference between a drawn target
   PSF and the image's own (per sample, per band).
4. :class:`GaussianNoise` -- white noise adding only the quadrature difference between a drawn
   target sky sigma and the image's own.
5. :class:`FluxNormalize` -- asinh stretch, linear standardisation or nothing.

Reddening (a per-band scalar) commutes with resampling, so the pipeline applies it to the crop,
fused with the 1/s^2 flux factor: 2.8x fewer pixels than the 107x107 cutout. The image's own PSF
and noise are tracked through the resampling (interpolation smooths noise and widens the PSF a
little; both are measured from the sampling grid) and through the blur (which smooths the noise),
so the noise step tops up to the target level the encoder actually sees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)
from torch import Tensor, nn

from sslsky.config import AugmentConfig, ConfigError
from sslsky.surveys import EBV_LOGNORMAL, Survey, get_survey

#: FWHM / sigma of a Gaussian: 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: PyTorch's bicubic interpolation uses the Keys cubic convolution kernel with a = -0.75.
_BICUBIC_A = -0.75


# ---------------------------------------------------------------------------
# Random draws on the batch's device.
# ---------------------------------------------------------------------------


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"the torch.Generator is on {generator.device} but the batch is on {device}; "
                         f"make it with torch.Generator(device=images.device)")


def _uniform(shape: Sequence[int], low: float, high: float, device: torch.device,
             generator: torch.Generator | None) -> Tensor:
    """float32 tensor of ``shape`` drawn uniformly in [low, high)."""
    u = torch.rand(tuple(shape), device=device, generator=generator)
    return low + (high - low) * u


def _precise_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (small parameter tensors only), float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _check_range(name: str, low: float, high: float, minimum: float) -> None:
    if not (minimum <= low <= high):
        raise ValueError(f"{name}: need {minimum} <= min <= max, got [{low}, {high}]")


# ---------------------------------------------------------------------------
# Geometry: one resampling of the cutout to the crop.
# ---------------------------------------------------------------------------


def crop_start(cutout_size: int, crop_size: int) -> int:
    """First row/column of the centred crop: the plain slice ``[start:start + crop_size]``."""
    return (cutout_size - crop_size) // 2


def _crop_reach(cutout_size: int, crop_size: int, rotation: str, scale_min: float, jitter: float,
                interpolation: str) -> tuple[float, float, float]:
    """(reach, room, half): how far the rotated, scaled, jittered crop reaches from the centre, the room there is."""
    centre = crop_start(cutout_size, crop_size) + (crop_size - 1) / 2  # cutout pixel coordinates
    # Bicubic reads one pixel either side of the sample: keep samples one pixel further in.
    margin = 1.0 if interpolation == "bicubic" else 0.0
    room = min(centre, cutout_size - 1 - centre) - margin
    half = (crop_size - 1) / 2 * (math.sqrt(2.0) if rotation == "any" else 1.0)
    return half / scale_min + jitter, room, half


def largest_crop(cutout_size: int, rotation: str = "any", scale_min: float = 1.0, jitter: float = 0.0,
                 interpolation: str = "bilinear") -> int:
    """The largest crop whose every rotated / scaled / jittered footprint stays inside the cutout (0: none)."""
    for crop in range(cutout_size, 0, -1):
        reach, room, _ = _crop_reach(cutout_size, crop, rotation, scale_min, jitter, interpolation)
        if reach <= room + 1e-9:
            return crop
    return 0


def geometry_crop_limit(cutout_size: int, geo: AugmentConfig.Geometry) -> int:
    """:func:`largest_crop` for an augmentation config's geometry (the plain slice when geometry is off)."""
    if not geo.enabled:
        return cutout_size
    return largest_crop(cutout_size, geo.rotation, geo.scale_min, geo.jitter, geo.interpolation)


#: Name of the Survey that survey_of_images builds for a colour-image pack: no survey (nothing photometric).
RGB_SURVEY_NAME = ""


def survey_of_images(attrs: dict, name: str = "") -> Survey | None:
    """What the augmentations and eval views need to know of a pack's images, as a :class:`Survey`.

    Photometric packs: the survey (``name``, else the manifest's) with the pack's own cutout size, pixel scale
    and per-pixel sky sigma when ``sslsky pack image_size=N`` resampled it; the crop keeps the survey's crop
    fraction (capped by what fits the default geometry). Colour-image packs (8-bit RGB): a survey of their own,
    named "", with bands R, G, B, the pack's size, the largest crop that fits the default geometry, no
    extinction or noise figures (the flux augmentations refuse such images). None when a photometric pack
    says no survey and none is given.
    """
    shape = attrs.get("image_shape") or []
    size = int(shape[-1]) if len(shape) == 3 else 0
    default_fit = geometry_crop_limit(size, AugmentConfig.Geometry()) if size else 0
    if not attrs.get("photometric", True):
        if not size:
            raise ConfigError("the colour-image pack does not say its image size (image_shape); pack it again")
        nan = (float("nan"),) * int(shape[0])
        return Survey(name=RGB_SURVEY_NAME, bands=tuple(attrs.get("bands") or "RGB"), pixel_scale=float("nan"),
                      cutout_size=size, crop_size=default_fit, extinction=nan, sky_sigma=nan, psf_fwhm=nan,
                      filters=("",) * int(shape[0]))
    name = name or attrs.get("survey") or ""
    if not name:
        return None
    base = get_survey(name)
    if not size or size == base.cutout_size:
        return base
    crop = min(round(base.crop_size * size / base.cutout_size), default_fit)
    scale = attrs.get("pixel_scale") or base.pixel_scale * base.cutout_size / size
    noise = float(attrs.get("noise_scale") or 1.0)
    return dataclasses.replace(base, cutout_size=size, crop_size=max(crop, 1), pixel_scale=float(scale),
                               sky_sigma=tuple(s * noise for s in base.sky_sigma))


def data_survey(attrs: dict, wanted: str, path: str, fallback: str = "") -> Survey:
    """The imaging of the pack at ``path`` with manifest ``attrs`` (:func:`survey_of_images`): the pack's survey,
    checked against ``wanted`` (``data.survey``) when both are given; ``fallback`` (a checkpoint's survey) for a
    pack that says none. A ConfigError for a mismatch, an unknown name, or a photometric pack with no survey."""
    packed = attrs.get("survey") or ""
    if packed and wanted and packed != wanted:
        raise ConfigError(f"data.survey={wanted!r} but the shards in {path} are {packed!r}; drop data.survey or "
                          f"point data.path at {wanted} shards")
    try:
        survey = survey_of_images(attrs, packed or wanted or fallback)
    except ValueError as err:  # an unknown survey name
        raise ConfigError(f"data.survey: {err}") from None
    if survey is None:
        raise ConfigError(f"the shards in {path!r} do not say their survey (legacy HDF5?); set data.survey=sdss or "
                          f"data.survey=decals")
    return survey


def resolve_geometry(cfg: AugmentConfig, survey: Survey) -> AugmentConfig:
    """A copy of ``cfg`` with geometry.cutout_size / crop_size set (0 means the survey's), checked to fit.

    Raises ConfigError naming the largest crop (or the smallest scale_min) that fits the cutout.
    """
    geo = dataclasses.replace(cfg.geometry, cutout_size=cfg.geometry.cutout_size or survey.cutout_size,
                              crop_size=cfg.geometry.crop_size or survey.crop_size)
    if geo.crop_size == 0:  # the survey's crop is 0: images too small for the default geometry (e.g. 8x8 PNGs)
        d = AugmentConfig.Geometry()
        raise ConfigError(f"augment.geometry: no crop fits the {geo.cutout_size}x{geo.cutout_size} images under the "
                          f"default geometry (rotation={d.rotation}, scale_min={d.scale_min}, jitter={d.jitter}); set "
                          "augment.geometry.crop_size and lower augment.geometry.jitter, or use rotation=right")
    if not 0 < geo.crop_size <= geo.cutout_size:
        raise ConfigError(f"augment.geometry.crop_size={geo.crop_size} must be in [1, cutout_size="
                          f"{geo.cutout_size}]")
    if geo.enabled:
        reach, room, half = _crop_reach(geo.cutout_size, geo.crop_size, geo.rotation, geo.scale_min, geo.jitter,
                                        geo.interpolation)
        if reach > room + 1e-9:
            fits = geometry_crop_limit(geo.cutout_size, geo)
            room_for_scale = room - geo.jitter
            hint = f"the largest crop that fits is {fits}" if fits else "no crop fits"
            smallest_scale = math.ceil(half / room_for_scale * 1000) / 1000 if room_for_scale > 0 else None
            scale_hint = (f", or raise augment.geometry.scale_min to >= {smallest_scale}"
                          if smallest_scale is not None else "")
            raise ConfigError(
                f"augment.geometry: the {geo.crop_size}x{geo.crop_size} crop can leave the {geo.cutout_size}x"
                f"{geo.cutout_size} cutout under rotation={geo.rotation}, scale_min={geo.scale_min}, "
                f"jitter={geo.jitter}: {hint} (set augment.geometry.crop_size={fits}){scale_hint}, lower "
                f"augment.geometry.jitter, or use rotation=right")
    return dataclasses.replace(cfg, geometry=geo)


class CenterCrop(nn.Module):
    """Eval-time centred crop ``(B, C, N, N) -> (B, C, n, n)``: a plain slice, no resampling."""

    def __init__(self, cutout_size: int, crop_size: int):
        super().__init__()
        if not 0 < crop_size <= cutout_size:
            raise ValueError(f"crop_size={crop_size} must be in [1, cutout_size={cutout_size}]")
        self.cutout_size, self.crop_size = cutout_size, crop_size
        self.start = crop_start(cutout_size, crop_size)

    def forward(self, images: Tensor) -> Tensor:
        _check_square(images, self.cutout_size)
        s = self.start
        return images[..., s:s + self.crop_size, s:s + self.crop_size]


def _check_square(images: Tensor, size: int) -> None:
    if images.ndim != 4 or images.shape[-1] != size or images.shape[-2] != size:
        raise ValueError(f"expected images of shape (B, C, {size}, {size}), got {tuple(images.shape)}; "
                         f"set geometry.cutout_size to the cutouts' size")


def _interp_weights(frac: Tensor, interpolation: str) -> tuple[Tensor, Tensor]:
    """Per sampling point: sum of squared interpolation weights and the kernel's second moment.

    ``frac`` is the fractional pixel position (any shape). For white noise of variance v the
    interpolated value has variance v * sum(w^2) (per axis; multiply the two axes); a PSF of
    second moment m comes out with m + sum(w (t - frac)^2) (pixels^2, per axis).
    """
    if interpolation == "bilinear":
        return (1 - frac) ** 2 + frac**2, frac * (1 - frac)
    a = _BICUBIC_A
    taps = torch.arange(-1, 3, device=frac.device, dtype=frac.dtype)
    d = (frac.unsqueeze(-1) - taps).abs()  # distances to the 4 taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))
    return (w**2).sum(-1), (w * (taps - frac.unsqueeze(-1)) ** 2).sum(-1)


class AffineCrop(nn.Module):
    """Flip, rotate, scale and jitter the cutout and crop it, in one resampling.

    Output pixel ``p_out`` (relative to the crop centre, (x, y) = (column, row)) samples the
    cutout at ``c + t + (1/s) R(angle) F p_out`` where ``c`` is the centre of the plain centred
    slice, ``t`` the jitter, ``s`` the magnification, ``F`` a mirror of x. Pixel centres follow
    ``align_corners=False``, so the identity lands on pixel centres (the crop equals the slice)
    and so do rotations by multiples of 90 degrees about ``c``: ``angle = pi/2`` gives
    ``np.rot90(crop, k=1, axes=(-2, -1))`` (counter-clockwise as the array is printed; k=-1 is
    ``angle = -pi/2``). Values are multiplied by 1/s^2 (flux per pixel) when ``conserve_flux``,
    so the total flux of a source inside the crop is kept.

    The constructor refuses scale/jitter ranges whose rotated footprint could leave the cutout
    (crop half-diagonal / scale_min + jitter <= distance from ``c`` to the outermost usable pixel
    centre), so no padding ever reaches the crop.

    Args:
        cutout_size: input H = W.
        crop_size: output H = W.
        rotation: "any" (uniform angle), "right" (multiples of 90 degrees) or "none".
        flip: mirror with probability 1/2.
        scale_range: (min, max) magnification, drawn log-uniform.
        jitter: max shift of the centre in cutout pixels, per axis, uniform.
        interpolation: "bilinear" or "bicubic".
    """

    def __init__(self, cutout_size: int, crop_size: int, rotation: str = "any", flip: bool = True,
                 scale_range: tuple[float, float] = (1.0, 1.0), jitter: float = 0.0,
                 interpolation: str = "bilinear", conserve_flux: bool = True):
        super().__init__()
        if rotation not in ("any", "right", "none"):
            raise ValueError(f"rotation={rotation!r}: choose any, right or none")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation={interpolation!r}: choose bilinear or bicubic")
        if not 0 < crop_size <= cutout_size:
            raise ValueError(f"crop_size={crop_size} must be in [1, cutout_size={cutout_size}]")
        _check_range("scale_range", scale_range[0], scale_range[1], 1e-3)
        if jitter < 0:
            raise ValueError(f"jitter={jitter} must be >= 0")
        self.cutout_size, self.crop_size = cutout_size, crop_size
        self.rotation, self.flip, self.jitter = rotation, flip, float(jitter)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.interpolation, self.conserve_flux = interpolation, conserve_flux
        self.centre = crop_start(cutout_size, crop_size) + (crop_size - 1) / 2  # cutout pixel coordinates
        reach, room, half = _crop_reach(cutout_size, crop_size, rotation, self.scale_range[0], self.jitter,
                                        interpolation)
        if reach > room + 1e-9:
            max_jitter = room - half / self.scale_range[0]
            raise ValueError(
                f"the {crop_size}x{crop_size} crop can leave the {cutout_size}x{cutout_size} cutout: crop half-"
                f"{'diagonal' if rotation == 'any' else 'width'} {half:.2f} / scale_min {self.scale_range[0]} + "
                f"jitter {self.jitter} = {reach:.2f} > {room:.2f} pixels available; "
                + (f"lower jitter to <= {math.floor(max_jitter * 100) / 100}" if max_jitter >= 0 else
                   f"raise scale_min to >= {half / room:.3f}")
                + " or use a larger cutout")

    def sample_params(self, batch: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sample ``angle`` (B,) radians, ``flip`` (B,) bool, ``scale`` (B,), ``shift`` (B, 2) pixels (x, y)."""
        device = torch.device(device)
        _check_generator(generator, device)
        if self.rotation == "any":
            angle = _uniform((batch,), 0.0, 2 * math.pi, device, generator)
        elif self.rotation == "right":
            quarter = torch.randint(0, 4, (batch,), device=device, generator=generator)
            angle = quarter.to(torch.float32) * (math.pi / 2)
        else:
            angle = torch.zeros(batch, device=device)
        if self.flip:
            flip = torch.rand(batch, device=device, generator=generator) < 0.5
        else:
            flip = torch.zeros(batch, dtype=torch.bool, device=device)
        low, high = self.scale_range
        scale = torch.exp(_uniform((batch,), math.log(low), math.log(high), device, generator))
        shift = _uniform((batch, 2), -self.jitter, self.jitter, device, generator)
        return {"angle": angle, "flip": flip, "scale": scale, "shift": shift}

    def identity_params(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Parameters of the plain centred crop."""
        device = torch.device(device)
        return {"angle": torch.zeros(batch, device=device), "flip": torch.zeros(batch, dtype=torch.bool, device=device),
                "scale": torch.ones(batch, device=device), "shift": torch.zeros(batch, 2, device=device)}

    def sample_points(self, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Cutout pixel coordinates (x, y), each (B, n, n), sampled by the crop's pixels (float64 where available)."""
        angle = params["angle"]
        device = angle.device
        dtype = _precise_dtype(device)
        angle = angle.to(dtype)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Snap cos/sin of multiples of 90 degrees to exact 0 / +-1 so those rotations land on pixel centres.
        cos = torch.where(cos.abs() < 1e-6, torch.zeros_like(cos), cos)
        sin = torch.where(sin.abs() < 1e-6, torch.zeros_like(sin), sin)
        cos = torch.where((cos.abs() - 1).abs() < 1e-6, cos.sign(), cos)
        sin = torch.where((sin.abs() - 1).abs() < 1e-6, sin.sign(), sin)
        mirror = 1.0 - 2.0 * params["flip"].to(dtype)  # -1: mirror x
        inv = 1.0 / params["scale"].to(dtype)
        # M = (1/s) R F, R = [[cos, -sin], [sin, cos]], F = diag(mirror, 1).
        m00, m01 = (inv * cos * mirror), (-inv * sin)
        m10, m11 = (inv * sin * mirror), (inv * cos)
        n = self.crop_size
        offsets = torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2
        px = offsets.view(1, 1, n)  # column offset
        py = offsets.view(1, n, 1)  # row offset
        shift = params["shift"].to(dtype)
        cx = (self.centre + shift[:, 0]).view(-1, 1, 1)
        cy = (self.centre + shift[:, 1]).view(-1, 1, 1)

        def col(t: Tensor) -> Tensor:
            return t.view(-1, 1, 1)

        x = cx + col(m00) * px + col(m01) * py
        y = cy + col(m10) * px + col(m11) * py
        return x, y

    def grid(self, params: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, n, n, 2) sampling grid for ``F.grid_sample(..., align_corners=False)``, in ``dtype``.

        Pass the images' dtype: a float32 grid puts float64 images' samples ~1e-5 pixel off the
        pixel centres, so the identity and right-angle rotations would mix in neighbours.
        """
        x, y = self.sample_points(params)
        size = self.cutout_size
        return torch.stack(((2 * x + 1) / size - 1, (2 * y + 1) / size - 1), dim=-1).to(dtype)

    def interpolation_effects(self, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """What the resampling does to white noise and to the PSF, per sample (cutout pixel units).

        Returns ``noise_factor`` (B,): mean over the crop of the variance factor sum(w^2) of white
        noise, and ``blur`` (B,): mean extra second moment of the PSF per axis in cutout pixels^2.
        """
        x, y = self.sample_points(params)
        fx, fy = x - torch.floor(x), y - torch.floor(y)
        sx, vx = _interp_weights(fx, self.interpolation)
        sy, vy = _interp_weights(fy, self.interpolation)
        noise = (sx * sy).mean(dim=(-2, -1)).to(torch.float32)
        blur = (0.5 * (vx + vy)).mean(dim=(-2, -1)).to(torch.float32)
        return noise, blur

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(B, C, N, N) -> (B, C, n, n), flux per pixel scaled by 1/s^2 when ``conserve_flux``."""
        _check_square(images, self.cutout_size)
        out = F.grid_sample(images, self.grid(params, images.dtype), mode=self.interpolation,
                            padding_mode="border", align_corners=False)
        if self.conserve_flux:
            out = out * (1.0 / params["scale"].to(images.dtype) ** 2).view(-1, 1, 1, 1)
        return out

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(images, self.sample_params(images.shape[0], images.device, generator))


# ---------------------------------------------------------------------------
# Photometry: reddening, PSF, noise, normalisation.
# ---------------------------------------------------------------------------


def sample_ebv_lognormal(batch: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None,
                         fit: tuple[float, float, float] = EBV_LOGNORMAL) -> Tensor:
    """(B,) E(B-V) from the scipy ``lognorm(shape, loc, scale)`` fit: loc + scale exp(shape N(0, 1))."""
    shape, loc, scale = fit
    normal = torch.randn(batch, device=device, generator=generator)
    return loc + scale * torch.exp(shape * normal)


class Reddening(nn.Module):
    """Galactic dust: de-redden with the catalog E(B-V), re-redden with a drawn one.

    flux_b x 10^(-0.4 R_b (E_new - E_cat)), R_b = A_b / E(B-V) of the survey's bands.

    Args:
        extinction: (C,) R_b per band (``Survey.extinction``).
        mode: "lognormal" (the footprint fit ``surveys.EBV_LOGNORMAL``) or "uniform" on [0, ebv_max].
        ebv_max: upper end of the uniform draw.
    """

    def __init__(self, extinction: Sequence[float], mode: str = "lognormal", ebv_max: float = 0.1):
        super().__init__()
        if mode not in ("lognormal", "uniform"):
            raise ValueError(f"reddening mode={mode!r}: choose lognormal or uniform")
        if mode == "uniform" and ebv_max <= 0:
            raise ValueError(f"ebv_max={ebv_max} must be > 0")
        self.mode, self.ebv_max = mode, float(ebv_max)
        self.register_buffer("extinction", torch.as_tensor(list(extinction), dtype=torch.float64), persistent=False)

    def sample_params(self, batch: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``ebv`` (B,): the drawn E(B-V) of each image."""
        _check_generator(generator, torch.device(device))
        if self.mode == "lognormal":
            return {"ebv": sample_ebv_lognormal(batch, device, generator)}
        return {"ebv": _uniform((batch,), 0.0, self.ebv_max, torch.device(device), generator)}

    def factor(self, ebv_catalog: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(B, C) flux multipliers 10^(-0.4 R_b (E_new - E_cat)), computed in float64 where available."""
        dtype = _precise_dtype(ebv_catalog.device)
        extinction = self.extinction.to(device=ebv_catalog.device, dtype=dtype)
        delta = params["ebv"].to(dtype) - ebv_catalog.to(dtype)
        return torch.pow(10.0, -0.4 * delta.unsqueeze(-1) * extinction)

    def apply(self, images: Tensor, ebv_catalog: Tensor, params: dict[str, Tensor]) -> Tensor:
        if ebv_catalog.shape != (images.shape[0],):
            raise ValueError(f"ebv must have shape ({images.shape[0]},), got {tuple(ebv_catalog.shape)}")
        if images.shape[1] != self.extinction.numel():
            raise ValueError(f"images have {images.shape[1]} bands, the extinction coefficients "
                             f"{self.extinction.numel()}")
        gain = self.factor(ebv_catalog, params).to(images.dtype)
        return images * gain[:, :, None, None]

    def forward(self, images: Tensor, ebv_catalog: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(images, ebv_catalog, self.sample_params(images.shape[0], images.device, generator))


def _draw_factor(shape: tuple[int, int], low: float, high: float, independent_bands: bool,
                 device: torch.device, generator: torch.Generator | None) -> Tensor:
    """(B, C) factors ~ U[low, high], one per image (repeated over bands) or one per band."""
    batch, bands = shape
    if independent_bands:
        return _uniform((batch, bands), low, high, device, generator)
    return _uniform((batch, 1), low, high, device, generator).expand(batch, bands)


def quadrature_add(own: Tensor, target: Tensor) -> Tensor:
    """sqrt(max(target^2 - own^2, 0)): what must be added to reach ``target`` from ``own``."""
    return torch.sqrt(torch.clamp(target**2 - own**2, min=0.0))


def gaussian_kernel_1d(sigma: Tensor, radius: int) -> Tensor:
    """(N, 2 radius + 1) normalised 1-D Gaussian kernels whose discrete variance is exactly sigma^2.

    A sampled Gaussian has the wrong variance for sigma below ~1 pixel; a three-tap correction
    (+d at +-1, -2d at 0) restores it, so a point source's second moment grows by exactly sigma^2.
    """
    sigma = sigma.reshape(-1, 1).to(torch.float32)
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-3)) ** 2)
    weights = weights / weights.sum(-1, keepdim=True)
    delta = 0.5 * (sigma**2 - (weights * taps**2).sum(-1, keepdim=True))
    correction = torch.zeros_like(taps)
    correction[radius - 1], correction[radius], correction[radius + 1] = 1.0, -2.0, 1.0
    return weights + delta * correction


def gaussian_blur(images: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Blur each (sample, band) of (B, C, H, W) with its own Gaussian ``sigma`` (B, C) in pixels.

    Separable, as two batched matrix products with banded (replicate-edge) blur matrices, which
    BLAS runs much faster than a grouped convolution. Also returns the (B, C) factor by which
    white-noise variance shrinks: (sum of squared 1-D weights)^2.
    """
    batch, bands, height, width = images.shape
    radius = max(1, math.ceil(4.0 * float(sigma.max())))  # one host sync per batch
    kernel = gaussian_kernel_1d(sigma, radius).to(images.dtype)  # (B*C, K)
    noise_factor = ((kernel**2).sum(-1) ** 2).view(batch, bands)
    taps = torch.arange(-radius, radius + 1, device=images.device)

    def blur_matrix(size: int) -> Tensor:
        index = (torch.arange(size, device=images.device).unsqueeze(-1) + taps).clamp(0, size - 1)  # (size, K)
        matrix = torch.zeros(batch * bands, size, size, device=images.device, dtype=images.dtype)
        weights = kernel.unsqueeze(1).expand(-1, size, -1)
        return matrix.scatter_add_(2, index.expand(batch * bands, -1, -1), weights)

    rows = blur_matrix(height)
    cols = rows if width == height else blur_matrix(width)
    flat = images.reshape(batch * bands, height, width)
    out = torch.matmul(torch.matmul(rows, flat), cols.transpose(1, 2))
    return out.view(batch, bands, height, width), noise_factor


class PSFBlur(nn.Module):
    """Degrade the seeing: blur by sigma_add = sqrt(max(sigma_target^2 - sigma_own^2, 0)) per sample and band.

    sigma_target = factor x sigma_own, factor ~ U[factor_min, factor_max] per image (or per band).
    ``own_sigma`` is the image's own PSF sigma in pixels of the image being blurred, (B, C).
    """

    def __init__(self, factor_range: tuple[float, float] = (1.0, 1.5), independent_bands: bool = False):
        super().__init__()
        _check_range("psf factor range", factor_range[0], factor_range[1], 0.0)
        self.factor_range, self.independent_bands = (float(factor_range[0]), float(factor_range[1])), independent_bands

    def sample_params(self, own_sigma: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``target`` and ``sigma_add`` (B, C), pixels."""
        _check_generator(generator, own_sigma.device)
        factor = _draw_factor(tuple(own_sigma.shape), *self.factor_range, self.independent_bands,
                              own_sigma.device, generator)
        target = factor * own_sigma
        return {"target": target, "sigma_add": quadrature_add(own_sigma, target)}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return gaussian_blur(images, params["sigma_add"])[0]

    def forward(self, images: Tensor, own_sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(images, self.sample_params(own_sigma, generator))


class GaussianNoise(nn.Module):
    """Raise the sky noise: add N(0, std_add^2), std_add = sqrt(max(target^2 - own^2, 0)) per sample and band.

    target = factor x own, factor ~ U[factor_min, factor_max] per band (or per image).
    ``own_sigma`` (B, C) is the image's own noise per pixel, in the image's units.
    """

    def __init__(self, factor_range: tuple[float, float] = (1.0, 1.5), independent_bands: bool = True):
        super().__init__()
        _check_range("noise factor range", factor_range[0], factor_range[1], 0.0)
        self.factor_range, self.independent_bands = (float(factor_range[0]), float(factor_range[1])), independent_bands

    def sample_params(self, own_sigma: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``target`` and ``std_add`` (B, C), the image's units."""
        _check_generator(generator, own_sigma.device)
        factor = _draw_factor(tuple(own_sigma.shape), *self.factor_range, self.independent_bands,
                              own_sigma.device, generator)
        target = factor * own_sigma
        return {"target": target, "std_add": quadrature_add(own_sigma, target)}

    def apply(self, images: Tensor, params: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        return images + noise * params["std_add"].to(images.dtype)[:, :, None, None]

    def forward(self, images: Tensor, own_sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(images, self.sample_params(own_sigma, generator), generator)


class FluxNormalize(nn.Module):
    """The flux scale the encoder sees, per band.

    - ``asinh``: asinh(x / (k sigma_b)), sigma_b a robust noise scale per band (e.g. the manifest's sigma_mad);
    - ``linear``: (x - median_b) / sigma_b;
    - ``none``: x unchanged.

    Args:
        mode: asinh | linear | none.
        median, sigma: (C,) per-band statistics (sequences or tensors); sigma required unless mode is none,
            median defaults to 0.
        asinh_k: softening in units of sigma_b.
    """

    def __init__(self, mode: str = "asinh", median: Sequence[float] | Tensor | None = None,
                 sigma: Sequence[float] | Tensor | None = None, asinh_k: float = 1.0):
        super().__init__()
        if mode not in ("asinh", "linear", "none"):
            raise ValueError(f"normalisation mode={mode!r}: choose asinh, linear or none")
        if mode != "none" and sigma is None:
            raise ValueError(f"normalisation {mode!r} needs the per-band noise scale sigma (C,), "
                             f"e.g. the manifest statistics' sigma_mad")
        if asinh_k <= 0:
            raise ValueError(f"asinh_k={asinh_k} must be > 0")
        self.mode, self.asinh_k = mode, float(asinh_k)
        sigma_t = torch.as_tensor(sigma if sigma is not None else [1.0], dtype=torch.float32).flatten()
        if mode != "none" and not bool((sigma_t > 0).all()):
            raise ValueError(f"per-band sigma must be > 0, got {sigma_t.tolist()}")
        median_t = (torch.as_tensor(median, dtype=torch.float32).flatten() if median is not None
                    else torch.zeros_like(sigma_t))
        if median_t.shape != sigma_t.shape:
            raise ValueError(f"median has {median_t.numel()} bands, sigma {sigma_t.numel()}")
        self.register_buffer("median", median_t, persistent=False)
        self.register_buffer("sigma", sigma_t, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.mode == "none":
            return images
        if self.sigma.numel() != images.shape[1]:
            raise ValueError(f"images have {images.shape[1]} bands, the normalisation statistics {self.sigma.numel()}")
        sigma = self.sigma.to(images.dtype)[:, None, None]
        if self.mode == "asinh":
            return torch.asinh(images / (self.asinh_k * sigma))
        return (images - self.median.to(images.dtype)[:, None, None]) / sigma


# ---------------------------------------------------------------------------
# The two-view pipeline.
# ---------------------------------------------------------------------------


class AstroAugment(nn.Module):
    """Two independently augmented views of a batch of survey cutouts.

    ``forward(images, ebv, psf_fwhm=None, sky_sigma=None, generator=None) -> (view1, view2)``:
    images (B, C, N, N) nanomaggies/pixel, ebv (B,) catalog E(B-V), psf_fwhm (B, C) arcsec and
    sky_sigma (B, C) nanomaggies/pixel of each image (None: the survey's medians) -> two
    (B, C, n, n) views, n = the crop size. ``eval_view(images)`` is the deterministic centred crop
    plus normalisation.

    Args:
        survey: survey name or :class:`Survey` (bands, extinction, pixel scale, sizes, medians).
        cfg: :class:`AugmentConfig`; default config when None.
        photometric: False for RGB PNG data: reddening, PSF and noise then refuse to run.
        median, sigma: (C,) normalisation statistics (e.g. the manifest's per-band median and
            sigma_mad); sigma defaults to the survey's sky sigma for photometric data.
    """

    def __init__(self, survey: str | Survey = "sdss", cfg: AugmentConfig | None = None, *, photometric: bool = True,
                 median: Sequence[float] | Tensor | None = None, sigma: Sequence[float] | Tensor | None = None):
        super().__init__()
        self.survey = get_survey(survey) if isinstance(survey, str) else survey
        self.cfg = cfg = cfg or AugmentConfig()
        self.photometric = photometric
        if not photometric:
            enabled = [name for name in ("reddening", "psf", "noise") if getattr(cfg, name).enabled]
            if enabled:
                raise ValueError(f"flux-based augmentations {', '.join(enabled)} need photometric images (fluxes), "
                                 f"but photometric=False (RGB PNG data); set "
                                 + ", ".join(f"augment.{name}.enabled=false" for name in enabled)
                                 + " (config/pretrain_rgb.yaml does)")
        geo = cfg.geometry
        self.cutout_size = geo.cutout_size or self.survey.cutout_size
        self.crop_size = geo.crop_size or self.survey.crop_size
        self.center_crop = CenterCrop(self.cutout_size, self.crop_size)
        self.geometry = AffineCrop(self.cutout_size, self.crop_size, rotation=geo.rotation, flip=geo.flip,
                                   scale_range=(geo.scale_min, geo.scale_max), jitter=geo.jitter,
                                   interpolation=geo.interpolation, conserve_flux=photometric) if geo.enabled else None
        self.reddening = (Reddening(self.survey.extinction, cfg.reddening.mode, cfg.reddening.ebv_max)
                          if cfg.reddening.enabled else None)
        self.psf = (PSFBlur((cfg.psf.factor_min, cfg.psf.factor_max), cfg.psf.independent_bands)
                    if cfg.psf.enabled else None)
        self.noise = (GaussianNoise((cfg.noise.factor_min, cfg.noise.factor_max), cfg.noise.independent_bands)
                      if cfg.noise.enabled else None)
        if sigma is None and photometric and cfg.normalize.mode != "none":
            sigma = self.survey.sky_sigma
        self.normalize = FluxNormalize(cfg.normalize.mode, median, sigma, cfg.normalize.asinh_k)
        self.register_buffer("psf_median", torch.tensor(self.survey.psf_fwhm, dtype=torch.float32), persistent=False)
        self.register_buffer("sky_median", torch.tensor(self.survey.sky_sigma, dtype=torch.float32), persistent=False)

    def _per_band(self, values: Tensor | None, median: Tensor, batch: int, name: str) -> Tensor:
        if values is None:
            return median.unsqueeze(0).expand(batch, -1)
        values = values.to(device=median.device, dtype=torch.float32)
        if values.shape != (batch, median.numel()):
            raise ValueError(f"{name} must have shape ({batch}, {median.numel()}), got {tuple(values.shape)}")
        return values

    def view(self, images: Tensor, ebv: Tensor | None = None, psf_fwhm: Tensor | None = None,
             sky_sigma: Tensor | None = None, generator: torch.Generator | None = None,
             return_params: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """One augmented view (B, C, n, n); with ``return_params`` also the dict of what was drawn."""
        _check_square(images, self.cutout_size)
        _check_generator(generator, images.device)
        if self.photometric and images.shape[1] != self.survey.n_bands:
            raise ValueError(f"images have {images.shape[1]} bands, survey {self.survey.name} has "
                             f"{self.survey.n_bands} ({''.join(self.survey.bands)})")
        x = images if images.dtype in (torch.float32, torch.float64) else images.to(torch.float32)
        batch, device = x.shape[0], x.device
        params: dict[str, Tensor] = {}

        # Geometry: one resampling; track what it does to the image's own noise and PSF.
        if self.geometry is not None:
            geo = self.geometry.sample_params(batch, device, generator)
            params.update(geo)
            x = F.grid_sample(x, self.geometry.grid(geo, x.dtype), mode=self.geometry.interpolation,
                              padding_mode="border", align_corners=False)
            scale = geo["scale"].to(torch.float32)
            need_effects = self.psf is not None or self.noise is not None
            interp_noise, interp_blur = (self.geometry.interpolation_effects(geo) if need_effects else (None, None))
        else:
            x = self.center_crop(x)
            scale = torch.ones(batch, device=device)
            interp_noise = torch.ones(batch, device=device)
            interp_blur = torch.zeros(batch, device=device)
        if not self.photometric:  # no flux augmentations, but the same normalisation as eval_view
            x = self.normalize(x)
            return (x, params) if return_params else x

        # Flux per pixel (1/s^2) and reddening, fused into one per-band gain.
        gain = (1.0 / scale**2).unsqueeze(-1).expand(batch, self.survey.n_bands)
        if self.reddening is not None:
            if ebv is None:
                raise ValueError("reddening is enabled: pass the catalog E(B-V) of each image as ebv (B,)")
            ebv = ebv.to(device)
            if ebv.shape != (batch,):
                raise ValueError(f"ebv must have shape ({batch},), got {tuple(ebv.shape)}")
            red = self.reddening.sample_params(batch, device, generator)
            params["ebv"] = red["ebv"]
            params["reddening_factor"] = self.reddening.factor(ebv, red)
            gain = gain * params["reddening_factor"].to(torch.float32)
        x = x * gain.to(x.dtype)[:, :, None, None]

        if self.psf is not None or self.noise is not None:
            psf_fwhm = self._per_band(psf_fwhm, self.psf_median.to(device), batch, "psf_fwhm")
            sky_sigma = self._per_band(sky_sigma, self.sky_median.to(device), batch, "sky_sigma")
            s = scale.unsqueeze(-1)
            # Own PSF sigma in crop pixels: native sigma (+ interpolation blur), magnified by s.
            psf_pix = psf_fwhm / FWHM_PER_SIGMA / self.survey.pixel_scale
            own_psf = torch.sqrt(psf_pix**2 + interp_blur.unsqueeze(-1)) * s
            # Own noise per crop pixel: sky sigma x interpolation smoothing x gain (which holds 1/s^2).
            own_noise = sky_sigma * torch.sqrt(interp_noise).unsqueeze(-1) * gain
            if self.psf is not None:
                psf = self.psf.sample_params(own_psf, generator)
                params["psf_sigma_add"] = psf["sigma_add"]
                x, blur_noise = gaussian_blur(x, psf["sigma_add"])
                own_noise = own_noise * torch.sqrt(blur_noise.to(torch.float32))
            if self.noise is not None:
                noise = self.noise.sample_params(own_noise, generator)
                params["noise_std_add"] = noise["std_add"]
                x = self.noise.apply(x, noise, generator)

        x = self.normalize(x)
        return (x, params) if return_params else x

    def forward(self, images: Tensor, ebv: Tensor | None = None, psf_fwhm: Tensor | None = None,
                sky_sigma: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two views, each with its own random parameters: ((B, C, n, n), (B, C, n, n))."""
        first = self.view(images, ebv, psf_fwhm, sky_sigma, generator)
        second = self.view(images, ebv, psf_fwhm, sky_sigma, generator)
        return first, second

    @torch.no_grad()
    def eval_view(self, images: Tensor) -> Tensor:
        """Deterministic evaluation input: centred crop (a plain slice) and normalisation."""
        x = self.center_crop(images)
        x = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        return self.normalize(x)


#: The name the issue uses for the two-view pipeline.
TwoViewAugment = AstroAugment
