"""Load a pretrained encoder for evaluation, whatever made it, and the input transform it expects.

Three checkpoint layouts are recognised (never ``strict=False``: a missing or unexpected weight is an
error that names the keys):

- **sslsky**: ``encoder.pt`` written at the end of ``sslsky pretrain`` (``format: sslsky-encoder-v1``:
  encoder weights, ``encoder_args`` to rebuild any architecture -- ResNet, vit, fusion --, bands, manifest
  statistics, augmentation config), or a training checkpoint ``checkpoints/step-*.pt`` of any method (its
  ``encoder_prefix`` names the encoder's weights in the method's state dict, ``encoder_args`` its
  architecture). Files written before the method contract have no ``encoder_args`` / ``encoder_prefix``:
  they are ResNets (``arch``, ``stem``), and their encoder is ``encoder_q.*`` (MoCo) or
  ``online_encoder.*`` (BYOL, hybrid, votes): :data:`LEGACY_ENCODER_PREFIXES`;
- **moco**: facebookresearch/moco ``checkpoint_*.pth.tar`` (``state_dict`` with
  ``module.encoder_q.*``; the projection head ``fc.*`` is dropped);
- **ssl-sky-surveys**: Hayat et al. 2021 ``ckpt.tar`` (``model_state``, keys with or without
  ``module.``; the classifier ``fc.*`` is dropped; their ResNet has the stride-1 stem without max-pool).

For the foreign layouts the architecture is read off the weights (block counts and kinds), the band
count off the first convolution; the stem cannot be (it has no weights of its own) and is ``hayat``
unless given.

    loaded = load_encoder("runs/sdss/encoder.pt")
    features = loaded.encoder(loaded.transform(images))   # images: (B, C, N, N) nanomaggies
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch import nn

from sslsky.augment import CenterCrop, FluxNormalize
from sslsky.config import AugmentConfig, config_from_dict
from sslsky.models.encoders import ARCHITECTURES, STEMS, build_encoder
from sslsky.surveys import Survey, get_survey

ENCODER_FORMAT = "sslsky-encoder-v1"
#: Architectures whose positional embeddings fix the input size (a crop of another size cannot be fed).
FIXED_SIZE = ("vit", "fusion")
#: Where the encoder is in training checkpoints written before they recorded ``encoder_prefix``.
LEGACY_ENCODER_PREFIXES = ("encoder_q.", "online_encoder.")
#: ResNet block counts per stage -> architecture, for reading foreign checkpoints.
_BLOCKS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as an encoder; the message names the file and what is wrong."""


@dataclasses.dataclass
class LoadedEncoder:
    """An encoder in eval mode, the transform of its inputs, and where it came from."""

    encoder: nn.Module  # (B, C, n, n) -> (B, feature_dim)
    transform: nn.Module  # (B, C, N, N) cutouts -> (B, C, n, n) centred crop, normalised as in training
    arch: str
    stem: str | None  # None: the arch has none (vit)
    in_channels: int
    feature_dim: int
    source: str  # sslsky | sslsky-checkpoint | moco | ssl-sky-surveys
    info: dict  # survey, bands, stats, augment config (sslsky layouts only)
    build_args: dict  # build_encoder(**build_args) gives a new, randomly initialised encoder of this architecture

    def fresh(self) -> nn.Module:
        """A randomly initialised encoder of the same architecture (a scratch baseline's)."""
        return build_encoder(**self.build_args)


class EvalTransform(nn.Module):
    """Centred crop (a plain slice) and the flux normalisation of training: the deterministic eval view."""

    def __init__(self, cutout_size: int, crop_size: int, normalize: FluxNormalize):
        super().__init__()
        self.crop = CenterCrop(cutout_size, crop_size)
        self.normalize = normalize
        self.cutout_size, self.crop_size = cutout_size, crop_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.crop(images)
        return self.normalize(x if x.is_floating_point() else x.float())


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict in a checkpoint file (``torch.load(weights_only=True)``); a CheckpointError saying what is wrong."""
    return _read(Path(path))


def _read(path: Path) -> dict:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: name the file (e.g. {path / 'encoder.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
        raise CheckpointError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): "
                              f"{_load_failure(path, err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of weights")
    return state


def _load_failure(path: Path, err: Exception) -> str:
    """torch's reason in a line: a file that is no checkpoint at all, a pickle of objects that are not plain
    weights (refused for safety), or the first line of torch's message."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        return f"it is not a torch checkpoint (it starts with {head!r}); is it a whole, downloaded .pt file?"
    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled Python object ({refused.group(1)}) besides the weights, which is refused for "
                f"safety; save only the state_dict (tensors, numbers, strings) and point to that file")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0]
    return f"{type(err).__name__}: {first}; is it a whole checkpoint (not truncated)?"


def _strip(weights: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}


