"""Encoders and self-supervised models."""

from sslsky.models.encoders import ARCHITECTURES, STEMS, build_encoder
from sslsky.models.moco import MoCo, projection_head

__all__ = ["ARCHITECTURES", "STEMS", "MoCo", "build_encoder", "projection_head"]
