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
- ``scratch``: the same network with random initialisation (the supervised baseline), all at ``optim.lr``
  (:func:`sslsky.eval.backbone.build_backbone`: same architecture and inputs as the checkpoint's).
- finetune and scratch, ``optim.precise_bn`` (default on, unless ``freeze_bn``): before each validation the
  encoder's BatchNorm running statistics are re-estimated with the epoch's weights over up to ``STATS_ROWS``
  un-augmented train rows (:func:`recalibrate_batchnorm`). With a few hundred labels an epoch is a few steps,
  the momentum-0.1 running averages still hold the pretraining statistics, and the eval-mode val loss of
  good weights spiked (5.4 against 1.6 with batch statistics) until early stopping kept the prior (README,
  "Fine-tuning on few labels").

Data: the task's :class:`~sslsky.eval.task.Splits`. Val only picks the epoch: early stopping on the task's val
score (``Task.val_score``: mean CRPS for photo-z, the error rate for morphology classes -- ties broken by the
loss, :func:`sslsky.eval.task.error_score` --, otherwise the val loss) with ``optim.patience``; the best
epoch's weights are kept. Epoch 0 is the untrained head, which starts at the train class frequencies
(:func:`sslsky.models.heads.init_prior`; a task with its own loss: ``Task.init_head``, e.g. the train-mean vote
fractions), so with few labels a model that only overfits comes back as the prior rather than something worse
-- and the prior is no result: when the kept epoch is 0 (or, for a task with ``Task.one_class_is_prior``, the
kept model gives every val galaxy one class), ``SupervisedRun.prior_only`` says why and the eval commands
refuse it (:func:`sslsky.eval.results.refuse_prior_only`). History records carry ``stage``: ``prior``
(epoch 0), ``probe`` (LP-FT) or ``train``; ``best_epoch`` and ``epochs_run`` count all of them.

Inputs and batches: :mod:`sslsky.eval.features` (the eval transform, the light augmentation, E(B-V) inputs).

Head: :func:`sslsky.models.heads.build_head` (linear or MLP) behind a fixed standardisation of its inputs
(statistics of the train features: exact for linear and LP-FT; otherwise from up to ``STATS_ROWS`` train rows
through the initial encoder with BatchNorm as training uses it, batch statistics unless frozen); loss:
cross-entropy over the task's classes (redshift bins for photo-z), or the task's own per-galaxy ``Task.loss``
averaged over the batch (vote counts: Dirichlet-multinomial NLL; see :mod:`sslsky.eval.morphology`).
Optimiser: AdamW (``optim.weight_decay``), cosine decay over ``optim.epochs`` passes, raised to at least
``optim.min_steps`` optimizer steps for small label sets (:func:`training_epochs`). Seeded (init, label subset,
data order, augmentation); bf16 autocast on GPU (``cfg.amp``).

Schedule: ``optim.epochs`` passes, raised to at least ``optim.min_steps`` optimizer steps; validation (and the
precise-BN pass before it) every epoch, or every k-th when there are more than ``MAX_VALIDATIONS`` epochs (and
always after the last); ``optim.patience`` counts epochs. Validating less often never changes the training
itself (neither draws random numbers), only which epochs can be kept.

Resume: after the first epoch and then at most every ``STATE_EVERY_S`` seconds the training state goes
atomically to ``OUT/train_state.pt``; a task started again with the same config and checkpoint (SHA-256)
continues from there (a SLURM requeue loses at most that much plus an epoch; the LP-FT probe, seconds on
precomputed features, is not checkpointed: a task stopped during it runs it again).
Schedules are functions of the epoch (the fine-tuning cosine of epoch - P). The file is removed when the task
finishes (:func:`sslsky.eval.results.clear_train_state`).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import Dataset

from sslsky.config import ConfigError, SupervisedEvalConfig, config_to_dict, write_config
from sslsky.devices import autocast_dtype, resolve_device
from sslsky.eval.backbone import Backbone, Predictor, build_backbone
from sslsky.eval.features import (
    FeatureBatches,
    ImageBatches,
    LightAugment,
    extract_features,
    make_loader,
    spread_sample,
)
from sslsky.eval.results import TRAIN_STATE, checkpoint_sha256, comparable_config
from sslsky.eval.task import Splits, Task, check_config, check_ebv, label_values, open_splits
from sslsky.models.heads import build_head, init_prior
from sslsky.outputs import output_dir
from sslsky.schedules import warmup_cosine
from sslsky.train.checkpoint import load_checkpoint, save_checkpoint

#: Train rows whose features set the head's input standardisation (finetune / scratch).
STATS_ROWS = 2048
#: The head starts at the train class frequencies mixed with this much of a uniform distribution.
PRIOR_FLOOR = 0.01
#: At most this many validations a run (each also re-estimates BatchNorm): :func:`validation_interval`.
MAX_VALIDATIONS = 50
#: ``OUT/train_state.pt`` (~180 MB for a ResNet-18 with AdamW and the best weights) is written at most this
#: often, seconds: a restart loses at most this much work plus an epoch.
STATE_EVERY_S = 30.0


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
    #: one class); empty when it is a result. The eval commands refuse it
    #: (:func:`sslsky.eval.results.refuse_prior_only`).
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


def _validate(model: Predictor, batches, task: Task, values: np.ndarray, amp: torch.dtype | None,
              device: torch.device) -> dict[str, float]:
    """Val loss (mean per galaxy) and the task's early-stopping score; ``values`` the val labels in batch order."""
    model.eval()
    total, probs, predicted, correct = 0.0, [], set(), 0
    with torch.no_grad():
        for x, ebv, y in batches:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x, ebv).float()
            if task.classification:
                total += F.cross_entropy(logits, y, reduction="sum").item()
                guess = logits.argmax(dim=1)
                predicted.update(guess.unique().tolist())
                correct += int((guess == y).sum())
            else:
                total += task.loss(logits, y).sum().item()
            if task.val_score is not None:
                probs.append(task.outputs(logits).cpu().numpy())
    out = {"val_loss": total / len(values)}
    if task.val_score is not None:
        out[task.val_score_name] = float(task.val_score(np.concatenate(probs), values))
    if task.classification:
        out["val_accuracy"] = correct / len(values)
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
    for batch in make_loader(dataset, cfg, device, train=True):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            encoder(transform(batch["image"].to(device, non_blocking=True)))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    encoder.eval()


