"""Typed configuration: dataclass schemas, YAML files, dotted ``key=value`` overrides.

Why our own loader rather than OmegaConf: the schemas are plain dataclasses,
the only extra dependency is pyyaml (already needed), and the error we want
for a misspelled key -- the key, the file it came from and the closest valid
name -- is a few lines with :mod:`difflib`.

    cfg = load_config(PackConfig, "config/pack.yaml", ["shard_size=512", "dtype=float16"])
    write_config(cfg, out_dir / "config.yaml")

Allowed values are declared once, on the line of the default: ``base_lr: float = checked(0.03, "> 0")``
(:func:`checked`, :class:`Rule`: ``> X``, ``>= X``, ``in [a, b)``, ``one of a, b``), plus a schema's
cross-field ``ORDERED`` pairs (``z_min < z_max``). :func:`load_config` and :func:`config_from_dict` refuse a
config that breaks any of them, and any non-finite float, before a command does any work or writes anything:
``optim.base_lr=-1.0 must be > 0``. What depends on the data or the machine (a crop that fits the images, a
queue that divides the global batch) is checked by the command that knows it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sslsky.errors import ConfigError  # defined with the other user errors; imported from here by most code
from sslsky.outputs import write_text_atomic

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Allowed values, declared next to the defaults: ``batch_size: int = checked(256, ">= 1")``.
# ---------------------------------------------------------------------------

_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a config value must be, in words that read as code: ``"> 0"``, ``">= 1"``, ``"in [0, 1)"``,
    ``"in (0, 1]"``, ``"one of auto, slurm, local"`` (``''`` for the empty string). A list field's rule applies to
    each item; None (an optional value left unset) passes."""

    text: str
    why: str = ""  # said after the rule in the message, e.g. "BatchNorm in the encoder needs two rows"

    def __post_init__(self):
        self.test(0 if not self.text.startswith("one of") else "")  # a typo in a schema fails at import

    def test(self, value: Any) -> bool:
        text = self.text.strip()
        if text.startswith("one of "):
            return value in [choice.strip().strip("'\"") for choice in text[len("one of "):].split(",")]
        match = re.fullmatch(r"(>=|<=|>|<)\s*(\S+)", text)
        if match:
            return _COMPARE[match[1]](value, float(match[2]))
        match = re.fullmatch(r"in\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])", text)
        if match:
            low, high = float(match[2]), float(match[3])
            above = value >= low if match[1] == "[" else value > low
            below = value <= high if match[4] == "]" else value < high
            return above and below
        raise ValueError(f"config rule {self.text!r}: write '> X', '>= X', 'in [a, b)' or 'one of a, b, c'")

    def problems(self, key: str, value: Any) -> list[str]:
        """``["optim.base_lr=-1.0 must be > 0"]`` if ``value`` breaks the rule (each item of a list), else []."""
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        why = f" ({self.why})" if self.why else ""
        return [f"{name}={v!r} must be {self.text}{why}" for name, v in items if v is not None and not self.test(v)]