def infer_arch(weights: dict, path: Path) -> str:
    """The torchvision ResNet whose blocks these weights have."""
    kind = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in weights) else "basic"
    counts = tuple(len({k.split(".")[1] for k in weights if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    arch = _BLOCKS.get((kind, counts))
    if arch is None:
        raise CheckpointError(f"checkpoint {path}: {kind} blocks {counts} per stage match none of "
                              f"{', '.join(ARCHITECTURES)}")
    return arch


def load_encoder(path: str | os.PathLike, stem: str | None = None, device: str | torch.device = "cpu",
                 survey: str | Survey | None = None) -> LoadedEncoder:
    """Load the encoder in ``path`` (sslsky, moco or ssl-sky-surveys layout) in eval mode on ``device``.

    Args:
        stem: the stem of a foreign checkpoint (default ``hayat``); for sslsky files it must match
            the file's own if given.
        survey: survey of the inputs (crop size, fallback normalisation) when the file does not say: a name, or
            the :class:`Survey` of the shards (``sslsky.augment.survey_of_images``).
    """
    path = Path(path)
    state = _read(path)
    info: dict = {}
    args: dict | None = None  # build_encoder arguments recorded in the file (sslsky files since the contract)
    if state.get("format") == ENCODER_FORMAT:
        source, weights = "sslsky", state["encoder"]
        arch, file_stem, args = state["arch"], state.get("stem"), state.get("encoder_args")
        info = {k: state.get(k) for k in ("survey", "bands", "stats", "augment", "method")}
    elif "model" in state and "config" in state and _checkpoint_prefix(state):
        prefix = _checkpoint_prefix(state)
        source, weights = "sslsky-checkpoint", _strip(state["model"], prefix)
        cfg = state["config"]
        arch, args = cfg["model"]["arch"], state.get("encoder_args")
        file_stem = args.get("stem") if args else cfg["model"].get("stem")
        info = {"augment": cfg.get("augment"), "method": cfg.get("method"), **state.get("data_info", {})}
    elif "state_dict" in state and any(k.startswith("module.encoder_q.") for k in state["state_dict"]):
        source, file_stem = "moco", None
        weights = {k: v for k, v in _strip(state["state_dict"], "module.encoder_q.").items()
                   if not k.startswith("fc.")}
        arch = infer_arch(weights, path)
    elif "model_state" in state:
        source, file_stem = "ssl-sky-surveys", None
        weights = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state["model_state"].items()}
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
        arch = infer_arch(weights, path)
    else:
        raise CheckpointError(f"checkpoint {path} is none of: an sslsky encoder export (format={ENCODER_FORMAT}), "
                              f"an sslsky training checkpoint (model + config), a MoCo checkpoint "
                              f"(state_dict with module.encoder_q.*), an ssl-sky-surveys checkpoint (model_state); "
                              f"top-level keys: {sorted(state)[:10]}")
    if file_stem is not None and stem is not None and stem != file_stem:
        raise CheckpointError(f"checkpoint {path} was trained with stem={file_stem!r}, not {stem!r}")
    if args is None:  # a ResNet: written before encoder_args were recorded, or a foreign layout
        stem = file_stem or stem or "hayat"
        if stem not in STEMS:
            raise CheckpointError(f"unknown stem {stem!r}; choose one of {STEMS}")
        if "conv1.weight" not in weights:
            raise CheckpointError(f"checkpoint {path} ({source}) has no conv1.weight, so it is no ResNet, and it "
                                  f"records no encoder_args that would name another architecture")
        args = {"arch": arch, "in_channels": int(weights["conv1.weight"].shape[1]), "stem": stem}
    try:
        encoder = build_encoder(**args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} ({source}) records an encoder this sslsky cannot build "
                              f"({args}): {err}") from None
    try:
        result = encoder.load_state_dict(weights, strict=False)  # checked below, never ignored
    except RuntimeError as err:  # weights of other shapes than the recorded architecture has
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise CheckpointError(f"checkpoint {path} ({source}, {arch}): its weights do not fit the architecture it "
                              f"records ({first}); is the file whole and unedited?") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} ({source}, {arch}) does not match the encoder: "
                              f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    encoder.eval().to(device)
    in_channels = int(encoder.build_args["in_channels"])
    transform = eval_transform(info, info.get("survey") or survey, in_channels, path).to(device)
    size = encoder.build_args.get("image_size")
    if size is not None and arch in FIXED_SIZE and transform.crop_size != size:
        raise CheckpointError(f"checkpoint {path} ({arch}) was built for {size}-pixel inputs but records a "
                              f"{transform.crop_size}-pixel crop (augment.geometry.crop_size); the file is "
                              f"inconsistent: export it again")
    return LoadedEncoder(encoder=encoder, transform=transform, arch=arch, stem=encoder.build_args.get("stem"),
                         in_channels=in_channels, feature_dim=int(encoder.feature_dim), source=source, info=info,
                         build_args=dict(encoder.build_args))


def _checkpoint_prefix(state: dict) -> str | None:
    """The prefix of the encoder's weights in a training checkpoint's ``model`` state dict (None: no encoder)."""
    prefix = state.get("encoder_prefix")
    if prefix:
        return prefix if any(k.startswith(prefix) for k in state["model"]) else None
    return next((p for p in LEGACY_ENCODER_PREFIXES if any(k.startswith(p) for k in state["model"])), None)


def eval_transform(info: dict, survey: str | Survey | None, in_channels: int, path: Path) -> EvalTransform:
    """The deterministic view the encoder was trained on: centred crop + normalisation of its run.

    Sizes the run resolved (``augment.geometry``) win; 0 falls back to ``survey``'s (a name or a Survey).
    """
    aug = AugmentConfig()
    if info.get("augment"):
        aug = config_from_dict(AugmentConfig, info["augment"], "augment")
    if survey:
        s = get_survey(survey) if isinstance(survey, str) else survey
        cutout, crop = aug.geometry.cutout_size or s.cutout_size, aug.geometry.crop_size or s.crop_size
        sky = list(s.sky_sigma) if len(s.sky_sigma) == in_channels else None
    elif aug.geometry.cutout_size and aug.geometry.crop_size:
        cutout, crop, sky = aug.geometry.cutout_size, aug.geometry.crop_size, None
    else:
        raise CheckpointError(f"checkpoint {path} does not say its survey; pass survey='sdss' or 'decals' "
                              f"(for the cutout and crop sizes)")
    stats = info.get("stats") or {}
    sigma = stats.get("sigma_mad") or sky
    mode = aug.normalize.mode if sigma is not None else "none"
    normalize = FluxNormalize(mode, stats.get("median"), sigma, aug.normalize.asinh_k)
    return EvalTransform(cutout, crop, normalize)
