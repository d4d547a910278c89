"""Encoders for N-band galaxy cutouts by name: ResNets, a ViT and the CNN + ViT fusion of Wei et al. 2022.

Every encoder maps ``(B, C, H, W)`` images to ``(B, encoder.feature_dim)`` features and is randomly
initialised (nothing is downloaded). One registry, :data:`ENCODERS`, and one call::

    build_encoder(arch, in_channels, stem=None, image_size=None, **options)

==========  =====================================================  ==================  ===============
arch        what                                                   options             feature_dim
==========  =====================================================  ==================  ===============
resnet18    torchvision ResNet-18 with an N-band stem              (none)              512
resnet34    torchvision ResNet-34                                  (none)              512
resnet50    torchvision ResNet-50                                  (none)              2048
vit         :class:`~sslsky.models.vit.ViT`                        patch_size, depth,  width
                                                                   width, heads,
                                                                   mlp_ratio
fusion      :class:`~sslsky.models.fusion.FusionEncoder`           levels, stages,     512 with the
                                                                   vit_dim and the     defaults
                                                                   ViT options
==========  =====================================================  ==================  ===============

``stem`` (ResNets and the CNN branch of ``fusion``; ``None``: ``"hayat"``):

- ``"imagenet"``: the torchvision stem, a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool
  (the feature map is 1/4 of the input after the stem).
- ``"hayat"``: the stem of Hayat et al. 2021 for 64x64 SDSS cutouts, a 7x7 stride-1 convolution
  and no max-pool, so the stem keeps the spatial size (a 64x64 cutout reaches ``layer4`` at 8x8
  instead of 2x2). Wei et al. 2022 use the same stem in their CNN branch.

A ``vit`` has no stem (its input layer is the patch embedding): ``stem`` must stay ``None``.

``image_size`` is the side H = W of the square inputs (the crop size: 64 SDSS, 96 DECaLS). ``vit`` and
``fusion`` need it (their positional embedding is learned for one patch grid) and refuse inputs of any
other size with a :class:`ValueError`; patch sizes that do not divide it use the centred crop of the
largest patch grid that fits (12-px patches on 64 px: a 5x5 grid on the central 60x60, see
:mod:`sslsky.models.vit`). ResNets take any size; for them ``image_size`` is only checked.

ResNets: the returned module *is* a torchvision :class:`~torchvision.models.ResNet` with ``fc = Identity``,
so its state dict has the usual keys (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) and loads into
``torchvision.models.resnet50(num_classes=...)`` after the same stem change. No ``view`` calls are added,
so ``model.to(memory_format=torch.channels_last)`` is kept end to end.

Every built encoder carries ``encoder.build_args``: the ``build_encoder`` keyword arguments with every
default filled in, so ``build_encoder(**encoder.build_args)`` builds the same architecture again (the
record to store next to exported weights).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import nn
from torchvision import models

from sslsky.config import config_to_dict
from sslsky.models.fusion import FusionEncoder
from sslsky.models.vit import ViT

if TYPE_CHECKING:
    from sslsky.config import ModelConfig

#: ResNet name -> torchvision constructor (random init). Kept under this name for the callers that read
#: ResNet weights (``sslsky.models.loading``); the registry of every encoder is :data:`ENCODERS`.
ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}

STEMS = ("hayat", "imagenet")


def _check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose 'hayat' (64x64 cutouts: stride-1 conv, no max-pool) "
                         f"or 'imagenet' (stride-2 conv + max-pool)")


def resnet(arch: str, in_channels: int, *, stem: str = "hayat", image_size: int | None = None) -> models.ResNet:
    """A torchvision ResNet for ``in_channels`` bands with the ``stem`` and ``fc = Identity``.

    ``image_size`` is accepted for a uniform call and not used: a ResNet takes any input size.
    """
    _check_stem(stem)
    encoder = ARCHITECTURES[arch](weights=None)
    stride = 1 if stem == "hayat" else 2
    encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=stride, padding=3, bias=False)
    nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    if stem == "hayat":
        encoder.maxpool = nn.Identity()
    encoder.feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    return encoder


def vit(in_channels: int, *, stem: str | None = None, image_size: int | None = None, patch_size: int = 8,
        depth: int = 12, width: int = 192, heads: int = 3, mlp_ratio: float = 4.0) -> ViT:
    """The ``vit`` encoder: defaults are DeiT-Tiny (Touvron et al. 2021: depth 12, width 192, 3 heads) on
    8-pixel patches (an 8x8 grid on 64-px SDSS crops, 12x12 on 96-px DECaLS crops)."""
    if stem is not None:
        raise ValueError(f"stem={stem!r}: a vit has no stem (its input layer is the patch embedding; set "
                         f"patch_size); leave stem unset")
    if image_size is None:
        raise ValueError("arch='vit' needs image_size, the side of the square input crops (64 SDSS, 96 DECaLS): "
                         "its positional embedding is learned for one patch grid")
    return ViT(in_channels, image_size, patch_size=patch_size, depth=depth, width=width, heads=heads,
               mlp_ratio=mlp_ratio)


def fusion(in_channels: int, *, stem: str = "hayat", image_size: int | None = None, levels: Sequence[int] = (3,),
           stages: Sequence[int] | None = None, vit_dim: int = 256, patch_size: int = 12, depth: int = 6,
           width: int = 128, heads: int = 4, mlp_ratio: float = 4.0) -> FusionEncoder:
    """The ``fusion`` encoder of Wei et al. 2022: a ResNet-18 CNN branch (``stem``, ``stages``, pooled
    ``levels``) and a ViT branch (``patch_size`` ... ``mlp_ratio``, then ``Linear(width, vit_dim)``);
    the defaults are theirs (512-d). See :mod:`sslsky.models.fusion`."""
    if image_size is None:
        raise ValueError("arch='fusion' needs image_size, the side of the square input crops (64 SDSS, 96 DECaLS): "
                         "the positional embedding of its ViT branch is learned for one patch grid")
    cnn = resnet("resnet18", in_channels, stem=stem)
    transformer = ViT(in_channels, image_size, patch_size=patch_size, depth=depth, width=width, heads=heads,
                      mlp_ratio=mlp_ratio)
    return FusionEncoder(cnn, transformer, levels=levels, stages=stages, vit_dim=vit_dim)


#: Encoder name -> constructor ``(in_channels, *, stem, image_size, **options) -> nn.Module``; its other
#: keyword-only parameters are the options that ``build_encoder`` accepts for that name.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(resnet, name) for name in ARCHITECTURES},
    "vit": vit,
    "fusion": fusion,
}


def encoder_options(arch: str) -> dict[str, object]:
    """The options of ``arch`` beyond ``stem`` and ``image_size``, with their defaults."""
    parameters = inspect.signature(ENCODERS[arch]).parameters.values()
    return {p.name: p.default for p in parameters
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("stem", "image_size")}


def build_encoder(arch: str = "resnet50", in_channels: int = 5, stem: str | None = None,
                  image_size: int | None = None, **options) -> nn.Module:
    """A randomly initialised encoder ``(B, in_channels, H, W) -> (B, encoder.feature_dim)``.

    Args:
        arch: a name in :data:`ENCODERS` (``resnet18``, ``resnet34``, ``resnet50``, ``vit``, ``fusion``).
        in_channels: number of bands C of the ``(B, C, H, W)`` input (5 for SDSS ugriz, 3 for DECaLS grz).
        stem: ``"hayat"`` (7x7 stride-1 conv, no max-pool) or ``"imagenet"`` (7x7 stride-2 conv + max-pool)
            for the ResNets and the CNN branch of ``fusion``; ``None``: the arch's default (``hayat``;
            ``vit`` has none).
        image_size: side H = W of the inputs; needed by ``vit`` and ``fusion`` (other sizes are refused).
        **options: the arch's own options (:func:`encoder_options`), e.g. ``patch_size=16, depth=6`` for ``vit``
            or ``levels=[2, 3]`` for ``fusion``.

    Returns:
        The encoder, with ``feature_dim`` and ``build_args`` (see the module docstring).

    Raises:
        ValueError: an unknown arch, stem or option (the message names the valid ones), or a bad value.
    """
    if arch not in ENCODERS:
        raise ValueError(f"unknown encoder architecture {arch!r}; choose one of {sorted(ENCODERS)}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer (the number of bands), got {in_channels!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer (the side of the square inputs), got {image_size!r}")
    valid = encoder_options(arch)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = f"choose among {sorted(valid)}" if valid else "it takes none"
        raise ValueError(f"unknown option(s) {unknown} for arch={arch!r}: {choices}")
    kwargs = {"image_size": image_size, **options} if stem is None else {"stem": stem, "image_size": image_size,
                                                                        **options}
    encoder = ENCODERS[arch](in_channels, **kwargs)
    bound = inspect.signature(ENCODERS[arch]).bind(in_channels, **kwargs)
    bound.apply_defaults()
    encoder.build_args = {"arch": arch, **bound.arguments}
    return encoder


def takes_stem(arch: str) -> bool:
    """Whether ``arch`` has a stem to choose (the ResNets and ``fusion``; a ``vit`` has none)."""
    return inspect.signature(ENCODERS[arch]).parameters["stem"].default is not None


def encoder_from_config(model: ModelConfig, in_channels: int, image_size: int) -> nn.Module:
    """The encoder of ``model.arch`` for ``in_channels`` bands and ``image_size`` crops: the arch's options from
    its own section (``model.vit``, ``model.fusion``; the ResNets have none), ``model.stem`` where the arch has a
    stem. ValueError as :func:`build_encoder`, and for a changed ``model.stem`` on an arch without one."""
    if model.arch not in ENCODERS:
        raise ValueError(f"model.arch={model.arch!r}: choose one of {', '.join(ENCODERS)}")
    section = getattr(model, model.arch, None)
    options = config_to_dict(section) if dataclasses.is_dataclass(section) else {}
    stem = None
    if takes_stem(model.arch):
        stem = model.stem
    elif model.stem != type(model)().stem:
        raise ValueError(f"model.stem={model.stem!r}: arch={model.arch!r} has no stem (its patch embedding is its "
                         f"input layer; set model.{model.arch}.patch_size): remove model.stem from the config, or "
                         f"override it with its default, model.stem={type(model)().stem}, which a {model.arch} "
                         f"takes as unset")
    return build_encoder(model.arch, in_channels, stem, image_size, **options)


def stem(encoder: models.ResNet) -> nn.Sequential:
    """The encoder's stem (conv1, bn1, relu, maxpool) as one module sharing its weights: ``(B, 64, H', W')``."""
    return nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