def checked(default: Any = dataclasses.MISSING, rule: str = "", *, why: str = "",
            factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with ``default`` (or ``factory`` for a list) whose value must satisfy ``rule``
    (:class:`Rule`); :func:`check_values` enforces it whenever a config is loaded."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"rule": Rule(rule, why)})


#: Cross-field rules of a schema, as its class attribute ``ORDERED = (("z_min", "<", "z_max"), ...)``.
_ORDER_WORDS = {"<": "less than", "<=": "at most"}


def check_values(cfg: Any, where: str = "") -> list[str]:
    """Every broken rule of ``cfg`` and its nested configs (field rules and ``ORDERED`` pairs), as messages that
    name the dotted key, the value and what is allowed; [] when all hold. Non-finite floats never get this far
    (:func:`_coerce` refuses them)."""
    problems: list[str] = []
    for f in dataclasses.fields(cfg):
        name = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        rule = f.metadata.get("rule")
        if rule is not None:
            problems += rule.problems(name, value)
        if dataclasses.is_dataclass(value):
            problems += check_values(value, name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += check_values(item, f"{name}[{i}]")
    for low, op, high in getattr(type(cfg), "ORDERED", ()):
        a, b = getattr(cfg, low), getattr(cfg, high)
        if not _COMPARE[op](a, b):
            prefix = f"{where}." if where else ""
            problems.append(f"{prefix}{low}={a!r}, {prefix}{high}={b!r}: {low} must be {_ORDER_WORDS[op]} {high}")
    return problems


# ---------------------------------------------------------------------------
# Schemas. Defaults and allowed values live here and nowhere else.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class MockConfig:
    """``sslsky mock``: a physically grounded mock survey with known truth."""

    survey: str = "sdss"  # sdss | decals
    n: int = checked(1000, ">= 1")  # galaxies to simulate
    seed: int = checked(0, ">= 0")  # master seed: the output depends on it alone, not on the ranks
    out: str = "mock_sdss"  # output folder: catalog.fits + cutouts/ (fits) or images/ (png, jpeg)
    # fits: (bands, H, W) nanomaggy cubes, catalog keyed by object_id | png | jpeg: 8-bit Lupton RGB composites
    # (DECaLS z,r,g; SDSS i,r,g) framed and sized like Galaxy Zoo DECaLS, catalog keyed by IAU-style id_str
    format: str = "fits"
    image_size: int = checked(424, ">= 1")  # png / jpeg only: H = W of the written images (424: Galaxy Zoo DECaLS)
    r_limit: float = 17.77  # r-band selection limit (SDSS Main Galaxy Sample)
    z_min: float = checked(0.005, "> 0")  # redshift range of the simulated galaxies
    z_max: float = checked(0.4, "> 0")
    specz_fraction: float = checked(1.0, "in [0, 1]")  # fraction with a spectroscopic z; others get NaN
    unlabelled_fraction: float = checked(0.0, "in [0, 1]")  # fraction of galaxies without volunteer votes
    volunteers_mean: float = checked(40.0, "> 0")  # mean volunteers per galaxy (vote counts)
    seeing_scatter: float = checked(0.15, ">= 0")  # lognormal scatter of per-galaxy PSF FWHM
    progress: bool = True

    ORDERED: typing.ClassVar = (("z_min", "<", "z_max"),)  # cross-field rules (check_values)


@dataclasses.dataclass
class PackConfig:
    """``sslsky pack``: FITS / PNG cutouts + catalog -> sharded HDF5 + manifest."""

    catalog: str = ""  # FITS, CSV, ECSV, Parquet or ssl-sky-surveys HDF5
    out: str = ""  # output folder for shard-*.h5, manifest.json, rejected.csv
    shard_size: int = checked(1024, ">= 1")  # rows per shard
    # auto: uint8 for 8-bit colour images (PNG/JPEG), float32 for fluxes | float32 | float16 (halves I/O; refuses
    # |x| > 65504) | uint8 (colour images only)
    dtype: str = checked("auto", "one of auto, float32, float16, uint8")
    survey: str = ""  # sdss | decals; empty: read from the cutout headers / catalog
    # resample every cutout to N x N: Lanczos for colour images, flux-conserving for FITS (pixel scale updated);
    # 0: keep the size (FITS: the survey's cutout size)
    image_size: int = checked(0, ">= 0")
    # catalog column of the galaxy id (integer or text, kept exactly); empty: the first of object_id, id_str, iauname,
    # objid, dr8_id
    id_column: str = ""
    label_column: str = ""  # integer class column packed as morph_class; empty: morph_class (if present)
    max_bad_fraction: float = checked(0.01, "in [0, 1]")  # reject a cutout with more NaN/inf pixels than this
    fill_value: float = 0.0  # what NaN/inf pixels below the limit become (and are flagged)
    # cutouts sampled for the per-band robust statistics (same sample for any rank count)
    stats_sample: int = checked(2000, ">= 1")
    progress: bool = True


@dataclasses.dataclass
class MocoConfig:
    """``method: moco`` (MoCo v2, He et al. 2020; Chen et al. 2020): projection head, queue, key encoder."""

    dim: int = checked(128, ">= 1")  # projection (embedding) dimension
    queue_size: int = checked(65536, ">= 1")  # K negatives; must be a multiple of the global batch (batch_size x ranks)
    momentum: float = checked(0.999, "in [0, 1)")  # key-encoder EMA: theta_k <- m theta_k + (1 - m) theta_q
    temperature: float = checked(0.2, "> 0")  # InfoNCE temperature T
    mlp: bool = True  # MoCo v2 2-layer MLP head (hidden = encoder feature dim); false: one linear layer (v1)
    # shuffle: shuffled BN across ranks (local shuffle on one process) | syncbn (GPU only)
    bn: str = checked("shuffle", "one of shuffle, syncbn")


@dataclasses.dataclass
class ByolConfig:
    """``method: byol`` and ``hybrid`` (BYOL, Grill et al. 2020): projector, predictor, target EMA."""

    dim: int = checked(128, ">= 1")  # projection dimension
    hidden: int = checked(4096, ">= 1")  # hidden width of the projector and predictor MLPs
    base_momentum: float = checked(0.99, "in [0, 1)")  # target EMA momentum, cosine from this to 1 over total_steps


@dataclasses.dataclass
class SimclrConfig:
    """``method: simclr`` (SimCLR, Chen et al. 2020; with the fusion encoder: Wei et al. 2022)."""

    dim: int = checked(128, ">= 1")  # projection dimension
    hidden: int = checked(0, ">= 0")  # hidden width of the 2-layer projection MLP; 0: the encoder's feature dim
    # NT-Xent temperature (0.1 as in Wei et al. 2022)
    temperature: float = checked(0.1, ">= 0.001", why="a smaller one makes the logits too large for float32 arithmetic")


def _default_class_captions() -> dict[str, list[str]]:
    """Captions of the morphology classes (:data:`sslsky.vocabulary.MORPH_CLASSES`), several per class."""
    return {
        "round smooth": ["a smooth, round galaxy", "a round elliptical galaxy", "a smooth galaxy, round in shape"],
        "in-between smooth": ["a smooth galaxy, in between round and cigar-shaped", "a smooth, oval galaxy",
                              "an elliptical galaxy of middling elongation"],
        "cigar smooth": ["a smooth, cigar-shaped galaxy", "an elongated smooth galaxy",
                         "a smooth galaxy, long and thin like a cigar"],
        "edge-on disk": ["an edge-on disk galaxy", "a disk galaxy seen edge-on", "an edge-on disk with a bulge",
                         "an edge-on disk with a dust lane"],
        "barred spiral": ["a spiral galaxy with a bar", "a barred spiral galaxy", "a face-on disk with a bar and arms"],
        "unbarred spiral": ["a spiral galaxy without a bar", "a spiral galaxy with two arms",
                            "a spiral galaxy with many arms"],
        "merger/disturbed": ["a merging galaxy", "a disturbed galaxy with a tidal tail", "two galaxies merging"],
    }


def _default_answer_phrases() -> dict[str, str]:
    """Phrases of the answers of :data:`sslsky.vocabulary.VOTE_TREE` (``question/answer``; '' says nothing)."""
    return {
        "smooth-or-featured/smooth": "smooth", "smooth-or-featured/featured": "featured with a disk",
        "smooth-or-featured/artifact": "an artifact", "how-rounded/round": "round",
        "how-rounded/in-between": "in between round and cigar-shaped", "how-rounded/cigar": "cigar-shaped",
        "disk-edge-on/yes": "seen edge-on", "disk-edge-on/no": "seen face-on", "has-bar/yes": "barred",
        "has-bar/no": "without a bar", "spiral-arms/yes": "with spiral arms", "spiral-arms/no": "without arms",
        "merging/none": "", "merging/minor": "merging with a smaller galaxy", "merging/major": "in a major merger",
    }


@dataclasses.dataclass
class AlignConfig:
    """``method: align`` (GalaxAlign, Wang, Wang & Luo 2024): image, symbol and text towers aligned (CLIP loss)."""

    @dataclasses.dataclass
    class Stage:
        """One stage: its steps, where the symbols go and each pair's weight in the loss."""

        steps: int = checked(1, ">= 1")
        # image: symbols through the image tower (GalaxAlign's stage 1) | own: the symbol tower, initialised from
        # the image tower when such a stage follows an image one (their stage 2)
        symbol_tower: str = checked("image", "one of image, own")
        image_text: float = checked(1.0, ">= 0")
        image_symbol: float = checked(0.0, ">= 0")
        symbol_text: float = checked(1.0, ">= 0")
        image_image: float = checked(0.0, ">= 0")  # > 0: every galaxy drawn, the unlabelled ones train this term

    init: str = ""  # the image tower's start: any encoder file sslsky reads (encoder.pt, MoCo, ...); '' random
    labels: str = checked("morph_class", "one of morph_class, votes")  # captions and symbols from what
    embed_dim: int = checked(128, ">= 1")  # the shared embedding space
    context: int = checked(32, ">= 4")  # text tokens, <sot> and <eot> included
    text_width: int = checked(128, ">= 1")
    text_depth: int = checked(4, ">= 1")
    text_heads: int = checked(4, ">= 1")
    symbol_variants: int = checked(8, ">= 1")  # drawn per galaxy: orientation, size, line width
    # galaxies of the same label are positives of each other too (UniCL, Yang et al. 2022): with a few classes a
    # batch holds many identical captions, which plain CLIP targets would push apart; false: CLIP's own targets
    same_label_positive: bool = True
    logit_scale: float = checked(math.log(1 / 0.07), "> 0")  # ln of the initial scale (CLIP)
    logit_scale_max: float = checked(math.log(100.0), "> 0")  # the clamp (CLIP)
    # the stages' steps add up to optim.total_steps; [] one image stage (image_text + symbol_text)
    stages: list[Stage] = dataclasses.field(default_factory=list)
    # replaces the defaults whole: give every class of the data
    class_captions: dict[str, list[str]] = dataclasses.field(default_factory=_default_class_captions)
    # symbol kinds for classes of your own names (sslsky symbols --out DIR draws the kinds), e.g.
    # {elliptical: [round-smooth, in-between-smooth], spiral: [unbarred-spiral-2-arms]}; the vocabulary's classes
    # have theirs (sslsky.data.symbols.CLASS_SYMBOLS)
    class_symbols: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    answer_phrases: dict[str, str] = dataclasses.field(default_factory=_default_answer_phrases)
    vote_caption: str = "a galaxy that is {answers}"  # a vote path's caption; {answers}: its answers' phrases


@dataclasses.dataclass
class VitConfig:
    """``model.arch: vit``: a ViT on N-band patches (defaults DeiT-Tiny, 8-pixel patches)."""

    patch_size: int = checked(8, ">= 1")  # pixels; a size that does not divide the crop uses the central grid
    depth: int = checked(12, ">= 1")  # transformer blocks
    width: int = checked(192, ">= 1")  # token width (the feature dimension)
    heads: int = checked(3, ">= 1")  # attention heads; must divide width
    mlp_ratio: float = checked(4.0, "> 0")  # hidden width of each block's MLP / width


@dataclasses.dataclass
class FusionConfig:
    """``model.arch: fusion``: the CNN + ViT encoder of Wei et al. 2022 (their defaults: 512-d features)."""

    # CNN stages pooled into the features: [3] is theirs (ResNet stages 2-3, stage 3 pooled); [2, 3] adds the
    # pooled stage-2 map ("multi-hierarchy" fusion)
    levels: list[int] = dataclasses.field(default_factory=lambda: [3])
    vit_dim: int = checked(256, ">= 1")  # the ViT branch's CLS token is projected to this
    patch_size: int = checked(12, ">= 1")  # ViT branch: 12-pixel patches, depth 6, width 128, 4 heads (theirs)
    depth: int = checked(6, ">= 1")
    width: int = checked(128, ">= 1")
    heads: int = checked(4, ">= 1")
    mlp_ratio: float = checked(4.0, "> 0")


@dataclasses.dataclass
class ModelConfig:
    """The encoder (``arch`` and its section) and each method's own section; a method reads only its own.

    ``sslsky.methods`` says which sections a method reads; a changed value in another method's section is a
    config error naming it (so a setting never silently does nothing).
    """

    # resnet18 | resnet34 | resnet50 (torchvision) | vit (model.vit) | fusion (model.fusion); random init, nothing
    # downloaded (sslsky.models.encoders)
    arch: str = "resnet50"
    n_bands: int = checked(0, ">= 0")  # input channels; 0: the survey's band count (5 for SDSS ugriz, 3 for DECaLS grz)
    # hayat: 7x7 stride-1 conv, no max-pool (64x64 cutouts) | imagenet: stride 2 + max-pool. ResNets and the CNN
    # branch of fusion; a vit has none (its patch embedding is its input layer)
    stem: str = "hayat"
    vit: VitConfig = dataclasses.field(default_factory=VitConfig)
    fusion: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    moco: MocoConfig = dataclasses.field(default_factory=MocoConfig)
    byol: ByolConfig = dataclasses.field(default_factory=ByolConfig)
    simclr: SimclrConfig = dataclasses.field(default_factory=SimclrConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)


#: Flat ``model.*`` keys of configs written before each method had its own section -> their keys now.
#: Stored configs (checkpoints, run directories) are read through :func:`migrate_config`; a user's config
#: that still spells them gets the new name in its error.
LEGACY_MODEL_KEYS = {
    "dim": ("moco.dim", "byol.dim"),
    "queue_size": ("moco.queue_size",),
    "momentum": ("moco.momentum",),
    "temperature": ("moco.temperature",),
    "mlp": ("moco.mlp",),
    "bn": ("moco.bn",),
    "byol_hidden": ("byol.hidden",),
    "byol_base_momentum": ("byol.base_momentum",),
}


def migrate_config(tree: dict) -> dict:
    """A copy of a stored pretraining config with the flat model keys of :data:`LEGACY_MODEL_KEYS` moved into
    their sections (a config without them comes back equal)."""
    tree = dict(tree)
    model = dict(tree.get("model") or {})
    for old, new_keys in LEGACY_MODEL_KEYS.items():
        if old in model:
            value = model.pop(old)
            for new in new_keys:
                section, key = new.split(".")
                model.setdefault(section, {})
                model[section] = {**model[section], key: value}
    if "model" in tree:
        tree["model"] = model
    return tree


@dataclasses.dataclass
class AugmentConfig:
    """On-device two-view augmentations (``sslsky.augment.AstroAugment``); each part can be switched off.

    Flux-based parts (reddening, psf, noise) refuse photometric=False data (RGB PNG cutouts).
    """

    @dataclasses.dataclass
    class Reddening:
        enabled: bool = True
        # lognormal: surveys.EBV_LOGNORMAL fit | uniform: E(B-V) ~ U[0, ebv_max]
        mode: str = checked("lognormal", "one of lognormal, uniform")
        ebv_max: float = checked(0.1, ">= 0")  # upper end of the uniform draw

    @dataclasses.dataclass
    class Geometry:
        enabled: bool = True
        # any: uniform angle | right: multiples of 90 deg | none
        rotation: str = checked("any", "one of any, right, none")
        flip: bool = True  # mirror with probability 1/2 (with rotation this covers both flip axes)
        scale_min: float = checked(0.95, "> 0")  # magnification drawn log-uniform in [scale_min, scale_max]
        scale_max: float = checked(1.1, "> 0")
        jitter: float = checked(4.0, ">= 0")  # max shift of the crop centre, cutout pixels per axis (uniform)
        interpolation: str = checked("bilinear", "one of bilinear, bicubic")
        cutout_size: int = checked(0, ">= 0")  # input H = W; 0: the survey's cutout size
        crop_size: int = checked(0, ">= 0")  # output H = W; 0: the survey's crop size

        ORDERED: typing.ClassVar = (("scale_min", "<=", "scale_max"),)  # cross-field rules (check_values)

    @dataclasses.dataclass
    class Psf:
        enabled: bool = True
        factor_min: float = checked(1.0, ">= 0")  # target PSF FWHM = factor x the image's own, factor ~ U[min, max]
        factor_max: float = checked(1.5, ">= 0")
        independent_bands: bool = False  # one factor per band instead of one per image

        ORDERED: typing.ClassVar = (("factor_min", "<=", "factor_max"),)  # cross-field rules (check_values)

    @dataclasses.dataclass
    class Noise:
        enabled: bool = True
        factor_min: float = checked(1.0, ">= 0")  # target sky sigma = factor x the image's own, factor ~ U[min, max]
        factor_max: float = checked(1.5, ">= 0")
        independent_bands: bool = True  # one factor per band instead of one per image

        ORDERED: typing.ClassVar = (("factor_min", "<=", "factor_max"),)  # cross-field rules (check_values)

    @dataclasses.dataclass
    class Normalize:
        # asinh: asinh(x / (k sigma_b)) | linear: (x - median_b) / sigma_b | none
        mode: str = checked("asinh", "one of asinh, linear, none")
        asinh_k: float = checked(1.0, "> 0")  # softening in units of the band's noise scale (Lupton et al. 1999: ~1.04)

    reddening: Reddening = dataclasses.field(default_factory=Reddening)
    geometry: Geometry = dataclasses.field(default_factory=Geometry)
    psf: Psf = dataclasses.field(default_factory=Psf)
    noise: Noise = dataclasses.field(default_factory=Noise)
    normalize: Normalize = dataclasses.field(default_factory=Normalize)


@dataclasses.dataclass
class DataConfig:
    """Packed shards the trainer reads (``ShardDataset``)."""

    path: str = ""  # packed folder (manifest.json + shard-*.h5) or one ssl-sky-surveys HDF5 file
    survey: str = ""  # sdss | decals; empty: from the manifest (needed for legacy files without one)
    # per rank; the global batch is batch_size x ranks
    batch_size: int = checked(256, ">= 2", why="in-batch contrast and BatchNorm need two images per rank")
    num_workers: int = checked(4, ">= 0")  # DataLoader workers per rank (persistent, pinned memory on GPU)
    # held-out (split=val) batches for the contrastive top-1 (votes: the vote NLL)
    val_batches: int = checked(10, ">= 1")
    # a method that learns from labels (votes, align) uses those of this seeded fraction of the labelled train
    # galaxies only: the subset eval-morph takes with the same label_fraction and seed (label-efficiency studies)
    label_fraction: float = checked(1.0, "in (0, 1]")
    label_seed: int = checked(0, ">= 0")


@dataclasses.dataclass
class OptimConfig:
    """SGD (or AdamW) with linear lr scaling, warm-up and cosine decay (schedules are functions of the step)."""

    # sgd (momentum, the methods' default) | adamw (betas 0.9, 0.98 as CLIP: transformers trained from scratch,
    # e.g. the text tower of method=align)
    name: str = checked("sgd", "one of sgd, adamw")
    base_lr: float = checked(0.03, "> 0")  # lr = base_lr x global_batch / reference_batch (Goyal et al. 2017)
    reference_batch: int = checked(256, ">= 1")
    momentum: float = checked(0.9, "in [0, 1)")  # sgd only
    weight_decay: float = checked(1e-4, ">= 0")
    total_steps: int = checked(200_000, "in [1, 1e12]")
    warmup_steps: int = checked(2_000, ">= 0")  # linear warm-up (pretrain warns when it outlasts total_steps)


def _default_vote_questions() -> list[VoteQuestionConfig]:
    """The GZ2-like tree of :data:`sslsky.data.votes.VOTE_TREE` (the mock's votes), as config."""
    from sslsky.vocabulary import VOTE_TREE

    return [VoteQuestionConfig(q.name, list(q.answers), list(q.parent or ())) for q in VOTE_TREE]


@dataclasses.dataclass
class VoteQuestionConfig:
    """One decision-tree question: its answers and the answer a volunteer must have chosen to be asked it."""

    name: str = ""
    answers: list[str] = dataclasses.field(default_factory=list)
    parent: list[str] = dataclasses.field(default_factory=list)  # [question, answer] leading here; []: asked of all


@dataclasses.dataclass
class VoteCampaignConfig:
    """One volunteer campaign (one decision tree); its counts are the catalog columns <prefix><question>_<answer>."""

    prefix: str = "votes_"  # must start with votes_ (pack keeps only those columns); one per campaign
    questions: list[VoteQuestionConfig] = dataclasses.field(default_factory=_default_vote_questions)


@dataclasses.dataclass
class VotesConfig:
    """Volunteer vote counts (method=hybrid or votes): the campaigns' trees and the weight of the hybrid's vote loss."""

    campaigns: list[VoteCampaignConfig] = dataclasses.field(default_factory=lambda: [VoteCampaignConfig()])
    # hybrid: w in L = L_BYOL + w (|L_BYOL| / L_votes).detach() L_votes (Walmsley et al. 2022)
    weight: float = checked(1.0, ">= 0")


@dataclasses.dataclass
class ResumeConfig:
    """What a restart may change in a run directory that already has checkpoints (``sslsky.train.rundir``)."""

    # config keys (or whole sections, e.g. augment) whose new values a resume accepts, e.g. [optim.total_steps];
    # each accepted change is recorded in run_dir/changes.jsonl. Keys that cannot alter the result (logging,
    # checkpoint frequency, workers, ...: sslsky.train.rundir.NEUTRAL_KEYS) never need to be named here.
    allow_changes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PretrainConfig:
    """``sslsky pretrain``: self-supervised pretraining on packed shards (DDP, resumable)."""

    # moco (MoCo v2) | byol (BYOL) | hybrid (BYOL + Dirichlet-multinomial vote loss) | votes (the vote loss alone,
    # the supervised baseline of Walmsley et al. 2022; trains on the galaxies with votes only) | simclr (SimCLR,
    # NT-Xent) | align (image-symbol-text alignment, GalaxAlign; model.align); the registry is sslsky.methods.METHODS
    method: str = "moco"
    run_dir: str = "runs/pretrain"  # checkpoints/, metrics.jsonl, config.yaml, encoder.pt; a restart resumes here
    seed: int = checked(0, ">= 0")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    votes: VotesConfig = dataclasses.field(default_factory=VotesConfig)  # method=hybrid or votes only
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    amp: str = "auto"  # auto (bf16 on GPU, none on CPU) | bf16 | fp16 | none
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU)
    compile: bool = False  # torch.compile the model
    log_every: int = checked(50, ">= 1")  # steps between metrics.jsonl records
    # steps between held-out checks (contrastive top-1; votes: vote NLL); 0: never
    val_every: int = checked(1000, ">= 0")
    # steps between checkpoints (and always at the end and on USR2/SIGTERM)
    checkpoint_every: int = checked(1000, ">= 1")
    keep_checkpoints: int = checked(2, ">= 1")  # newest checkpoints kept in run_dir/checkpoints
    tensorboard: bool = True  # also log to run_dir/tensorboard (rank 0)
    progress: bool = True  # progress on rank 0: a bar on a terminal, a line a minute in a log
    debug_step_sleep: float = checked(0.0, ">= 0")  # seconds to sleep after each step (tests of preemption and resume)
    resume: ResumeConfig = dataclasses.field(default_factory=ResumeConfig)  # a restart in a run_dir with checkpoints


@dataclasses.dataclass
class EvalDataConfig:
    """Packed shards for supervised evaluation: ShardDataset train (labelled subset) / val / test splits."""

    path: str = ""  # packed folder (manifest.json + shard-*.h5) or one ssl-sky-surveys HDF5 file
    survey: str = ""  # sdss | decals; empty: from the checkpoint, else the manifest
    batch_size: int = checked(64, ">= 2", why="BatchNorm in the encoder needs two rows")
    num_workers: int = checked(2, ">= 0")  # DataLoader workers (0: read in the main process)


@dataclasses.dataclass
class FinetuneOptimConfig:
    """AdamW with cosine decay over the epochs; early stopping on the val split (best epoch's weights kept)."""

    lr: float = checked(1e-3, "> 0")  # head lr; scratch trains the whole network at this lr
    #: finetune: pretrained encoder lr = lr x this. 1.0: at 0.1 fine-tuning lost to scratch from ~600 labels on
    #: the mock (README, "Label efficiency": 0.52 vs 0.68 morphology accuracy with 594 labels).
    encoder_lr_factor: float = checked(1.0, ">= 0")
    weight_decay: float = checked(1e-4, ">= 0")
    epochs: int = checked(30, ">= 1")  # at most this many passes over the labelled train rows (see min_steps)
    #: at least this many optimizer steps: a small label set gets more passes (59 labels in batches of 64 are one
    #: step a pass, so 30 epochs would be 30 steps); the cosine decays over the raised count
    min_steps: int = checked(100, ">= 0")
    # stop after this many epochs without a better val score (photo-z CRPS, morphology classes the error rate,
    # else the loss; with validation every k-th epoch each one without improvement counts k); 0: never, the
    # whole cosine runs and the best val epoch is kept. 0 by default: with a few one-step epochs, 5 epochs were 5
    # optimizer steps and fine-tuning stopped before it passed the probe in some seeds only (README)
    patience: int = checked(0, ">= 0")
    #: finetune: the encoder's BatchNorm layers stay in eval mode (pretraining running statistics, unchanged;
    #: their scale and shift still train). Off: with the encoder at 1x it rarely beat the probe (README).
    freeze_bn: bool = False
    #: finetune / scratch: before each validation the encoder's BatchNorm running statistics are re-estimated
    #: (precise BN) on up to 2048 train rows, un-augmented, with the epoch's weights. On: the running averages lag
    #: the weights with a few steps per epoch, the val loss spikes and early stopping kept the prior (README).
    precise_bn: bool = True
    #: finetune: per-block lr decay (Zoobot style): ResNet layer4 at the encoder lr, layer3 x this, ... stem x this^4.
    layer_decay: float = checked(1.0, "> 0")
    #: finetune, LP-FT (Kumar et al. 2022): first train the head alone on frozen features (the linear probe, for
    #: up to this many epochs with optim.patience), then fine-tune from it; 0: start from the prior.
    head_warmup_epochs: int = checked(30, ">= 0")
    #: true: a model that kept only the prior is written as metrics.json marked prior_only; false: exit status 4.
    allow_prior: bool = False


@dataclasses.dataclass
class HeadConfig:
    """Supervised head on the encoder features (``sslsky.models.heads.build_head``)."""

    kind: str = "linear"  # linear | mlp
    hidden: int = checked(512, ">= 1")  # MLP hidden width
    dropout: float = checked(0.0, "in [0, 1)")


@dataclasses.dataclass
class KnnConfig:
    """kNN classifier on frozen, L2-normalised features (morphology protocol ``knn``)."""

    k: int = checked(15, ">= 1")  # neighbours from the labelled train rows
    weighted: bool = False  # false: majority vote (ties -> larger summed cosine); true: votes exp(cos / 0.07)


@dataclasses.dataclass
class ClusterConfig:
    """k-means of frozen, L2-normalised test features scored against the classes (morphology protocol ``cluster``:
    NMI, ARI, Hungarian cluster accuracy; :mod:`sslsky.eval.clustering`)."""

    k: int = checked(0, ">= 0")  # clusters; 0: the number of classes
    n_init: int = checked(10, ">= 1")  # k-means++ restarts (the lowest inertia is kept)


@dataclasses.dataclass
class SupervisedEvalConfig:
    """Fields shared by ``eval-specz`` and ``eval-morph`` (``sslsky.eval.supervised``)."""

    ckpt: str = ""  # pretrained encoder (encoder.pt, step-*.pt, MoCo, ssl-sky-surveys); '' only for scratch
    protocol: str = "finetune"  # linear (frozen encoder) | finetune (whole net) | scratch (random init)
    # fraction of the labelled train rows used (nested subsets per seed)
    label_fraction: float = checked(1.0, "in (0, 1]")
    seed: int = checked(0, ">= 0")  # label subset, initialisation, data order, augmentation
    out: str = "runs/eval"  # metrics.json, config.yaml, predictions.h5, plots/
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig)
    optim: FinetuneOptimConfig = dataclasses.field(default_factory=FinetuneOptimConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    use_ebv: bool = False  # concatenate the catalog E(B-V) to the features (Pasquet et al. 2019)
    augment: bool = True  # finetune/scratch: random flips, rot90 and reddening of the training images
    ckpt_stem: str = ""  # stem of a foreign (MoCo, ssl-sky-surveys) checkpoint; empty: hayat
    arch: str = "resnet50"  # scratch without ckpt: resnet18 | resnet34 | resnet50 (with ckpt: the ckpt's)
    stem: str = "hayat"  # scratch without ckpt: hayat | imagenet
    crop_size: int = checked(0, ">= 0")  # scratch without ckpt: centred crop; 0: the survey's (64 SDSS, 96 DECaLS)
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    amp: str = "auto"  # auto (bf16 on GPU, none on CPU) | bf16 | none
    plots: bool = True
    progress: bool = True


@dataclasses.dataclass
class EvalSpeczConfig(SupervisedEvalConfig):
    """``eval_specz.py`` / ``sslsky eval-specz``: photo-z as classification over redshift bins."""

    out: str = "runs/eval_specz"
    use_ebv: bool = True
    n_bins: int = checked(180, ">= 1")  # redshift bins on [z_min, z_max) (Pasquet et al. 2019)
    z_min: float = checked(0.0, ">= 0")
    z_max: float = checked(0.4, "> 0")

    ORDERED: typing.ClassVar = (("z_min", "<", "z_max"),)  # cross-field rules (check_values)


@dataclasses.dataclass
class EvalMorphConfig(SupervisedEvalConfig):
    """``sslsky eval-morph``: morphology classes from the catalog's ``morph_class``, or vote fractions."""

    out: str = "runs/eval_morph"
    # protocol: also knn (frozen features, nearest labelled train galaxies), cluster (k-means of the test features)
    # and zeroshot (an align run's encoder.pt: nearest text / symbol class prototype; sslsky.eval.morphology)
    # class: the catalog's morph_class (cross-entropy) | votes: the volunteers' vote fractions of the votes.campaigns
    # trees (Dirichlet-multinomial; rows with at least one vote)
    target: str = "class"
    knn: KnnConfig = dataclasses.field(default_factory=KnnConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)  # protocol=cluster
    votes: VotesConfig = dataclasses.field(default_factory=VotesConfig)  # target=votes: the trees (weight unused)


@dataclasses.dataclass
class SweepSlurmConfig:
    """Resources of each array task on a SLURM cluster (no site defaults: set them for yours)."""

    partition: str = ""  # empty: the cluster's default partition
    gpus_per_task: int = checked(0, ">= 0")
    cpus_per_task: int = checked(4, ">= 1")
    mem_gb: float = checked(0.0, ">= 0")  # 0: the partition's default
    time_min: int = checked(120, ">= 1")  # per task; a task that times out is requeued and resumes
    array_parallelism: int = checked(64, ">= 1")  # tasks of the array running at once
    account: str = ""
    additional: dict = dataclasses.field(default_factory=dict)  # extra sbatch options, e.g. {constraint: gpu80}


@dataclasses.dataclass
class SweepConfig:
    """``sslsky sweep``: label-fraction study = task x protocol x label fraction x seed, as job arrays."""

    ckpt: str = ""  # the pretrained encoder (encoder.pt) the linear/finetune/knn protocols start from
    data_path: str = ""  # packed shards
    out: str = "runs/sweep"  # OUT/<task>/<protocol>/frac<f>/seed<s>/ per task, OUT/results.csv, OUT/*.png
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["specz", "morph"])  # of sweep.TASKS
    protocols: list[str] = dataclasses.field(default_factory=lambda: ["linear", "finetune", "scratch"])
    label_fractions: list[float] = checked(rule="in (0, 1]", factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])  # each
    seeds: list[int] = checked(rule=">= 0", factory=lambda: [0, 1, 2])  # each
    specz_config: str = "config/eval_specz.yaml"  # base config of each photo-z task
    morph_config: str = "config/eval_morph.yaml"  # base config of each morphology task
    overrides: list[str] = dataclasses.field(default_factory=list)  # key=value applied to every task config
    executor: str = checked("auto", "one of auto, slurm, local")  # auto: slurm when sbatch is found, else local
    wait: bool = True  # wait for the array and collect; false: submit, print the job id and return
    slurm: SweepSlurmConfig = dataclasses.field(default_factory=SweepSlurmConfig)


