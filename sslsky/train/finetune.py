"""One supervised loop for the photo-z and morphology evaluations: linear probe, fine-tuning, from scratch.

Protocols (``cfg.protocol``):

- ``linear``: the pretrained encoder is frozen (eval mode, so BatchNorm uses its running statistics);
  features of the train / val / test rows are computed once, then only the head is trained.
- ``finetune``: the whole network is trained from the pretrained weights, LP-FT style (Kumar et al. 2022) by
  default: with ``optim.head_warmup_epochs`` > 0, epochs 1..P first train the head alone on frozen features
  (the linear probe, batch for batch what ``protocol=linear`` does, early-stopped with ``optim.patience``),
  and fine-tuning starts from the best probe head, so early stopping never keeps anything worse on val than
  the linear probe. The head's lr is ``optim.lr``; encoder block d (0 = ResNet ``layer4``, 1 = ``layer3``,
  ..., 4 = the stem; :func:`encoder_blocks`) trains at ``optim.lr x optim.encoder_lr_factor x
  optim.layer_decay ** d`` (:func:`optimizer_groups`). With ``optim.freeze_bn`` the encoder's BatchNorm layers
  stay in eval mode: they normalise with the pretraining running statistics, which never change (their scale
  and shift still train), so train, val and test see one normalisation.
- ``scratch``: the same network with random initialisation (the supervised baseline), all at ``optim.lr``.
  Architecture, stem, bands and input transform come from ``cfg.ckpt`` when one is given (so scratch and
  finetune see identical inputs), else from ``cfg.arch`` / ``cfg.stem`` / ``cfg.crop_size`` and the manifest.
- finetune and scratch, ``optim.precise_bn`` (default on, unless ``freeze_bn``): before each validation the
  encoder's BatchNorm running statistics are re-estimated with the epoch's weights over up to ``STATS_ROWS``
  un-augmented train rows (:func:`recalibrate_batchnorm`). With a few hundred labels an epoch is a few steps,
  the momentum-0.1 running averages still hold the pretraining statistics, and the eval-mode val loss of
  good weights spiked (5.4 against 1.6 with batch statistics) until early stopping kept the prior (README,
  "Fine-tuning on few labels").

Data: ``ShardDataset`` splits. Train = the labelled train rows thinned to ``cfg.label_fraction`` (seeded by
``cfg.seed``, nested across fractions); val and test = all labelled rows of those splits. Val only picks the
epoch: early stopping on the task's val score (``Task.val_score``: mean CRPS for photo-z, otherwise the val
loss) with ``optim.patience``; the best epoch's weights are kept. Epoch 0 is the untrained head, which
starts at the train class frequencies (:func:`sslsky.models.heads.init_prior`; a task with its own loss:
``Task.init_head``, e.g. the train-mean vote fractions), so with few labels a model that only overfits comes
back as the prior rather than something worse -- and the prior is no result: when the kept epoch is 0 (or, for
a task with ``Task.one_class_is_prior``, the kept model gives every val galaxy one class),
``SupervisedRun.prior_only`` says why and the eval commands refuse it (:func:`refuse_prior_only`: a message,
``OUT/metrics.prior_only.json`` with the history, no metrics.json, exit status 4; ``optim.allow_prior=true``
writes it as metrics.json marked ``prior_only``). History records carry ``stage``: ``prior`` (epoch 0),
``probe`` (LP-FT) or ``train``; ``best_epoch`` and ``epochs_run`` count all of them.

Inputs: the centred crop and flux normalisation the encoder was pretrained with (``load_encoder``'s
transform). With ``cfg.augment`` (finetune / scratch) training crops get a random flip + 90-degree rotation
(exact, no resampling) and Galactic reddening (de-redden with the catalog E(B-V), re-redden with one drawn
from the footprint distribution). With ``cfg.use_ebv`` the E(B-V) is concatenated to the features (Pasquet
et al. 2019); under the reddening augmentation that input is the drawn E(B-V), the one the image now shows.

Head: :func:`sslsky.models.heads.build_head` (linear or MLP) behind a fixed standardisation of its inputs
(statistics of the train features: exact for linear and LP-FT; otherwise from up to ``STATS_ROWS`` train rows
through the initial encoder with BatchNorm as training uses it, batch statistics unless frozen); loss:
cross-entropy over the task's classes (redshift bins for photo-z), or the task's own per-galaxy ``Task.loss``
averaged over the batch (vote counts: Dirichlet-multinomial NLL; see :mod:`sslsky.eval.morphology`).
Optimiser: AdamW (``optim.weight_decay``), cosine decay over ``optim.epochs``. Seeded (init, label subset,
data order, augmentation); bf16 autocast on GPU (``cfg.amp``).

Resume: after every epoch the training state goes atomically to ``OUT/train_state.pt``; a task started again
with the same config and checkpoint (SHA-256) continues from there (a SLURM requeue loses at most one epoch;
the LP-FT probe, seconds on precomputed features, is not checkpointed: a task stopped during it runs it again).
Schedules are functions of the epoch (the fine-tuning cosine of epoch - P). The file is removed when the task
finishes.

Helpers for the task modules: :func:`finished_metrics` (the idempotence check, also used by the sweep to find
stale cells), :func:`checkpoint_sha256` (cached per file version) and :func:`write_json`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sslsky.augment import Reddening, survey_of_images
from sslsky.config import ConfigError, SupervisedEvalConfig, check_values, config_to_dict, write_config
from sslsky.data.shards import ShardDataset
from sslsky.eval.encoders import CheckpointError, EvalTransform, eval_transform, load_encoder
from sslsky.models.encoders import ARCHITECTURES, STEMS, build_encoder
from sslsky.models.heads import HEADS, build_head, init_prior
from sslsky.outputs import output_dir, write_text_atomic
from sslsky.surveys import Survey
from sslsky.train.checkpoint import load_checkpoint, save_checkpoint
from sslsky.train.schedules import warmup_cosine

PROTOCOLS = ("linear", "finetune", "scratch")
TRAIN_STATE = "train_state.pt"
METRICS_FILE = "metrics.json"
#: What a task that kept only the prior leaves instead of metrics.json (history and config, no test metrics).
PRIOR_ONLY_FILE = "metrics.prior_only.json"
#: Config keys that do not change a result: a finished task with other values here is not run again.
RUNTIME_KEYS = ("progress", "data.num_workers")
#: Train rows whose features set the head's input standardisation (finetune / scratch).
STATS_ROWS = 2048
#: The head starts at the train class frequencies mixed with this much of a uniform distribution.
PRIOR_FLOOR = 0.01


# ---------------------------------------------------------------------------
# Idempotence and outputs.
# ---------------------------------------------------------------------------


def _comparable(config: dict) -> dict:
    config = copy.deepcopy(config)
    for dotted in RUNTIME_KEYS:
        node, *rest = dotted.split(".")
        if rest:
            config.get(node, {}).pop(rest[0], None)
        else:
            config.pop(node, None)
    return config


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (the checkpoint's identity: the same path may hold a retrained encoder)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, cached per file version (path, inode, size, mtime): a sweep checking 100 cells
    against one checkpoint hashes it once, and a checkpoint rewritten in place is hashed again."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _sha256_of_version(path, st.st_ino, st.st_size, st.st_mtime_ns)


def finished_metrics(out: str | os.PathLike, cfg, verbose: bool = True) -> dict | None:
    """The metrics of a finished task in ``out`` with the same resolved config (and checkpoint bytes), else None.

    ``verbose``: say why existing metrics are not used (the sweep counts them instead).
    """
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if _comparable(metrics.get("config") or {}) != _comparable(config_to_dict(cfg)):
        if verbose:
            print(f"eval: {path} was made with another config; running again", flush=True)
        return None
    if cfg.ckpt and (not Path(cfg.ckpt).is_file() or metrics.get("ckpt_sha256") != checkpoint_sha256(cfg.ckpt)):
        if verbose:
            print(f"eval: {path} was made from another {cfg.ckpt}; running again", flush=True)
        return None
    return metrics


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON atomically (temp name, then rename); NaN/inf become null."""
    return write_text_atomic(path, json.dumps(_json_ready(obj), indent=2) + "\n", "results")


