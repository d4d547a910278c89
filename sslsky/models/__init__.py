"""Encoders and the heads the methods put on them (the methods themselves: :mod:`sslsky.methods`)."""

from sslsky.models.encoders import ARCHITECTURES, ENCODERS, STEMS, build_encoder, encoder_from_config, encoder_options
from sslsky.models.fusion import FusionEncoder
from sslsky.models.projection import bn_mlp, projection_head
from sslsky.models.vit import ViT

__all__ = ["ARCHITECTURES", "ENCODERS", "STEMS", "FusionEncoder", "ViT", "bn_mlp", "build_encoder",
           "encoder_from_config", "encoder_options", "projection_head"]