@dataclasses.dataclass
class EmbedConfig:
    """``sslsky embed``: L2-normalised encoder features of packed shards (one process, or torchrun/srun ranks)."""

    ckpt: str = ""  # encoder: sslsky encoder.pt or checkpoint, MoCo or ssl-sky-surveys checkpoint
    data: str = ""  # packed folder (manifest.json + shard-*.h5) or one HDF5 file
    out: str = "embeddings.h5"  # written to a temporary name, then renamed
    split: str = checked("", "one of '', train, val, test")  # empty: every row
    survey: str = ""  # sdss | decals, for checkpoints that do not say (crop size, normalisation)
    stem: str = ""  # stem of a foreign checkpoint; empty: hayat
    batch_size: int = checked(256, ">= 1")  # per rank
    num_workers: int = checked(4, ">= 0")  # DataLoader workers per rank
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    amp: str = "auto"  # auto (bf16 on GPU, none on CPU) | bf16 | fp16 | none
    channels_last: bool = True  # NHWC on GPU (no effect on CPU)
    progress: bool = True  # progress on rank 0: a bar on a terminal, a line a minute in a log
    # features: the encoder's L2-normalised features | aligned: an align run's shared image-text-symbol space,
    # normalize(embed_image(x)), which sslsky search --text / --symbol queries need
    space: str = checked("features", "one of features, aligned")


