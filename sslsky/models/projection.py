"""Projection heads of the self-supervised methods: ``(B, in_dim) -> (B, out_dim)``.

- :func:`projection_head`: SimCLR's 2-layer MLP ``Linear - ReLU - Linear`` (Chen et al. 2020), also the
  head of MoCo v2 (Chen et al. 2020b); ``mlp=False`` gives MoCo v1's single linear layer.
- :func:`bn_mlp`: BYOL's projector and predictor ``Linear - BN - ReLU - Linear`` (Grill et al. 2020).
"""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, out_dim: int, hidden: int = 0, mlp: bool = True) -> nn.Module:
    """``Linear(in_dim, hidden) - ReLU - Linear(hidden, out_dim)`` (``hidden`` 0: ``in_dim``), or one
    ``Linear(in_dim, out_dim)`` if not ``mlp``."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    hidden = hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def bn_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """BYOL projector / predictor ``(B, in_dim) -> (B, out_dim)``: Linear - BN - ReLU - Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))
