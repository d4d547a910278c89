"""The network a supervised evaluation trains: the encoder (pretrained from ``cfg.ckpt``, or fresh for scratch)
with the transform of its inputs, and the :class:`Predictor` that puts the head behind it.

Architecture, stem, bands and input transform come from ``cfg.ckpt`` when one is given (so scratch and finetune
see identical inputs: the centred crop and flux normalisation the encoder was pretrained with, ``load_encoder``'s
transform), else from ``cfg.arch`` / ``cfg.stem`` / ``cfg.crop_size`` and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sslsky.augment import data_survey
from sslsky.config import ConfigError, SupervisedEvalConfig
from sslsky.models.encoders import build_encoder
from sslsky.models.loading import CheckpointError, EvalTransform, eval_transform, load_encoder
from sslsky.surveys import Survey


@dataclass
class Backbone:
    """An encoder (pretrained or fresh) and the transform of its inputs."""

    encoder: nn.Module  # (B, C, n, n) -> (B, feature_dim)
    transform: EvalTransform  # (B, C, N, N) cutouts -> (B, C, n, n) centred crop, normalised
    arch: str
    stem: str
    in_channels: int
    feature_dim: int
    source: str  # the checkpoint layout, or "random" (scratch)
    survey: Survey  # the images' (extinction coefficients, sizes); colour packs: survey_of_images' own


def build_backbone(cfg: SupervisedEvalConfig, attrs: dict, device: torch.device) -> Backbone:
    """The pretrained encoder of ``cfg.ckpt`` (re-initialised for scratch), or a fresh one from the config."""
    n_bands = len(attrs.get("bands") or "") or None
    if cfg.ckpt:
        try:
            loaded = load_encoder(cfg.ckpt, stem=cfg.ckpt_stem or None, device="cpu",
                                  survey=data_survey(attrs, cfg.data.survey, cfg.data.path))
        except CheckpointError as err:
            raise ConfigError(f"ckpt: {err}") from None
        if n_bands is not None and loaded.in_channels != n_bands:
            raise ConfigError(f"ckpt {cfg.ckpt} takes {loaded.in_channels} bands but the data in {cfg.data.path} "
                              f"have {n_bands} ({attrs.get('bands')})")
        encoder, source = loaded.encoder, loaded.source
        if cfg.protocol == "scratch":  # same network and inputs, random weights
            encoder, source = loaded.fresh(), "random"  # the same architecture (any arch), new weights
        survey = data_survey(attrs, cfg.data.survey, cfg.data.path, loaded.info.get("survey") or "")
        return Backbone(encoder.to(device), loaded.transform.to(device), loaded.arch, loaded.stem,
                        loaded.in_channels, loaded.feature_dim, source, survey)
    survey = data_survey(attrs, cfg.data.survey, cfg.data.path)
    in_channels = n_bands or survey.n_bands
    encoder = build_encoder(cfg.arch, in_channels, cfg.stem)
    info = {"stats": attrs.get("stats") or {}, "augment": {"geometry": {"crop_size": cfg.crop_size}}}
    try:
        transform = eval_transform(info, survey, in_channels, Path(cfg.data.path))
    except ValueError as err:  # a crop that does not fit the cutouts
        raise ConfigError(f"{err}: set crop_size to at most the cutout size (0: the survey's crop)") from None
    return Backbone(encoder.to(device), transform.to(device), cfg.arch, cfg.stem, in_channels,
                    int(encoder.feature_dim), "random", survey)


class Predictor(nn.Module):
    """Encoder -> features (+ E(B-V)) -> head logits: ``(B, C, n, n), (B,) -> (B, n_outputs)``.

    For the linear protocol the encoder is an ``nn.Identity`` and the inputs are precomputed features.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, use_ebv: bool):
        super().__init__()
        self.encoder, self.head, self.use_ebv = encoder, head, use_ebv

    def forward(self, x: Tensor, ebv: Tensor) -> Tensor:
        features = self.encoder(x).float()
        if self.use_ebv:
            features = torch.cat([features, ebv.to(features.dtype).unsqueeze(1)], dim=1)
        return self.head(features)
