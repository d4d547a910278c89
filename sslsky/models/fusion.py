"""CNN + vision-transformer fusion encoder of Wei et al. 2022 (PASP 134, 114508), with N bands and several CNN levels.

Their code (kustcn/galaxy_contrastive, ``common_utils/Model.py``) runs two branches on the same image and
concatenates their features:

- **CNN branch**: a 7x7 stride-1 stem without max-pool (the ``hayat`` stem of
  :mod:`sslsky.models.encoders`), then the ResNet-18 stages that their code names ``layer2`` and
  ``layer3`` (``layer1`` and ``layer4`` are commented out): BasicBlocks 64 -> 128 (stride 2) -> 256
  (stride 2), exactly torchvision's ``resnet18().layer2`` and ``.layer3``, which take the 64 channels of the
  stem. Global average pool: 256-d (no linear layer: 256 is the width of ``layer3``);
- **ViT branch**: 12-pixel patches, depth 6, 4 heads, width 128, CLS token -> LayerNorm -> Linear(128, 256);
- features concatenated, CNN first: 512-d.

Here the two branches are composed from parts built elsewhere (:func:`sslsky.models.encoders.build_encoder`
with ``arch="fusion"`` builds them): a torchvision ResNet (its stem and the chosen stages are kept, the
rest is dropped) and a :class:`~sslsky.models.vit.ViT`. Beyond their code:

- **N bands** in both branches (their code is RGB only);
- ``levels``: "multi-hierarchy" fusion, the torchvision stage numbers (1-4) whose outputs are globally
  average pooled and concatenated, each at its own width (no projection): ResNet-18 widths are
  64, 128, 256, 512 for ``layer1..layer4``, so with ``vit_dim = 256``::

      levels     CNN stages run        feature_dim
      (3,)       layer2, layer3        256 + 256       = 512   (Wei et al.)
      (2, 3)     layer2, layer3        128 + 256 + 256 = 640
      (1, 2, 3)  layer1 .. layer3      64 + 128 + 256 + 256 = 704
      (3, 4)     layer2 .. layer4      256 + 512 + 256 = 1024

- ``stages``: the stages run, a consecutive run ending at ``max(levels)``; by default Wei's choice of
  skipping ``layer1`` (``layer2 .. layer{max(levels)}``), with ``layer1`` added when ``levels`` contains 1.

Differences from their code, on purpose: full softmax attention instead of Linformer (with their 50
tokens and k = 64 the Linformer projection does not shorten the sequence); a stem padding of 3 (size
preserving, as every ResNet here) instead of their 1; and the patch grid of inputs that 12 does not
divide is a centred crop (see :mod:`sslsky.models.vit`), where their ViT asserts divisibility (84 px).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import ResNet

from sslsky.models.vit import ViT

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def _stage_width(stage: nn.Sequential) -> int:
    """Output channels of a torchvision ResNet stage (the last BatchNorm of its last block)."""
    return [m for m in stage[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def default_stages(levels: Sequence[int]) -> tuple[int, ...]:
    """Wei et al.'s stages for these ``levels``: ``2 .. max(levels)``, from 1 when ``levels`` contains 1."""
    return tuple(range(min(2, *levels), max(levels) + 1))


