"""Encoders and self-supervised models."""

from sslsky.models.byol import BYOL, HybridBYOL
from sslsky.models.encoders import ARCHITECTURES, STEMS, build_encoder
from sslsky.models.moco import MoCo, projection_head

__all__ = ["ARCHITECTURES", "BYOL", "STEMS", "HybridBYOL", "MoCo", "build_encoder", "projection_head"]
