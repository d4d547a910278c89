"""Encoders and self-supervised models."""

from sslsky.models.byol import BYOL, HybridBYOL, VoteModel
from sslsky.models.encoders import ARCHITECTURES, STEMS, build_encoder
from sslsky.models.moco import MoCo, projection_head

__all__ = ["ARCHITECTURES", "BYOL", "STEMS", "HybridBYOL", "MoCo", "VoteModel", "build_encoder", "projection_head"]