def check_levels(levels: Sequence[int], stages: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``(levels, stages)`` as tuples; :class:`ValueError` naming the rule that is broken."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty list of ResNet stages among 1, 2, 3, 4, got {levels!r}")
    levels = tuple(levels)
    if (any(isinstance(s, bool) or not isinstance(s, int) or s not in (1, 2, 3, 4) for s in levels)
            or list(levels) != sorted(set(levels))):
        raise ValueError(f"levels={list(levels)}: choose increasing, distinct ResNet stages among 1, 2, 3, 4 "
                         f"(torchvision layer1..layer4), e.g. [3] (Wei et al.) or [2, 3]")
    if stages is None:
        stages = default_stages(levels)
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise ValueError(f"stages must be a list of ResNet stages, got {stages!r}")
    runs = [tuple(range(first, max(levels) + 1)) for first in (2, 1)]
    if tuple(stages) not in runs or any(isinstance(s, bool) or not isinstance(s, int) for s in stages):
        raise ValueError(f"stages={list(stages)} with levels={list(levels)}: the CNN runs consecutive stages from "
                         f"1 or 2 (the 64-channel stem feeds layer1 or layer2) up to max(levels)={max(levels)}; "
                         f"choose {list(range(2, max(levels) + 1))} or {list(range(1, max(levels) + 1))}")
    stages = tuple(stages)
    if not set(levels) <= set(stages):
        raise ValueError(f"levels={list(levels)} must be among the stages run, {list(stages)}")
    return levels, stages


class FusionEncoder(nn.Module):
    """CNN + ViT on the same image: ``(B, C, H, W) -> (B, sum of pooled CNN widths + vit_dim)``.

    Args:
        resnet: a torchvision ResNet with its stem (``conv1``, ``bn1``, ``relu``, ``maxpool``) already made
            for C bands; its ``stages`` are kept, the rest (other stages, ``fc``) is not.
        vit: the transformer branch, built for the same bands and input size.
        levels: stages (1-4) whose outputs are average pooled and concatenated, in increasing order.
        stages: stages run (default :func:`default_stages`); see :func:`check_levels`.
        vit_dim: width of the linear layer after the ViT's CLS feature.

    Output: ``[pool(layer_l) for l in levels] + [Linear(vit(x))]`` concatenated along dim 1. Parameters are
    named ``cnn.conv1.weight``, ``cnn.layer2.0.conv1.weight``, ... (torchvision's names under ``cnn.``),
    ``vit.*`` and ``vit_head.*``.

    Attributes:
        feature_dim: the size of the output; ``level_dims``: the pooled width of each level.
    """

    def __init__(self, resnet: ResNet, vit: ViT, levels: Sequence[int] = (3,), stages: Sequence[int] | None = None,
                 vit_dim: int = 256):
        super().__init__()
        self.levels, self.stages = check_levels(levels, stages)
        if isinstance(vit_dim, bool) or not isinstance(vit_dim, int) or vit_dim < 1:
            raise ValueError(f"vit_dim must be a positive integer, got {vit_dim!r}")
        first = getattr(resnet, STAGE_NAMES[self.stages[0] - 1])[0].conv1.in_channels
        if first != resnet.conv1.out_channels:
            raise ValueError(f"layer{self.stages[0]} of this ResNet takes {first} channels, its stem gives "
                             f"{resnet.conv1.out_channels}: start the stages at 1")
        self.cnn = nn.ModuleDict({"conv1": resnet.conv1, "bn1": resnet.bn1, "relu": resnet.relu,
                                  "maxpool": resnet.maxpool})
        for s in self.stages:
            self.cnn[STAGE_NAMES[s - 1]] = getattr(resnet, STAGE_NAMES[s - 1])
        self.vit = vit
        self.vit_head = nn.Linear(vit.feature_dim, vit_dim)
        self.level_dims = {s: _stage_width(self.cnn[STAGE_NAMES[s - 1]]) for s in self.levels}
        self.feature_dim = sum(self.level_dims.values()) + vit_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, image_size, image_size)`` -> ``(B, feature_dim)``."""
        cnn = self.cnn
        h = cnn["maxpool"](cnn["relu"](cnn["bn1"](cnn["conv1"](x))))  # (B, 64, H, W) with the hayat stem
        pooled = []
        for s in self.stages:
            h = cnn[STAGE_NAMES[s - 1]](h)  # (B, width_s, H / 2^(s-1), ...)
            if s in self.levels:
                pooled.append(h.mean(dim=(2, 3)))  # global average pool (B, width_s)
        return torch.cat([*pooled, self.vit_head(self.vit(x))], dim=1)