@dataclasses.dataclass
class SearchConfig:
    """``sslsky search``: exact chunked cosine top-k over an embeddings file, PNG grid, retrieval quality."""

    embeddings: str = ""  # file written by sslsky embed
    query: int | str | None = None  # object_id to find neighbours of (an integer, or a name for text ids)
    text: str = ""  # a caption to find galaxies for (the text tower; an embeddings file of space=aligned)
    symbol: str = ""  # a class name whose symbol prototype to find galaxies for (space=aligned)
    ckpt: str = ""  # the align encoder.pt for --text / --symbol / --evaluate; empty: the one the file was embedded with
    k: int = checked(10, ">= 1")  # neighbours (the query itself excluded)
    # database rows per block: memory ~ chunk_size x (F + queries) x 4 bytes, never N x N
    chunk_size: int = checked(65536, ">= 1")
    query_batch: int = checked(256, ">= 1")  # queries per block in the evaluation
    # read the embeddings into memory when they take at most this; else stream from disk
    cache_mb: float = checked(2048.0, ">= 0")
    # exact (chunked, default) | faiss (approximate HNSW; needs the optional faiss package)
    index: str = checked("exact", "one of exact, faiss")
    faiss_m: int = checked(32, ">= 2")  # HNSW graph degree
    faiss_ef_search: int = checked(128, ">= 1")  # HNSW search breadth (higher: better recall, slower)
    device: str = "cpu"  # cpu | cuda | auto: where the similarity blocks are computed
    data: str = ""  # shards for the PNG images; empty: the shards the embeddings came from
    png: str = ""  # write a grid of the query and its neighbours here
    grid_columns: int = checked(6, ">= 1")
    rgb_bands: str = ""  # bands shown as R, G, B; empty: irg for SDSS, zrg for DECaLS
    rgb_stretch: float = checked(0.5, "> 0")  # Lupton et al. 2004 asinh: linear range in nanomaggies
    rgb_q: float = checked(10.0, "> 0")  # asinh softening parameter Q
    evaluate: bool = False  # retrieval quality over all labelled rows against random neighbours
    eval_queries: int = checked(0, ">= 0")  # 0: every labelled row is a query; N: a seeded random sample of N
    eval_json: str = ""  # also write the evaluation as JSON here
    seed: int = checked(0, ">= 0")  # random neighbours (chance baseline) and the query sample
    progress: bool = False  # progress over the query blocks (a bar on a terminal, a line a minute in a log)