def encoder_blocks(encoder: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The encoder's parameters by block, top (next to the head) first: a ResNet's ``layer4``, ``layer3``,
    ``layer2``, ``layer1``, then ``stem`` (everything else: conv1, bn1); a ViT's blocks from the last (with the
    final norm) to the first, then ``embed`` (patch and positional embeddings, CLS token); another encoder
    (fusion) is one block."""
    layers = [name for name in ("layer4", "layer3", "layer2", "layer1") if isinstance(getattr(encoder, name, None),
                                                                                     nn.Module)]
    if layers:
        blocks = [(name, list(getattr(encoder, name).parameters())) for name in layers]
    elif isinstance(getattr(encoder, "blocks", None), nn.Sequential) and hasattr(encoder, "pos_embed"):
        blocks = [(f"blocks.{i}", list(block.parameters())) for i, block in reversed(list(enumerate(encoder.blocks)))]
        blocks[0][1].extend(encoder.norm.parameters())
    else:
        return [("encoder", list(encoder.parameters()))]
    seen = {id(p) for _, params in blocks for p in params}
    stem = [p for p in encoder.parameters() if id(p) not in seen]
    return blocks + ([("stem" if layers else "embed", stem)] if stem else [])


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
    blocks = encoder_blocks(encoder)
    if finetune and len(blocks) == 1 and decay != 1.0:
        print(f"eval: warning: optim.layer_decay={decay} has no effect here: this encoder is one block for the "
              f"layer-wise learning rates (ResNets and ViTs have several)", file=sys.stderr, flush=True)
    for depth, (name, params) in enumerate(blocks):
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


def validation_interval(n_epochs: int) -> int:
    """Epochs between validations: every epoch, or every k-th so that a run validates at most ``MAX_VALIDATIONS``
    times (a small label set trains for hundreds of one-step epochs; the last epoch is always validated)."""
    return max(1, math.ceil(n_epochs / MAX_VALIDATIONS))


def steps_per_pass(n_train: int, batch_size: int) -> int:
    """Optimizer steps of one pass over ``n_train`` rows: full batches of ``min(batch, n)`` (the last one dropped)."""
    return max(1, n_train // max(1, min(batch_size, n_train)))


def training_epochs(epochs: int, min_steps: int, n_train: int, batch_size: int) -> int:
    """``optim.epochs``, raised so that training takes at least ``optim.min_steps`` optimizer steps."""
    return max(epochs, math.ceil(min_steps / steps_per_pass(n_train, batch_size)))


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
    check_ebv(cfg, splits)
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
    bn_rows = spread_sample(splits.train, STATS_ROWS)
    if lp_ft:  # the linear probe's features (eval mode, every train row): exact statistics, as protocol=linear
        feats = {"train": extract_features(backbone.encoder, backbone.transform, splits.train, cfg, device, amp)}
        stats = feats["train"]
    elif linear:
        stats = feats["train"]
    else:  # features as training first sees them (BatchNorm on batch statistics unless frozen), some train rows
        stats = extract_features(backbone.encoder, backbone.transform, spread_sample(splits.train, STATS_ROWS), cfg,
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
    steps_per_epoch = steps_per_pass(n_train, bs)
    n_epochs = training_epochs(cfg.optim.epochs, cfg.optim.min_steps, n_train, bs)
    total_steps = n_epochs * steps_per_epoch
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
        if (comparable_config(state.get("config") or {}) == comparable_config(config_to_dict(cfg))
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

        bar = progress(n_epochs, f"{task.name} {cfg.protocol}", initial=epoch - probe_epochs)
    stopped_early = not fresh and cfg.optim.patience > 0 and bad_epochs >= cfg.optim.patience
    val_every = validation_interval(n_epochs)
    saved_at = -math.inf  # the first epoch is saved: a restart never begins from nothing after a minute's work
    while epoch - probe_epochs < n_epochs and not stopped_early:
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
        last = epoch - probe_epochs >= n_epochs
        check = val_stream is not None and ((epoch - probe_epochs) % val_every == 0 or last)
        if precise_bn and (check or last):  # this epoch's weights' statistics, not a lagging average
            recalibrate_batchnorm(encoder, backbone.transform, bn_rows, cfg, device, amp)
        if check:
            vb = val_stream.batches(bs) if linear else val_stream.batches()
            record.update(_validate(model, vb, task, val_values, amp, device))
            if record[monitor] < best["score"]:
                best = {"score": record[monitor], "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += val_every  # the epochs since the last validation
        train_time += time.perf_counter() - t0
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        stopped_early = val_stream is not None and cfg.optim.patience > 0 and bad_epochs >= cfg.optim.patience
        if time.perf_counter() - saved_at >= STATE_EVERY_S:
            save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "bad_epochs": bad_epochs, "history": history, "best_score": best["score"],
                "best_epoch": best["epoch"], "best_state": best["state"], "train_time_s": train_time,
                "rng_torch": torch.get_rng_state(), "rng_augment": aug_gen.get_state().cpu(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "config": config_to_dict(cfg), "ckpt_sha256": ckpt_sha, "probe_epochs": probe_epochs,
            }, state_path, keep=0)
            saved_at = time.perf_counter()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.startswith(("train", "val"))})
        else:
            print(f"eval: epoch {epoch - probe_epochs}/{n_epochs} " +
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
