"""ResNet encoders for N-band galaxy cutouts (torchvision architectures, random initialisation).

Two stems:

- ``"imagenet"``: the torchvision stem, a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool
  (the feature map is 1/4 of the input after the stem).
- ``"hayat"``: the stem of Hayat et al. 2021 for 64x64 SDSS cutouts, a 7x7 stride-1 convolution
  and no max-pool, so the stem keeps the spatial size (a 64x64 cutout reaches ``layer4`` at 8x8
  instead of 2x2).

The classifier ``fc`` is an :class:`~torch.nn.Identity`: the encoder maps ``(B, C, H, W)`` images to
``(B, feature_dim)`` features (512 for ResNet-18/34, 2048 for ResNet-50). The returned module *is* a
torchvision :class:`~torchvision.models.ResNet`, so its state dict has the usual keys (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...) and loads into ``torchvision.models.resnet50(num_classes=...)``
after the same stem change. Nothing is downloaded (``weights=None``). No ``view`` calls are added,
so ``model.to(memory_format=torch.channels_last)`` is kept end to end.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models

#: Architecture name -> torchvision constructor (random init).
ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}

STEMS = ("hayat", "imagenet")


def build_encoder(arch: str = "resnet50", in_channels: int = 5, stem: str = "hayat") -> models.ResNet:
    """A randomly initialised ResNet taking ``in_channels`` bands, with ``fc = Identity``.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: number of bands C of the ``(B, C, H, W)`` input (5 for SDSS ugriz, 3 for DECaLS grz).
        stem: ``"hayat"`` (7x7 stride-1 conv, no max-pool) or ``"imagenet"`` (7x7 stride-2 conv + max-pool).

    Returns:
        The encoder; ``encoder(x)`` is ``(B, encoder.feature_dim)``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown encoder architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose 'hayat' (64x64 cutouts: stride-1 conv, no max-pool) "
                         f"or 'imagenet' (stride-2 conv + max-pool)")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer (the number of bands), got {in_channels!r}")
    encoder = ARCHITECTURES[arch](weights=None)
    stride = 1 if stem == "hayat" else 2
    encoder.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=stride, padding=3, bias=False)
    nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    if stem == "hayat":
        encoder.maxpool = nn.Identity()
    encoder.feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    return encoder


def stem(encoder: models.ResNet) -> nn.Sequential:
    """The encoder's stem (conv1, bn1, relu, maxpool) as one module sharing its weights: ``(B, 64, H', W')``."""
    return nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
