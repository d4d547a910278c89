"""What a supervised evaluation predicts, and from which rows: the :class:`Task`, the train / val / test
:class:`Splits` of the packed data, and the config checks made before anything is loaded.

A :class:`Task` maps a ``ShardDataset`` label column (``z``, ``morph_class``, ``votes``) to the head's targets:
class indices under cross-entropy by default (redshift bins for photo-z), or the task's own per-galaxy loss
(vote counts under a Dirichlet-multinomial; see :mod:`sslsky.eval.morphology`). Train = the labelled train rows
thinned to ``cfg.label_fraction`` (seeded by ``cfg.seed``, nested across fractions); val and test = all labelled
rows of those splits. The loop that trains on them is :mod:`sslsky.eval.supervised`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sslsky.config import ConfigError, SupervisedEvalConfig, check_values
from sslsky.data.shards import ShardDataset
from sslsky.devices import autocast_dtype, resolve_device
from sslsky.models.encoders import ARCHITECTURES, STEMS
from sslsky.models.heads import HEADS

PROTOCOLS = ("linear", "finetune", "scratch")


@dataclass
class Task:
    """What is predicted: a ShardDataset label column mapped to class indices (or, with ``loss``, other targets).

    The default is classification: cross-entropy, the head starting at the train class prior, softmax outputs.
    A task with its own ``loss`` (e.g. vote counts under a Dirichlet-multinomial) gives per-galaxy losses of the
    raw head outputs and float targets; its head keeps PyTorch's initialisation and ``output`` maps the head
    outputs to what :meth:`sslsky.eval.supervised.SupervisedRun.predict_test` returns.
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
    #: is no result either (the majority class), like the prior
    #: (:attr:`sslsky.eval.supervised.SupervisedRun.prior_only`).
    one_class_is_prior: bool = False

    @property
    def classification(self) -> bool:
        return self.loss is None

    def outputs(self, logits: Tensor) -> Tensor:
        """(B, K) head outputs -> (B, K) float64 predictions (class probabilities by default)."""
        return torch.softmax(logits.double(), dim=1) if self.output is None else self.output(logits.double())


#: The weight of the mean cross-entropy in :func:`error_score`: a tie-break only (an error rate moves in steps of
#: 1 / n_val >= 1e-4 for n_val <= 10,000, and this times any cross-entropy below 100 stays under 1e-4).
TIE_BREAK = 1e-6


def error_score(probs: np.ndarray, classes: np.ndarray) -> float:
    """The early-stopping score of a classification: the val error rate (1 - accuracy), ties broken by the mean
    cross-entropy; ``classes`` are the val label values as class indices 0..K-1 (``morph_class``). Not the
    cross-entropy alone: trained longer, a classifier grows over-confident on the galaxies it gets wrong, so its
    val loss rises while its val accuracy still rises (README, Performance -> "Label efficiency": scratch with 198
    labels, val loss 0.84 -> 1.20 while val accuracy 0.65 -> 0.70), and a loss-watching early stop keeps an
    under-trained epoch."""
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    error = float(np.mean(probs.argmax(axis=1) != classes))
    cross_entropy = float(-np.mean(np.log(np.clip(probs[np.arange(len(classes)), classes], 1e-300, None))))
    return error + TIE_BREAK * cross_entropy


def label_values(dataset: ShardDataset, label: str) -> np.ndarray:
    """The ``label`` column of the dataset's rows in order: (N,), or (N, A) vote counts for ``votes``."""
    if label == "votes":
        return dataset.vote_counts[dataset.indices]
    return dataset.index.columns[label][dataset.indices]


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


def check_ebv(cfg: SupervisedEvalConfig, splits: Splits) -> None:
    """With ``use_ebv``: a ConfigError naming the rows of any split without a catalog E(B-V), and the fix."""
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