# ---------------------------------------------------------------------------
# Set-up: device, data, encoder.
# ---------------------------------------------------------------------------


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` (cuda where a GPU is visible, else cpu), ``cpu``, ``cuda`` or ``cuda:N``; a ConfigError naming
    ``key`` and the choices for anything else, or for cuda where no GPU is visible (pretrain uses it too)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={name!r}: choose auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available here; use {key}=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name} but only {torch.cuda.device_count()} GPU(s) are visible here "
                          f"(cuda:0 ...); use {key}=cuda or auto")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp not in ("bf16", "none"):
        raise ConfigError(f"amp={amp!r}: choose auto, bf16 or none")
    return torch.bfloat16 if amp == "bf16" else None


def check_config(cfg: SupervisedEvalConfig, protocols=PROTOCOLS) -> None:
    """Errors a user can fix, before anything is loaded or written. Value ranges (label_fraction, batch size,
    epochs, lr, ...) are the schema's (:func:`sslsky.config.check_values`: already enforced for a loaded config,
    checked here again for one built in code); this adds what depends on the command and the files."""
    problems = check_values(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.protocol not in protocols:
        raise ConfigError(f"protocol={cfg.protocol!r}: choose one of {', '.join(protocols)}")
    if not cfg.ckpt and cfg.protocol != "scratch":
        raise ConfigError(f"protocol={cfg.protocol} needs a pretrained encoder: set ckpt=PATH (e.g. "
                          f"runs/pretrain/encoder.pt); only protocol=scratch runs without one")
    if cfg.ckpt and Path(cfg.ckpt).is_dir():
        raise ConfigError(f"ckpt={cfg.ckpt!r} is a folder: give the checkpoint file in it (e.g. encoder.pt)")
    if cfg.ckpt and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"ckpt={cfg.ckpt!r} does not exist")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a packed folder (sslsky pack --out ...)")
    if not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path!r} does not exist")
    if cfg.head.kind not in HEADS:
        raise ConfigError(f"head.kind={cfg.head.kind!r}: choose one of {', '.join(HEADS)}")
    if not cfg.ckpt and cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"arch={cfg.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if not cfg.ckpt and cfg.stem not in STEMS:
        raise ConfigError(f"stem={cfg.stem!r}: choose one of {', '.join(STEMS)}")
    autocast_dtype(cfg.amp, resolve_device(cfg.device))


@dataclass
class Splits:
    """Train (labelled subset), val and test rows of the packed data for one label."""

    train: ShardDataset
    val: ShardDataset
    test: ShardDataset

    @property
    def attrs(self) -> dict:
        return self.train.attrs


def open_splits(cfg: SupervisedEvalConfig, label: str, vote_columns: typing.Sequence[str] | None = None) -> Splits:
    """The labelled rows of the three splits; ``label="votes"``: rows with a vote in ``vote_columns`` (their order)."""
    extra = {} if vote_columns is None else {"vote_columns": list(vote_columns)}
    try:
        train = ShardDataset(cfg.data.path, split="train", label=label, label_fraction=cfg.label_fraction,
                             seed=cfg.seed, **extra)
        val = ShardDataset(cfg.data.path, split="val", label=label, **extra)
        test = ShardDataset(cfg.data.path, split="test", label=label, **extra)
    except (FileNotFoundError, KeyError, ValueError) as err:  # ValueError: no labelled train row to subset
        raise ConfigError(f"data.path={cfg.data.path!r} (label {label!r}): {err}") from None
    if len(train) == 0:
        raise ConfigError(f"{cfg.data.path}: the train split has no rows labelled {label!r}")
    if len(test) == 0:
        raise ConfigError(f"{cfg.data.path}: the test split has no rows labelled {label!r}; nothing to score")
    return Splits(train, val, test)


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


def data_survey(cfg: SupervisedEvalConfig, attrs: dict, ckpt_survey: str | None = None) -> Survey:
    """The imaging of the data (:func:`survey_of_images`: the survey from config, manifest, then checkpoint, with
    the pack's sizes); colour-image packs need no survey."""
    name = cfg.data.survey or attrs.get("survey") or ckpt_survey or ""
    try:
        survey = survey_of_images(attrs, name)
    except ValueError as err:  # an unknown survey name
        raise ConfigError(f"data.survey: {err}") from None
    if survey is None:
        raise ConfigError(f"the data in {cfg.data.path!r} do not say their survey (legacy HDF5?); "
                          f"set data.survey=sdss or data.survey=decals")
    return survey


def build_backbone(cfg: SupervisedEvalConfig, attrs: dict, device: torch.device) -> Backbone:
    """The pretrained encoder of ``cfg.ckpt`` (re-initialised for scratch), or a fresh one from the config."""
    n_bands = len(attrs.get("bands") or "") or None
    if cfg.ckpt:
        try:
            loaded = load_encoder(cfg.ckpt, stem=cfg.ckpt_stem or None, device="cpu", survey=data_survey(cfg, attrs))
        except CheckpointError as err:
            raise ConfigError(f"ckpt: {err}") from None
        if n_bands is not None and loaded.in_channels != n_bands:
            raise ConfigError(f"ckpt {cfg.ckpt} takes {loaded.in_channels} bands but the data in {cfg.data.path} "
                              f"have {n_bands} ({attrs.get('bands')})")
        encoder, source = loaded.encoder, loaded.source
        if cfg.protocol == "scratch":  # same network and inputs, random weights
            encoder, source = build_encoder(loaded.arch, loaded.in_channels, loaded.stem), "random"
        survey = data_survey(cfg, attrs, loaded.info.get("survey"))
        return Backbone(encoder.to(device), loaded.transform.to(device), loaded.arch, loaded.stem,
                        loaded.in_channels, loaded.feature_dim, source, survey)
    survey = data_survey(cfg, attrs)
    in_channels = n_bands or survey.n_bands
    encoder = build_encoder(cfg.arch, in_channels, cfg.stem)
    info = {"stats": attrs.get("stats") or {}, "augment": {"geometry": {"crop_size": cfg.crop_size}}}
    try:
        transform = eval_transform(info, survey, in_channels, Path(cfg.data.path))
    except ValueError as err:  # a crop that does not fit the cutouts
        raise ConfigError(f"{err}: set crop_size to at most the cutout size (0: the survey's crop)") from None
    return Backbone(encoder.to(device), transform.to(device), cfg.arch, cfg.stem, in_channels,
                    int(encoder.feature_dim), "random", survey)


# ---------------------------------------------------------------------------
# Model, augmentation, batches.
# ---------------------------------------------------------------------------


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


class LightAugment(nn.Module):
    """Training-time views for fine-tuning: random flip + rot90 (exact), then Galactic reddening.

    ``forward(crops (B, C, n, n) fluxes, ebv (B,)) -> (crops, ebv_shown (B,))``: ebv_shown is the drawn
    E(B-V) the crop now shows (the catalog one when reddening is off). A crop whose catalog E(B-V) is NaN
    cannot be de-reddened and is left as it is (``use_ebv`` refuses such rows).
    """

    def __init__(self, extinction: tuple[float, ...] | None):
        super().__init__()
        self.reddening = Reddening(extinction) if extinction is not None else None

    def forward(self, x: Tensor, ebv: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        draws = torch.randint(0, 8, (b,), device=x.device, generator=generator)  # the 8 symmetries of a square
        out = x.clone()
        for code in range(8):
            sel = draws == code
            if sel.any():
                view = torch.rot90(x[sel], k=code % 4, dims=(-2, -1))
                out[sel] = view.flip(-1) if code >= 4 else view
        if self.reddening is None:
            return out, ebv
        params = self.reddening.sample_params(b, x.device, generator)
        known = torch.isfinite(ebv)
        catalog = torch.where(known, ebv, params["ebv"].to(ebv.dtype))  # unknown E(B-V): left as it is
        out = self.reddening.apply(out, catalog, params)
        return out, params["ebv"].to(ebv.dtype)


@dataclass
class Task:
    """What is predicted: a ShardDataset label column mapped to class indices (or, with ``loss``, other targets).

    The default is classification: cross-entropy, the head starting at the train class prior, softmax outputs.
    A task with its own ``loss`` (e.g. vote counts under a Dirichlet-multinomial) gives per-galaxy losses of the
    raw head outputs and float targets; its head keeps PyTorch's initialisation and ``output`` maps the head
    outputs to what :meth:`SupervisedRun.predict_test` returns.
    """

    name: str  # photoz | morphology | vote fractions (messages)
    label: str  # ShardDataset label: z | morph_class | votes
    n_outputs: int  # classes (redshift bins; vote-count columns)
    to_target: Callable[[np.ndarray], np.ndarray]  # (N,) label values -> (N,) int64 class index (or (N, A) targets)
    #: Early-stopping score on the val split, lower is better: (probs (N, K), label values (N,)) -> float;
    #: None: the val loss.
    val_score: Callable[[np.ndarray, np.ndarray], float] | None = None
    val_score_name: str = "val_loss"
    #: (head outputs (B, K) float32, targets) -> (B,) per-galaxy loss; None: cross-entropy over the classes.
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    #: (head outputs (B, K) float64) -> (B, K) predictions; None: the softmax. Returned as ``output_name``.
    output: Callable[[Tensor], Tensor] | None = None
    output_name: str = "probs"
    target_dtype: type = np.int64
    vote_columns: tuple[str, ...] | None = None  # label "votes": the count columns, in this order
    #: (head, train label values) -> None: the starting point of a head with its own ``loss`` (e.g. the train
    #: mean vote fractions); None: PyTorch's initialisation. Classification always starts at the class prior.
    init_head: Callable[[nn.Sequential, np.ndarray], None] | None = None
    #: Classification: a kept model that gives every val galaxy the same class (with two or more classes in val)
    #: is no result either (the majority class), like the prior (:attr:`SupervisedRun.prior_only`).
    one_class_is_prior: bool = False

    @property
    def classification(self) -> bool:
        return self.loss is None

    def outputs(self, logits: Tensor) -> Tensor:
        """(B, K) head outputs -> (B, K) float64 predictions (class probabilities by default)."""
        return torch.softmax(logits.double(), dim=1) if self.output is None else self.output(logits.double())


def label_values(dataset: ShardDataset, label: str) -> np.ndarray:
    """The ``label`` column of the dataset's rows in order: (N,), or (N, A) vote counts for ``votes``."""
    if label == "votes":
        return dataset.vote_counts[dataset.indices]
    return dataset.index.columns[label][dataset.indices]


def usable_cpus() -> int:
    """CPUs this process may run on (the SLURM allocation, not the node), for capping loader workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _loader(dataset: Dataset, cfg: SupervisedEvalConfig, device: torch.device, *, train: bool,
            sampler=None) -> DataLoader:
    """Training (``train``): full batches only (BatchNorm needs two rows), batch <= the rows there are."""
    batch = min(cfg.data.batch_size, len(dataset)) if train else cfg.data.batch_size
    workers = min(cfg.data.num_workers, usable_cpus())
    return DataLoader(dataset, batch_size=max(1, batch), sampler=sampler, shuffle=False, drop_last=train,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=sampler is not None and workers > 0, generator=torch.Generator())


def _sample(dataset: ShardDataset, n: int) -> Dataset:
    """At most ``n`` rows of ``dataset``, evenly spread."""
    if len(dataset) <= n:
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).astype(np.int64).tolist())


@torch.no_grad()
def extract_features(encoder: nn.Module, transform: nn.Module, dataset: Dataset, cfg: SupervisedEvalConfig,
                     device: torch.device, amp: torch.dtype | None = None,
                     bn_train: bool = False) -> dict[str, np.ndarray]:
    """Features of every row of ``dataset``: ``features`` (N, D) float32 and the rows' ``object_id``, ``z``,
    ``ebv``, ``morph_class`` (N,), and ``votes`` (N, A) when the dataset's items carry vote counts.

    The encoder runs in eval mode (frozen features), or with ``bn_train`` in train mode -- BatchNorm on
    batch statistics, as training sees it -- with its running statistics put back afterwards.
    """
    saved = copy.deepcopy(encoder.state_dict()) if bn_train else None
    encoder.train(bn_train)
    parts: dict[str, list] = {"features": [], "object_id": [], "z": [], "ebv": [], "morph_class": []}
    for batch in _loader(dataset, cfg, device, train=bn_train):
        x = transform(batch["image"].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            parts["features"].append(encoder(x).float().cpu().numpy())
        for name in ("object_id", "z", "ebv", "morph_class"):  # text ids come as a list of str
            parts[name].append(np.asarray(batch[name]) if isinstance(batch[name], list) else batch[name].numpy())
        if "votes" in batch:
            parts.setdefault("votes", []).append(batch["votes"].numpy())
    if saved is not None:
        encoder.load_state_dict(saved)
    encoder.eval()
    if not parts["features"]:
        return {"features": np.zeros((0, 0), np.float32), **{k: np.zeros(0) for k in parts if k != "features"}}
    return {name: np.concatenate(values) for name, values in parts.items()}


class FeatureBatches:
    """Mini-batches of precomputed features (linear protocol): ``(features, ebv, target)`` on the device."""

    def __init__(self, features: np.ndarray, ebv: np.ndarray, target: np.ndarray, device: torch.device,
                 target_dtype: type = np.int64):
        self.x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
        self.ebv = torch.from_numpy(np.asarray(ebv, dtype=np.float32)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(target, dtype=target_dtype)).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, epoch: int | None = None, seed: int = 0) -> Iterator[tuple[Tensor, ...]]:
        """Shuffled full batches when ``epoch`` is given (training), else all rows in order."""
        n = len(self.y)
        if epoch is None:
            for i in range(0, n, batch_size):
                yield self.x[i:i + batch_size], self.ebv[i:i + batch_size], self.y[i:i + batch_size]
            return
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).to(self.y.device)
        size = min(batch_size, n)
        for i in range(0, n - size + 1, size):
            idx = order[i:i + size]
            yield self.x[idx], self.ebv[idx], self.y[idx]


class ImageBatches:
    """Mini-batches of cutouts from shards: ``(normalised crops, ebv, target)`` on the device."""

    def __init__(self, dataset: ShardDataset, task: Task, transform: EvalTransform, cfg: SupervisedEvalConfig,
                 device: torch.device, train: bool, augment: LightAugment | None = None):
        self.dataset, self.task, self.transform, self.device = dataset, task, transform, device
        self.augment = augment
        self.sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed) \
            if train else None
        self.loader = _loader(dataset, cfg, device, train=train, sampler=self.sampler)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, epoch: int | None = None, generator: torch.Generator | None = None):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch or 0)  # the order depends on (seed, epoch) only
        for batch in self.loader:
            images = batch["image"].to(self.device, non_blocking=True)
            ebv = batch["ebv"].to(self.device, dtype=torch.float32)
            y = torch.from_numpy(self.task.to_target(batch[self.task.label].numpy())).to(self.device)
            if self.augment is not None and generator is not None:
                crops = self.transform.crop(images)
                crops, ebv = self.augment(crops.float(), ebv, generator)
                x = self.transform.normalize(crops)
            else:
                x = self.transform(images)
            yield x, ebv, y


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


@dataclass
class SupervisedRun:
    """A trained predictor (best val epoch) and what it needs to predict a split."""

    model: Predictor
    backbone: Backbone
    task: Task
    splits: Splits
    cfg: SupervisedEvalConfig
    device: torch.device
    amp: torch.dtype | None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 0: the prior (no epoch improved the val loss); LP-FT: 1..probe_epochs the probe
    epochs_run: int = 0  # epochs trained, LP-FT probe epochs included
    train_time_s: float = 0.0
    test_features: dict | None = None  # linear protocol: precomputed
    probe_epochs: int = 0  # LP-FT: epochs of the linear probe before fine-tuning (history stage "probe")
    #: Why the kept model is only the prior (no epoch beat the untrained head on val, or it gives every val galaxy
    #: one class); empty when it is a result. The eval commands refuse it (:func:`refuse_prior_only`).
    prior_only: str = ""

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    @torch.no_grad()
    def predict_test(self) -> dict[str, np.ndarray]:
        """``probs`` (N, K) float64 (the task's ``output_name``) and the rows' ``object_id``, ``z``, ``ebv``,
        ``morph_class`` (and the task's label column, e.g. ``votes`` (N, A)) for the test split."""
        self.model.eval()
        names = ("object_id", "z", "ebv", "morph_class")
        if self.test_features is not None:
            cols = self.test_features
            batches = FeatureBatches(cols["features"], cols["ebv"], np.zeros(len(cols["ebv"]), np.int64),
                                     self.device).batches(self.cfg.data.batch_size)
            rows = {k: cols[k] for k in (*names, self.task.label)}
        else:
            ds = self.splits.test
            idx = ds.indices
            rows = {k: ds.index.columns[k][idx] for k in names}
            rows[self.task.label] = label_values(ds, self.task.label)
            stream = ImageBatches(ds, self.task, self.backbone.transform, self.cfg, self.device, train=False)
            batches = stream.batches()
        probs = []
        for x, ebv, _ in batches:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.model(x, ebv)
            probs.append(self.task.outputs(logits).cpu().numpy())
        return {self.task.output_name: np.concatenate(probs), **rows}


def _check_ebv(cfg: SupervisedEvalConfig, splits: Splits) -> None:
    if not cfg.use_ebv:
        return
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        ebv = ds.index.columns["ebv"][ds.indices]
        bad = np.flatnonzero(~np.isfinite(ebv))
        if bad.size:
            ids = ds.index.columns["object_id"][ds.indices[bad[:5]]].tolist()
            raise ConfigError(f"use_ebv=true but {bad.size} {name} rows have no catalog E(B-V) (object_id {ids}); "
                              f"add the ebv column and pack again, or set use_ebv=false")


def _validate(model: Predictor, batches, task: Task, values: np.ndarray, amp: torch.dtype | None,
              device: torch.device) -> dict[str, float]:
    """Val loss (mean per galaxy) and the task's early-stopping score; ``values`` the val labels in batch order."""
    model.eval()
    total, probs, predicted = 0.0, [], set()
    with torch.no_grad():
        for x, ebv, y in batches:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x, ebv).float()
            if task.classification:
                total += F.cross_entropy(logits, y, reduction="sum").item()
                predicted.update(logits.argmax(dim=1).unique().tolist())
            else:
                total += task.loss(logits, y).sum().item()
            if task.val_score is not None:
                probs.append(task.outputs(logits).cpu().numpy())
    out = {"val_loss": total / len(values)}
    if task.val_score is not None:
        out[task.val_score_name] = float(task.val_score(np.concatenate(probs), values))
    if task.classification:
        out["val_classes_predicted"] = len(predicted)  # 1: every val galaxy gets the same class
    return out


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``module`` in eval mode: it normalises with its running statistics and leaves
    them unchanged (its affine scale and shift still train). Call after ``module.train()``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, transform: nn.Module, dataset: Dataset, cfg: SupervisedEvalConfig,
                          device: torch.device, amp: torch.dtype | None = None) -> None:
    """Precise BatchNorm (Wu & Johnson 2021): the running statistics of every BatchNorm layer of ``encoder`` become
    the plain average of the batch statistics over ``dataset`` (un-augmented crops, full training batches) under
    the current weights. The encoder is left in eval mode."""
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    encoder.train()
    for batch in _loader(dataset, cfg, device, train=True):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            encoder(transform(batch["image"].to(device, non_blocking=True)))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    encoder.eval()


def encoder_blocks(encoder: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The encoder's parameters by block, top (next to the head) first: a ResNet's ``layer4``, ``layer3``,
    ``layer2``, ``layer1``, then ``stem`` (everything else: conv1, bn1); another encoder is one block."""
    layers = [name for name in ("layer4", "layer3", "layer2", "layer1") if isinstance(getattr(encoder, name, None),
                                                                                     nn.Module)]
    if not layers:
        return [("encoder", list(encoder.parameters()))]
    blocks = [(name, list(getattr(encoder, name).parameters())) for name in layers]
    seen = {id(p) for _, params in blocks for p in params}
    stem = [p for p in encoder.parameters() if id(p) not in seen]
    return blocks + ([("stem", stem)] if stem else [])


def optimizer_groups(cfg: SupervisedEvalConfig, head: nn.Module, encoder: nn.Module | None) -> list[dict]:
    """AdamW parameter groups, each with ``name`` and ``lr_scale`` (its lr = the scheduled ``optim.lr`` x this).

    head: 1. finetune: encoder block at depth d (0 = top, :func:`encoder_blocks`) ``optim.encoder_lr_factor x
    optim.layer_decay ** d``. scratch: every block 1. linear (``encoder`` None): the head only.
    """
    groups = [{"name": "head", "params": list(head.parameters()), "lr_scale": 1.0}]
    if encoder is None:
        return groups
    finetune = cfg.protocol == "finetune"
    factor = cfg.optim.encoder_lr_factor if finetune else 1.0
    decay = cfg.optim.layer_decay if finetune else 1.0
    for depth, (name, params) in enumerate(encoder_blocks(encoder)):
        if params:
            groups.append({"name": f"encoder.{name}", "params": params, "lr_scale": factor * decay ** depth})
    return groups


def _probe_head(cfg: SupervisedEvalConfig, task: Task, head: nn.Module, feats: dict, val_feats: dict | None,
                val_values: np.ndarray, monitor: str, best: dict, model: Predictor, device: torch.device,
                amp: torch.dtype | None) -> tuple[list[dict], dict, int]:
    """LP-FT's first stage: the head alone on frozen features, exactly as ``protocol=linear`` trains it (same
    batches, schedule over ``optim.head_warmup_epochs``, early stopping with ``optim.patience``).

    ``best`` (score, epoch, state) is the prior's; an improving probe epoch replaces it with ``model``'s state.
    The head is left at the best probe epoch. Returns (history records, best, probe epochs run).
    """
    bs, n_epochs = cfg.data.batch_size, cfg.optim.head_warmup_epochs
    probe = Predictor(nn.Identity(), head, cfg.use_ebv)  # shares ``head`` with ``model``
    train = FeatureBatches(feats["features"], feats["ebv"], task.to_target(feats[task.label]), device,
                           task.target_dtype)
    val = FeatureBatches(val_feats["features"], val_feats["ebv"], task.to_target(val_feats[task.label]), device,
                         task.target_dtype) if val_feats is not None else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = max(1, len(train) // min(bs, len(train)))
    records, bad, epoch = [], 0, 0
    head_best = copy.deepcopy(head.state_dict())
    while epoch < n_epochs:
        probe.train()
        losses = []
        for i, (x, ebv, y) in enumerate(train.batches(bs, epoch=epoch, seed=cfg.seed)):
            lr = warmup_cosine(epoch * steps_per_epoch + i, cfg.optim.lr, n_epochs * steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss(task, probe(x, ebv).float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{task.name} {cfg.protocol} (linear-probe stage): loss is {loss.item()} "
                                         f"at probe epoch {epoch}; lower optim.lr (now {cfg.optim.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch += 1
        record = {"epoch": epoch, "stage": "probe", "train_loss": float(np.mean(losses)), "lr": lr}
        if val is not None:
            record.update(_validate(probe, val.batches(bs), task, val_values, amp, device))
            if record[monitor] < best["score"]:
                head_best = copy.deepcopy(head.state_dict())
                best = {"score": record[monitor], "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad = 0
            else:
                bad += 1
        else:
            head_best = copy.deepcopy(head.state_dict())
        records.append(record)
        print(f"eval: probe epoch {epoch}/{n_epochs} " +
              " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("train", "val"))), flush=True)
        if val is not None and cfg.optim.patience > 0 and bad >= cfg.optim.patience:
            break
    head.load_state_dict(head_best)
    return records, best, epoch


def _loss(task: Task, logits: Tensor, y: Tensor) -> Tensor:
    """Mean training loss of a batch: cross-entropy, or the task's own per-galaxy loss."""
    return F.cross_entropy(logits, y) if task.classification else task.loss(logits, y).mean()


def train_supervised(cfg: SupervisedEvalConfig, task: Task) -> SupervisedRun:
    """Train the head (linear) or the whole network (finetune / scratch) as configured; see the module doc.

    ``cfg.out/config.yaml`` is written once the data and the encoder are open, before training: a task that
    fails on its inputs leaves the folder's files as they were."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    splits = open_splits(cfg, task.label, task.vote_columns)
    n_train = len(splits.train)
    if n_train < 2:
        raise ConfigError(f"label_fraction={cfg.label_fraction} leaves {n_train} labelled train row(s) in "
                          f"{cfg.data.path}; need at least 2")
    _check_ebv(cfg, splits)
    torch.manual_seed(cfg.seed)  # head (and scratch encoder) initialisation
    backbone = build_backbone(cfg, splits.attrs, device)
    out = output_dir(cfg.out, "out")
    write_config(cfg, out / "config.yaml")
    bs = cfg.data.batch_size

    # ---- data streams ------------------------------------------------------------------------
    linear = cfg.protocol == "linear"
    t_features = time.perf_counter()
    test_features = None
    if linear:
        for p in backbone.encoder.parameters():
            p.requires_grad_(False)
        feats = {name: extract_features(backbone.encoder, backbone.transform, getattr(splits, name), cfg, device, amp)
                 for name in ("train", "val", "test")}
        test_features = feats["test"]
        train_stream = FeatureBatches(feats["train"]["features"], feats["train"]["ebv"],
                                      task.to_target(feats["train"][task.label]), device, task.target_dtype)
        val_stream = FeatureBatches(feats["val"]["features"], feats["val"]["ebv"],
                                    task.to_target(feats["val"][task.label]), device, task.target_dtype) \
            if len(splits.val) else None
        encoder: nn.Module = nn.Identity()
    else:
        photometric = bool(splits.attrs.get("photometric", True))
        augment = None
        if cfg.augment:
            extinction = backbone.survey.extinction if photometric else None
            augment = LightAugment(extinction).to(device)
        train_stream = ImageBatches(splits.train, task, backbone.transform, cfg, device, train=True, augment=augment)
        val_stream = ImageBatches(splits.val, task, backbone.transform, cfg, device, train=False) \
            if len(splits.val) else None
        encoder = backbone.encoder
    feature_time = time.perf_counter() - t_features

    head = build_head(cfg.head.kind, backbone.feature_dim + int(cfg.use_ebv), task.n_outputs,
                      cfg.head.hidden, cfg.head.dropout)
    finetune = cfg.protocol == "finetune"
    freeze_bn = finetune and cfg.optim.freeze_bn
    lp_ft = finetune and cfg.optim.head_warmup_epochs > 0
    precise_bn = not linear and not freeze_bn and cfg.optim.precise_bn
    bn_rows = _sample(splits.train, STATS_ROWS)
    if lp_ft:  # the linear probe's features (eval mode, every train row): exact statistics, as protocol=linear
        feats = {"train": extract_features(backbone.encoder, backbone.transform, splits.train, cfg, device, amp)}
        stats = feats["train"]
    elif linear:
        stats = feats["train"]
    else:  # features as training first sees them (BatchNorm on batch statistics unless frozen), some train rows
        stats = extract_features(backbone.encoder, backbone.transform, _sample(splits.train, STATS_ROWS), cfg,
                                 device, amp, bn_train=not freeze_bn)
    inputs = stats["features"]
    if cfg.use_ebv:
        inputs = np.concatenate([inputs, stats["ebv"][:, None].astype(np.float32)], axis=1)
    head[0].set_stats(torch.from_numpy(inputs))
    if task.classification:  # the head starts at the train class prior
        counts = np.bincount(task.to_target(splits.train.index.columns[task.label][splits.train.indices]),
                             minlength=task.n_outputs)
        init_prior(head, torch.from_numpy((1 - PRIOR_FLOOR) * counts / counts.sum() + PRIOR_FLOOR / task.n_outputs))
    elif task.init_head is not None:
        task.init_head(head, label_values(splits.train, task.label))
    model = Predictor(encoder, head, cfg.use_ebv).to(device)
    groups = optimizer_groups(cfg, head, None if linear else encoder)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = max(1, n_train // min(bs, n_train))
    total_steps = cfg.optim.epochs * steps_per_epoch
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(cfg.seed * 1_000_003 + 17)

    # ---- restore ----------------------------------------------------------------------------
    history: list[dict] = []
    monitor = task.val_score_name if task.val_score is not None else "val_loss"
    val_values = label_values(splits.val, task.label)  # the val streams keep this order
    best = {"score": math.inf, "epoch": 0, "state": None}
    start_epoch, bad_epochs, train_time, probe_epochs = 0, 0, 0.0, 0
    state_path = out / TRAIN_STATE
    ckpt_sha = checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None
    if state_path.is_file():
        state = load_checkpoint(state_path)
        if (_comparable(state.get("config") or {}) == _comparable(config_to_dict(cfg))
                and state.get("ckpt_sha256") == ckpt_sha):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, bad_epochs, history = int(state["epoch"]), int(state["bad_epochs"]), list(state["history"])
            best = {"score": float(state["best_score"]), "epoch": int(state["best_epoch"]),
                    "state": state["best_state"]}
            train_time, probe_epochs = float(state["train_time_s"]), int(state.get("probe_epochs", 0))
            torch.set_rng_state(state["rng_torch"])
            if device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            aug_gen.set_state(state["rng_augment"].to(aug_gen.get_state().device))
            print(f"eval: resumed {cfg.protocol} {task.name} from epoch {start_epoch} in {out}", flush=True)
        else:
            print(f"eval: ignoring {state_path} (another config or checkpoint)", flush=True)

    print(f"eval: {task.name} {cfg.protocol} | {backbone.arch} ({backbone.source}) | {n_train} labelled train "
          f"(label_fraction {cfg.label_fraction}), {len(splits.val)} val, {len(splits.test)} test | "
          f"device {device}, amp {amp}" + (f" | features in {feature_time:.1f} s" if linear else ""), flush=True)

    # ---- the epoch loop -----------------------------------------------------------------------
    epoch = start_epoch
    fresh = epoch == 0
    if fresh and val_stream is not None:  # epoch 0 = the prior: early stopping never returns worse on val
        vb = val_stream.batches(bs) if linear else val_stream.batches()
        record = {"epoch": 0, "stage": "prior", **_validate(model, vb, task, val_values, amp, device)}
        best = {"score": record[monitor], "epoch": 0,
                "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(record)
    if fresh and lp_ft:  # LP-FT: epochs 1..probe_epochs train the head alone; fine-tuning starts from the best
        t0 = time.perf_counter()
        val_feats = extract_features(backbone.encoder, backbone.transform, splits.val, cfg, device, amp) \
            if val_stream is not None else None
        records, best, probe_epochs = _probe_head(cfg, task, head, feats["train"], val_feats, val_values, monitor,
                                                  best, model, device, amp)
        history.extend(records)
        epoch = probe_epochs
        train_time += time.perf_counter() - t0
        print(f"eval: linear probe {probe_epochs} epoch(s), best epoch {best['epoch']} (0 = the prior); "
              f"fine-tuning from it", flush=True)
    bar = None
    if cfg.progress:
        from sslsky.progress import progress

        bar = progress(cfg.optim.epochs, f"{task.name} {cfg.protocol}", initial=epoch - probe_epochs)
    stopped_early = not fresh and cfg.optim.patience > 0 and bad_epochs >= cfg.optim.patience
    while epoch - probe_epochs < cfg.optim.epochs and not stopped_early:
        t0 = time.perf_counter()
        model.train()
        if freeze_bn:
            freeze_batchnorm(encoder)
        if linear:
            batches = train_stream.batches(bs, epoch=epoch, seed=cfg.seed)
        else:
            batches = train_stream.batches(epoch=epoch, generator=aug_gen if cfg.augment else None)
        losses = []
        for i, (x, ebv, y) in enumerate(batches):
            lr = warmup_cosine((epoch - probe_epochs) * steps_per_epoch + i, cfg.optim.lr, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x, ebv)
            loss = _loss(task, logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{task.name} {cfg.protocol}: loss is {loss.item()} at epoch {epoch}; "
                                         f"lower optim.lr (now {cfg.optim.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch += 1
        record = {"epoch": epoch, "stage": "train", "train_loss": float(np.mean(losses)), "lr": lr}
        if precise_bn:  # the statistics of this epoch's weights, not a lagging average over the last batches
            recalibrate_batchnorm(encoder, backbone.transform, bn_rows, cfg, device, amp)
        if val_stream is not None:
            vb = val_stream.batches(bs) if linear else val_stream.batches()
            record.update(_validate(model, vb, task, val_values, amp, device))
            if record[monitor] < best["score"]:
                best = {"score": record[monitor], "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
        train_time += time.perf_counter() - t0
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        stopped_early = val_stream is not None and cfg.optim.patience > 0 and bad_epochs >= cfg.optim.patience
        save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "bad_epochs": bad_epochs, "history": history, "best_score": best["score"],
            "best_epoch": best["epoch"], "best_state": best["state"], "train_time_s": train_time,
            "rng_torch": torch.get_rng_state(), "rng_augment": aug_gen.get_state().cpu(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "config": config_to_dict(cfg), "ckpt_sha256": ckpt_sha, "probe_epochs": probe_epochs,
        }, state_path, keep=0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.startswith(("train", "val"))})
        else:
            print(f"eval: epoch {epoch - probe_epochs}/{cfg.optim.epochs} " +
                  " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("train", "val"))), flush=True)
    if bar is not None:
        bar.close()

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    else:  # no validation rows: the last epoch
        best["epoch"] = epoch
    model.eval()
    why = "early stop" if stopped_early else "all epochs"
    probed = f", 1..{probe_epochs} the linear probe" if probe_epochs else ""
    print(f"eval: trained {epoch} epoch(s) ({why}), best epoch by {monitor}: {best['epoch']} (0 = the prior"
          f"{probed}), {train_time:.1f} s", flush=True)
    prior_only = ""
    kept = next((r for r in history if r["epoch"] == best["epoch"]), {})
    if val_stream is not None and best["epoch"] == 0:
        trained = [r[monitor] for r in history if r["epoch"] > 0 and monitor in r]
        prior_only = (f"no epoch beat the untrained head (the train distribution of the labels) on val {monitor}: "
                      f"{kept.get(monitor, math.nan):.4f} at the prior, best trained "
                      f"{min(trained) if trained else math.nan:.4f} in {len(trained)} epoch(s)")
    elif (val_stream is not None and task.classification and task.one_class_is_prior
          and kept.get("val_classes_predicted") == 1 and len(np.unique(task.to_target(val_values))) > 1):
        prior_only = (f"the kept model (epoch {best['epoch']}) gives every val galaxy the same class: "
                      f"the majority class, not a classifier")
    return SupervisedRun(model=model, backbone=backbone, task=task, splits=splits, cfg=cfg, device=device, amp=amp,
                         history=history, best_epoch=best["epoch"], epochs_run=epoch, train_time_s=train_time,
                         test_features=test_features, probe_epochs=probe_epochs, prior_only=prior_only)


def print_warnings(command: str, warnings: typing.Sequence[str]) -> None:
    """Print each warning of a result (e.g. :func:`sslsky.eval.metrics.small_test_warnings`) between bars on
    stderr, where a reader of the log cannot miss it; nothing when there are none."""
    if warnings:
        bar = "!" * 100
        lines = [bar, *(f"{command}: WARNING: {text}" for text in warnings), bar]
        print("\n".join(lines), file=sys.stderr, flush=True)


def clear_train_state(out: str | os.PathLike) -> None:
    """Remove the resume state of a finished task."""
    (Path(out) / TRAIN_STATE).unlink(missing_ok=True)


class PriorOnlyError(RuntimeError):
    """The kept model is only the prior (:attr:`SupervisedRun.prior_only`): no result. The eval commands print it
    and exit with status 4, as for a diverged training."""


_PRIOR_ONLY_HINTS = {
    "finetune": "optim.freeze_bn=true, optim.head_warmup_epochs=30 (LP-FT: fine-tuning starts from the linear "
                "probe), a lower optim.encoder_lr_factor (0.1), more labels (label_fraction), or protocol=linear",
    "linear": "more labels (label_fraction), another optim.lr, more optim.patience, or a better-trained encoder",
    "scratch": "more labels (label_fraction), more optim.epochs / optim.patience, or a pretrained encoder "
               "(protocol=finetune)",
}


def refuse_prior_only(run: SupervisedRun, command: str) -> str | None:
    """Refuse a run that kept only the prior: write :data:`PRIOR_ONLY_FILE` (why, history, config), remove a stale
    metrics.json and the resume state, raise :class:`PriorOnlyError` saying what happened and what to try.

    With ``optim.allow_prior`` it only warns and returns the reason (metrics.json then carries it as
    ``prior_only``); a run that is a result returns None.
    """
    cfg, out = run.cfg, Path(run.cfg.out)
    if not run.prior_only:
        (out / PRIOR_ONLY_FILE).unlink(missing_ok=True)  # from an earlier attempt
        return None
    what = (f"{command}: PRIOR ONLY, no result: {run.task.name} {cfg.protocol} with {run.n_train} labels kept only "
            f"the prior: {run.prior_only}")
    if cfg.optim.allow_prior:
        print(f"{what}; optim.allow_prior=true: written as metrics.json marked prior_only", flush=True)
        (out / PRIOR_ONLY_FILE).unlink(missing_ok=True)
        return run.prior_only
    write_json({
        "prior_only": run.prior_only, "task": run.task.name, "protocol": cfg.protocol,
        "label_fraction": cfg.label_fraction, "seed": cfg.seed, "n_train_labels": run.n_train,
        "n_val": len(run.splits.val), "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
        "probe_epochs": run.probe_epochs, "train_time_s": run.train_time_s, "history": run.history,
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None,
        "config": config_to_dict(cfg),
    }, out / PRIOR_ONLY_FILE)
    (out / METRICS_FILE).unlink(missing_ok=True)  # an older result here must not pass for this one
    clear_train_state(out)
    raise PriorOnlyError(f"{what}. Its predictions would not depend on the galaxy, so no "
                         f"{METRICS_FILE} was written; the history is in {out / PRIOR_ONLY_FILE}. Try "
                         f"{_PRIOR_ONLY_HINTS.get(cfg.protocol, 'more labels')}; optim.allow_prior=true reports "
                         f"it anyway, marked prior_only")