SCHEMAS: dict[str, type] = {"mock": MockConfig, "pack": PackConfig, "pretrain": PretrainConfig, "sweep": SweepConfig,
                           "eval-specz": EvalSpeczConfig, "eval-morph": EvalMorphConfig}
SCHEMAS.update({"embed": EmbedConfig, "search": SearchConfig})


# ---------------------------------------------------------------------------
# Loading and validation.
# ---------------------------------------------------------------------------


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} is not allowed")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(number)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # nan, .inf, 1e999: never a setting
            raise ConfigError(f"{where}={value}: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _refuse_moved(where: str, key: str) -> None:
    """ConfigError naming the new place of a key of :data:`LEGACY_MODEL_KEYS` (nothing for other keys)."""
    if where == "model" and key in LEGACY_MODEL_KEYS:
        moved = " or ".join(f"model.{new}" for new in LEGACY_MODEL_KEYS[key])
        raise ConfigError(f"config key 'model.{key}' is now {moved}: each method reads its own section "
                          f"(model.moco.*, model.byol.*, model.simclr.*)")


def _build(schema: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            _refuse_moved(where, key)
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown config key {name!r}{_closest(key, fields)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], name)
    return schema(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, schema: type) -> None:
    """Put ``value`` at ``a.b.c`` in a nested dict, checking each part against ``schema``."""
    parts = dotted.split(".")
    node, tp = tree, schema
    for i, part in enumerate(parts):
        valid = {f.name for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else None
        if valid is not None and part not in valid:
            prefix = ".".join(parts[:i])
            name = f"{prefix}.{part}" if prefix else part
            _refuse_moved(prefix, part)
            raise ConfigError(f"unknown config key {name!r} in override {dotted}=...{_closest(part, valid)}")
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(tp)[part] if valid is not None else Any
        node = node.setdefault(part, {})
        if not isinstance(node, dict) or (valid is not None and not _is_mapping_type(tp)):
            here = ".".join(parts[: i + 1])
            rest = ".".join(parts[i + 1:])
            hint = f"; did you mean {rest}=...?" if rest in valid else ""
            raise ConfigError(f"override {dotted!r}: {here} is a single value here, not a section with keys{hint}")


def _is_mapping_type(tp: Any) -> bool:
    """Whether a field of annotation ``tp`` holds keys an override can reach into (a section or a dict)."""
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is dict or tp is Any


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                **values: Any) -> T:
    """Defaults of ``schema``, then the YAML file, then ``values``, then dotted overrides."""
    tree: dict = {}
    if path:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a folder: name the YAML file in it")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not a text (UTF-8) file; is it the YAML config?") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not {type(loaded).__name__}")
        tree.update(loaded)
    for key, value in values.items():
        if value is not None:
            _set_dotted(tree, key, value, schema)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, schema)
    try:
        return _checked(_build(schema, tree, ""))
    except ConfigError as err:
        if path:
            raise ConfigError(f"{err} (in {path} or the overrides)") from None
        raise


def config_from_dict(schema: type[T], data: dict, where: str = "") -> T:
    """A config from a plain dict (e.g. one saved in a checkpoint), validated like a file."""
    return _checked(_build(schema, data, where), where)


def _checked(cfg: T, where: str = "") -> T:
    """``cfg`` if every value is allowed (:func:`check_values`), else one ConfigError listing each problem."""
    problems = check_values(cfg, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """A plain dict (YAML/JSON-ready) of a config dataclass."""
    return dataclasses.asdict(cfg)


def write_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temp name, then rename)."""
    return write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
