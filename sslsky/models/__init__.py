"""Encoders and self-supervised models."""

from sslsky.models.byol import BYOL, HybridBYOL, VoteModel
from sslsky.models.encoders import ARCHITECTURES, ENCODERS, STEMS, build_encoder, encoder_options
from sslsky.models.fusion import FusionEncoder
from sslsky.models.moco import MoCo, projection_head
from sslsky.models.vit import ViT

__all__ = ["ARCHITECTURES", "BYOL", "ENCODERS", "STEMS", "FusionEncoder", "HybridBYOL", "MoCo", "ViT", "VoteModel",
           "build_encoder", "encoder_options", "projection_head"]
