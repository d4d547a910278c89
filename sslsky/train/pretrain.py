"""``sslsky pretrain``: any registered method (:data:`sslsky.methods.METHODS`) on DDP, with on-device
augmentation and exact resume.

Reads top to bottom: set-up (distributed, the run directory locked and a resume checked against the run's
config, data, augmentation, method, optimizer), restore from the run directory, the run's files written (only
now that everything is checked: :mod:`sslsky.train.rundir`), then the step loop (data -> two augmented views
-> the method's loss -> update -> the method's after-step hook -> log / validate / checkpoint), then the
encoder export the evaluation scripts load.

The trainer reaches the method only through the contract of :mod:`sslsky.methods.base`: what it logs is the
method's metrics, what it validates with is the method's :meth:`~sslsky.methods.base.Method.held_out`, what it
exports is the method's ``encoder``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import SequentialSampler

from sslsky import dist
from sslsky.augment import AstroAugment, data_survey, resolve_geometry
from sslsky.config import ConfigError, PretrainConfig, config_to_dict
from sslsky.data.schema import PER_BAND_COLUMNS
from sslsky.data.shards import VOTES_LABEL, ShardDataset, batch_loader
from sslsky.data.splits import split_mask
from sslsky.devices import autocast_dtype, rank_device
from sslsky.errors import DiskFullError
from sslsky.methods import Method, check_sections, encoder_prefix, method_class
from sslsky.schedules import scaled_lr, warmup_cosine
from sslsky.surveys import Survey
from sslsky.train.checkpoint import CHECKPOINT_PATTERN, list_checkpoints, load_latest, save_checkpoint
from sslsky.train.preempt import PreemptionFlag, ignore_interrupt, requeue_slurm_job
from sslsky.train.rundir import MainRankFailedError, RunDirectory, append_text, data_identity, on_main_rank
from sslsky.train.sampler import ResumableDistributedSampler
from sslsky.vocabulary import VoteSchema

ENCODER_EXPORT = "encoder.pt"
METRICS_FILE = "metrics.jsonl"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class BatchAugment(nn.Module):
    """Two augmented views of a loader batch: ``{"image", "ebv", "psf_fwhm", "sky_sigma"} -> (view1, view2)``."""

    def __init__(self, augment: AstroAugment):
        super().__init__()
        self.augment = augment

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(batch["image"], batch.get("ebv"), batch.get("psf_fwhm"), batch.get("sky_sigma"),
                            generator=generator)


def build_augment(cfg: PretrainConfig, survey: Survey, dataset: ShardDataset) -> BatchAugment:
    """The two-view augmentation for these shards: manifest statistics, photometric flag, E(B-V) checked."""
    attrs = dataset.attrs
    photometric = bool(attrs.get("photometric", True))
    stats = attrs.get("stats") or {}
    if cfg.augment.reddening.enabled and photometric:
        ebv = dataset.index.columns["ebv"][dataset.indices]
        bad = np.flatnonzero(~np.isfinite(ebv))
        if bad.size:
            ids = dataset.index.columns["object_id"][dataset.indices[bad[:5]]].tolist()
            raise ConfigError(f"{bad.size} training images have no catalog E(B-V) (object_id {ids}...), which the "
                              f"reddening augmentation needs to de-redden; add the ebv column to the catalog and "
                              f"pack again, or set augment.reddening.enabled=false")
    resolved = resolve_geometry(cfg.augment, survey)  # sizes from the pack; a crop that cannot fit is a config error
    try:
        augment = AstroAugment(survey, resolved, photometric=photometric, median=stats.get("median"),
                               sigma=stats.get("sigma_mad"))
    except ValueError as err:  # a setting the images cannot take (flux augmentations on colour images, ...)
        raise ConfigError(f"augment: {err}") from None
    return BatchAugment(augment)


def vote_schema(cfg: PretrainConfig) -> VoteSchema | None:
    """The vote columns of ``votes.campaigns`` when the method's batches carry vote counts (else None)."""
    if "votes" not in method_class(cfg.method).batch_keys_for(cfg):
        return None
    try:
        return VoteSchema.from_campaigns(cfg.votes.campaigns)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_method_config(cfg: PretrainConfig) -> None:
    """The method exists and no other method's (or encoder's) section is set: before any work."""
    method_class(cfg.method)
    check_sections(cfg)


def build_method(cfg: PretrainConfig, n_bands: int, image_size: int, votes: VoteSchema | None,
                 data: ShardDataset | None = None) -> Method:
    """The configured method on its encoder (:meth:`~sslsky.methods.base.Method.make_encoder`: by default a new
    one of ``model.arch``) for ``n_bands`` bands and ``image_size`` crops; ``data`` the training shards."""
    bands = cfg.model.n_bands or n_bands
    if cfg.model.n_bands and cfg.model.n_bands != n_bands:
        raise ConfigError(f"model.n_bands={cfg.model.n_bands} but the data have {n_bands} bands; "
                          f"set model.n_bands={n_bands} (or 0 to follow the data)")
    method = method_class(cfg.method)
    try:
        return method.from_config(cfg, method.make_encoder(cfg, bands, image_size), votes, data=data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except RuntimeError as err:  # torch.OutOfMemoryError included
        if "allocate" not in str(err) and "out of memory" not in str(err):
            raise
        raise ConfigError(f"building the model of this config needs more memory than there is ({str(err)[:160]}); "
                          f"check the sizes under model ({cfg.model.arch}, model.{cfg.method})") from None


def build_optimizer(cfg: PretrainConfig, model: Method) -> torch.optim.Optimizer:
    """``optim.name`` over the method's parameters (or parameter groups: a group may set its own weight decay);
    the learning rate is set every step by the schedule."""
    params = list(model.parameters_to_optimize())
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.98), eps=1e-6, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(params, lr=0.0, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def batch_to_device(batch: dict, device: torch.device, channels_last: bool, keys: tuple[str, ...] = ()) -> dict:
    """What the augmentation needs (image, E(B-V), per-band PSF and noise) and the method's ``keys`` on ``device``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = {"image": batch["image"].to(device, non_blocking=True, memory_format=fmt),
           "ebv": batch["ebv"].to(device, non_blocking=True, dtype=torch.float32)}
    for name in (*PER_BAND_COLUMNS, *keys):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)  # votes: (B, A) counts; morph_class: (B,)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) on rank 0; silent elsewhere.

    ``purge_step``: on a resume, the step after the checkpoint; TensorBoard hides the events logged from there
    on by the run that stopped (metrics.jsonl is trimmed the same way by :meth:`RunDirectory.record_start`).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:
                print("pretrain: tensorboard is not installed; logging to metrics.jsonl only", flush=True)
        self.path = run_dir / METRICS_FILE

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_text(self.path, json.dumps(record) + "\n", "metrics")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def held_out(model: Method, augment: BatchAugment, loader, device: torch.device, cfg: PretrainConfig
             ) -> dict[str, float]:
    """The method's validation record on ``data.val_batches`` held-out batches (eval mode; the views drawn from
    a generator seeded with ``seed``, so every validation sees the same views)."""
    model.eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    keys = model.batch_keys

    def batches():
        for i, batch in enumerate(loader):
            if i >= cfg.data.val_batches:
                break
            b = batch_to_device(batch, device, cfg.channels_last, keys)
            view1, view2 = augment(b, generator=gen)
            yield {"view1": view1, "view2": view2, "image": b["image"], **{k: b[k] for k in keys}}

    record = model.held_out(batches(), augment.augment.eval_view)
    model.train()
    return record


def run_pretrain(cfg: PretrainConfig, command: list[str] | None = None) -> int:
    """Train (or resume) as configured: 0 when finished or checkpointed on a stop signal (USR2 / SIGTERM),
    130 after Ctrl-C (the first one checkpoints, a second one stops at once), 2 on the other ranks when rank 0
    refused the start or could not write (it says why)."""
    preempt = PreemptionFlag()  # USR2 / SIGTERM (and Ctrl-C once training runs) only set a flag from here on
    run = RunDirectory(cfg.run_dir)  # rank 0 locks it in _run; released below on every exit path
    try:
        return _run(cfg, preempt, run, command)
    except MainRankFailedError as err:
        print(f"pretrain: rank {dist.rank()}: stopping with rank 0 ({err})", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if dist.rank() == 0:
            found = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
            resume = f"resume from {found[-1]}" if found else "start again (there is no checkpoint yet)"
            print(f"\npretrain: stopped at once by Ctrl-C; run the same command again to {resume}", file=sys.stderr,
                  flush=True)
        return 130
    finally:
        run.close()
        preempt.close()
        dist.cleanup()


def _run(cfg: PretrainConfig, preempt: PreemptionFlag, run: RunDirectory, command: list[str] | None = None) -> int:
    # ---- set-up ---------------------------------------------------------------------------
    check_method_config(cfg)
    method_cls = method_class(cfg.method)
    env = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    device = rank_device(cfg.device, dist.local_rank())
    main = rank == 0
    run_dir = Path(cfg.run_dir)
    # Rank 0 locks the run directory and compares a resume with the run's config; nothing is written yet.
    state, changes = on_main_rank(lambda: run.open(cfg), main) or (None, [])
    if not main:
        state = load_latest(run_dir / "checkpoints")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a packed folder (sslsky pack --out ...)")
    schema = vote_schema(cfg)  # a method that uses votes: the items carry these vote columns
    # a method that learns from labels only draws the galaxies with one (the others would add nothing to its loss)
    label = method_cls.draws(cfg)
    subset = {}
    if cfg.data.label_fraction < 1:
        if label is None:
            raise ConfigError(f"data.label_fraction={cfg.data.label_fraction}: method={cfg.method} draws every galaxy, "
                              f"so there is no labelled subset to thin; leave data.label_fraction=1")
        subset = {"label_fraction": cfg.data.label_fraction, "seed": cfg.data.label_seed}
    try:
        train_set = ShardDataset(cfg.data.path, split="train", vote_columns=schema and schema.columns, label=label,
                                 **subset)
    except ValueError as err:
        raise ConfigError(f"{err} (votes.campaigns)") from None
    if schema is not None:
        n_train = int(split_mask(train_set.index.columns["object_id"], "train").sum())
        labelled = int((train_set.vote_counts[train_set.indices].sum(axis=1) > 0).sum())
        if main:
            drawn = "; only those are drawn" if label == VOTES_LABEL else ""
            print(f"pretrain: {cfg.method} on {len(schema.questions)} questions / {schema.n_answers} answers; "
                  f"{labelled} of {n_train} training galaxies have votes{drawn}", flush=True)
        if labelled == 0:
            raise ConfigError(f"none of the {n_train} training galaxies in {cfg.data.path} has a vote in the "
                              f"{schema.n_answers} columns of votes.campaigns ({schema.columns[0]}...): pack a "
                              f"catalog with vote counts, or choose a method without votes (moco, byol, simclr)")
    if label is not None and len(train_set) == 0:
        raise ConfigError(f"no training galaxy in {cfg.data.path} has a {label} label, which method={cfg.method} "
                          f"learns from: pack a catalog with labels (--label-column), or choose a method without")
    if label is not None and schema is None and main:
        thinned = f" (data.label_fraction={cfg.data.label_fraction:g} of them)" if subset else ""
        column = train_set.attrs.get("label_column") or label
        print(f"pretrain: {cfg.method} draws the {len(train_set)} training galaxies with a label ({column}){thinned}",
              flush=True)
    val_set = ShardDataset(cfg.data.path, split="val", vote_columns=schema and schema.columns, label=label)
    survey = data_survey(train_set.attrs, cfg.data.survey, cfg.data.path)
    augment = build_augment(cfg, survey, train_set).to(device)
    n_bands = len(train_set.attrs.get("bands") or survey.bands)
    crop = augment.augment.cfg.geometry.crop_size  # the side of the views (resolved for these shards)
    model = build_method(cfg, n_bands, crop, schema, train_set).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    amp_dtype = autocast_dtype(cfg.amp, device, fp16=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    global_batch = cfg.data.batch_size * world
    try:  # e.g. MoCo's queue takes whole global batches: say so now, not at the first step
        model.check_batch(global_batch)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    peak_lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.reference_batch)
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(cfg.seed * 1_000_003 + rank)

    # ---- restore: a started-again run just continues ----------------------------------------
    step = 0
    if state is not None:
        mismatch = state_mismatch(model.state_dict(), state["model"])
        if mismatch:  # strict: a mismatch is an error, never ignored
            raise ConfigError(f"the latest checkpoint in {run_dir / 'checkpoints'} does not fit the model of this "
                              f"config ({mismatch}); resume with the run's model settings and data (the bands), or "
                              f"start a new run in another run_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if "encoder_prefix" not in state:  # written before the method contract, whose EMA of a step came at the
            model.after_step(step, cfg.optim.total_steps)  # start of the next one: the EMA still due, exactly
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if len(state["rng"]["augment"]) == world:
            aug_gen.set_state(state["rng"]["augment"][rank])
        else:  # a different number of ranks: same data order, fresh augmentation draws
            aug_gen.manual_seed(cfg.seed * 1_000_003 + rank + step)
            if main:
                print(f"pretrain: checkpoint has {len(state['rng']['augment'])} ranks, this job {world}; "
                      "augmentation RNG re-seeded", flush=True)
        if main:
            print(f"pretrain: resumed from step {step} in {run_dir}", flush=True)

    try:
        sampler = ResumableDistributedSampler(train_set, cfg.data.batch_size, num_replicas=world, rank=rank,
                                              seed=cfg.seed)
    except ValueError as err:  # fewer images than one batch per rank
        raise ConfigError(str(err)) from None
    # The loader draws its worker seeds from its own generator, so starting an epoch (or resuming
    # mid-epoch) never advances the global RNG that the key shuffle uses: exact resume.
    # Each batch is one read straight into a (B, C, H, W) array (ShardDataset.read_batch).
    loader = batch_loader(train_set, sampler, cfg.data.batch_size, drop_last=True, num_workers=cfg.data.num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
                          generator=torch.Generator(), worker_init_fn=ignore_interrupt)
    # Full validation batches only: the in-batch top-1 depends on the batch size (chance = 1 / batch).
    # The vote NLL is per galaxy: every labelled validation galaxy counts.
    labelled_only = label is not None  # a per-galaxy validation: every labelled validation galaxy counts
    val_loader = batch_loader(val_set, SequentialSampler(val_set), max(1, min(cfg.data.batch_size, len(val_set))),
                              drop_last=not labelled_only, num_workers=0, generator=torch.Generator())
    val_every = cfg.val_every if len(val_set) >= (1 if labelled_only else 2) else 0
    if cfg.val_every and not val_every and main:
        what = f"validation galaxies with {label}; nothing" if labelled_only else "validation image(s); nothing"
        print(f"pretrain: only {len(val_set)} {what} is measured", flush=True)
    net = model
    if world > 1:
        # Buffers (BN statistics, the queue) stay each rank's own during training: the queue is
        # identical everywhere by construction (gathered keys), BN statistics need no broadcast.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.find_unused_parameters, **ddp_buffer_kwargs())
    if cfg.compile:
        net = torch.compile(net)
    data_id = data_identity(cfg.data.path) if main else {}  # a resume elsewhere checks it is the same data
    # Everything is checked and built: only now are the run's files written (config.yaml on a fresh start).
    on_main_rank(lambda: run.record_start(cfg, state, changes, command), main)
    log = MetricsLog(run_dir, main, cfg.tensorboard, purge_step=step + 1 if state is not None else None)
    steps_per_epoch = sampler.batches_per_epoch
    if main:
        print(f"pretrain: {env} | {len(train_set)} train / {len(val_set)} val images, "
              f"{steps_per_epoch} steps/epoch, global batch {global_batch}, peak lr {peak_lr:.4g}, "
              f"steps {step}->{cfg.optim.total_steps}, device {device}, amp {amp_dtype}", flush=True)
        if cfg.optim.warmup_steps >= cfg.optim.total_steps:
            print(f"pretrain: warning: optim.warmup_steps={cfg.optim.warmup_steps} >= optim.total_steps="
                  f"{cfg.optim.total_steps}: the learning rate never reaches the peak {peak_lr:.4g} (it stays in the "
                  f"linear warm-up); lower warmup_steps", file=sys.stderr, flush=True)
    bar = None
    if main and cfg.progress:
        from sslsky.progress import progress

        bar = progress(cfg.optim.total_steps, "pretrain", initial=step)

    def checkpoint() -> None:
        """Called on every rank at the same step; rank 0 writes, and every rank stops if it could not."""
        gathered_rng = gather_rng(aug_gen)
        on_main_rank(lambda: write_checkpoint(gathered_rng), main)

    def write_checkpoint(gathered_rng: list[torch.Tensor]) -> None:
        path = run_dir / "checkpoints" / CHECKPOINT_PATTERN.format(step=step)
        try:
            write_state(gathered_rng, path)
        except DiskFullError:
            whole = list_checkpoints(path.parent)
            print(f"pretrain: the checkpoint of step {step} was not written; "
                  f"{f'a restart resumes from {whole[-1]}' if whole else 'there is no checkpoint yet'}",
                  file=sys.stderr, flush=True)
            raise

    def write_state(gathered_rng: list[torch.Tensor], path: Path) -> None:
        save_checkpoint({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": {"torch": torch.get_rng_state(), "augment": gathered_rng,
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
            "config": config_to_dict(cfg),
            # which weights are the encoder, and how to build it: an evaluation needs no method
            "encoder_prefix": encoder_prefix(model), "encoder_args": dict(model.encoder.build_args),
            "data_info": {"survey": survey.name, "bands": list(train_set.attrs.get("bands") or survey.bands),
                          "stats": train_set.attrs.get("stats") or {}, **data_id,  # data.path resolved, shards' sha256
                          "augment": config_to_dict(augment.augment.cfg)},  # cutout and crop sizes resolved
        }, path, keep=cfg.keep_checkpoints)

    # ---- the step loop -------------------------------------------------------------------------
    timers = dict.fromkeys(("data", "augment", "forward_backward", "optimizer", "sync"), 0.0)
    window_start, window_steps, stopped = time.perf_counter(), 0, False
    if step == 0 and val_every and main:  # the untrained baseline of the accuracy curve
        record = held_out(model, augment, val_loader, device, cfg)
        log.write({"step": 0, **record})
        if bar is None:
            print(f"pretrain: step 0 {model.describe(record)}", flush=True)
    dist.barrier()
    model.train()
    preempt.step = step + 1  # from here a Ctrl-C checkpoints at the end of the step it lands in
    while step < cfg.optim.total_steps and not stopped:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start_batch=offset)
        t = time.perf_counter()
        for batch in loader:
            b = batch_to_device(batch, device, cfg.channels_last, model.batch_keys)
            sync(device)
            timers["data"] += (now := time.perf_counter()) - t
            t = now
            with torch.no_grad():
                view_q, view_k = augment(b, generator=aug_gen)
            sync(device)
            timers["augment"] += (now := time.perf_counter()) - t
            t = now
            lr = warmup_cosine(step, peak_lr, cfg.optim.total_steps, cfg.optim.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, metrics = net({"view1": view_q, "view2": view_k, **{k: b[k] for k in model.batch_keys}})
            if agree_any(not bool(torch.isfinite(loss.detach())), device):  # every rank stops together
                raise TrainingDivergedError(
                    f"loss is not finite (rank {rank}: {loss.item()}) at step {step} (lr {lr:.4g}); lower "
                    f"optim.base_lr, check the augmentation ranges and the data (NaN pixels?), then resume "
                    f"from the last checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            sync(device)
            timers["forward_backward"] += (now := time.perf_counter()) - t
            t = now
            scaler.step(optimizer)
            scaler.update()
            step += 1
            model.after_step(step, cfg.optim.total_steps)  # EMA targets, queues: functions of the step
            sync(device)
            timers["optimizer"] += (now := time.perf_counter()) - t
            t = now
            window_steps += 1
            stop = preempt.agreed(device)
            preempt.step = step + 1
            timers["sync"] += (now := time.perf_counter()) - t
            if bar is not None:
                bar.update(1)
                shown = next(iter(metrics), None)  # the method's first metric
                bar.set_postfix(loss=f"{loss.item():.3f}", **({shown: f"{metrics[shown].item():.2f}"} if shown else {}))
            if step % cfg.log_every == 0 or step == cfg.optim.total_steps:
                elapsed = time.perf_counter() - window_start
                log.write({"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(),
                           **{k: float(v) for k, v in metrics.items()},
                           "lr": lr, "images_per_s": window_steps * global_batch / elapsed,
                           **{f"time_{k}": v / window_steps for k, v in timers.items()}})
                timers = dict.fromkeys(timers, 0.0)
                window_start, window_steps = time.perf_counter(), 0
            if val_every and (step % val_every == 0 or step == cfg.optim.total_steps):
                if main:
                    record = held_out(model, augment, val_loader, device, cfg)
                    log.write({"step": step, **record})
                    if bar is None:
                        print(f"pretrain: step {step} loss {loss.item():.4f} {model.describe(record)}", flush=True)
                dist.barrier()
            if step % cfg.checkpoint_every == 0 or step == cfg.optim.total_steps or stop:
                checkpoint()
            if cfg.debug_step_sleep:
                time.sleep(cfg.debug_step_sleep)
            if stop:
                stopped = True
                break
            if step >= cfg.optim.total_steps:
                break
            t = time.perf_counter()

    # ---- the end: preempted, or finished and exported -------------------------------------
    preempt.step = None  # a Ctrl-C from here stops at once
    if bar is not None:
        bar.close()
    log.close()
    dist.barrier()
    if stopped and preempt.interrupted:
        if main:
            print(f"pretrain: Ctrl-C -> checkpoint at step {step}; run the same command again to continue",
                  flush=True)
        return 130
    if stopped:
        if main:
            print(f"pretrain: stop signal {preempt.signum} -> checkpoint at step {step}", flush=True)
            if not requeue_slurm_job():
                print("pretrain: not under SLURM; run the same command again to continue", flush=True)
        return 0
    if main:
        path = export_encoder(model, cfg, survey, n_bands, train_set.attrs, run_dir / ENCODER_EXPORT,
                              augment.augment.cfg)
        print(f"pretrain: finished {step} steps; encoder exported to {path}", flush=True)
    return 0


def state_mismatch(model_state: dict, saved: dict) -> str:
    """'' when ``saved`` fits ``model_state`` (same keys and shapes), else a short account of how it differs."""
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    shapes = [f"{k}: checkpoint {list(saved[k].shape)}, model {list(v.shape)}" for k, v in model_state.items()
              if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} weight(s) of other shapes, e.g. {shapes[0]}")
    if missing:
        parts.append(f"{len(missing)} weight(s) the checkpoint lacks, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) this model has not, e.g. {unexpected[0]}")
    return "; ".join(parts)


def ddp_buffer_kwargs() -> dict:
    """No buffer broadcast each forward (``forward_sync_buffers`` in new torch, ``broadcast_buffers`` before)."""
    import inspect

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.world_size() > 1:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def gather_rng(gen: torch.Generator) -> list[torch.Tensor]:
    """Every rank's augmentation RNG state (rank 0 saves them all), as CPU byte tensors."""
    state = gen.get_state().cpu()
    if dist.world_size() == 1:
        return [state]
    return [s for s in dist.all_gather_object(state)]


def export_encoder(model: Method, cfg: PretrainConfig, survey: Survey, n_bands: int, attrs: dict, path: Path,
                   augment_cfg=None) -> Path:
    """The method's encoder weights plus what an evaluation needs to rebuild it (weights_only-safe).

    ``encoder_args``: the :func:`~sslsky.models.encoders.build_encoder` arguments of the architecture, so any
    encoder (ResNet, vit, fusion) is rebuilt from the file alone; ``augment_cfg``: the augmentation config with
    the cutout and crop sizes resolved for these shards (default ``cfg.augment``), so an evaluation needs no
    survey to rebuild the eval view.
    """
    encoder = model.encoder
    save_checkpoint({
        "format": "sslsky-encoder-v1",
        "encoder": {name: t.detach().clone() for name, t in encoder.state_dict().items()},
        "encoder_args": dict(encoder.build_args),
        "arch": cfg.model.arch,
        "stem": encoder.build_args.get("stem"),
        "in_channels": n_bands,
        "feature_dim": model.feature_dim,
        "method": cfg.method,
        "model": config_to_dict(cfg.model),
        "augment": config_to_dict(augment_cfg or cfg.augment),
        "survey": survey.name,
        "bands": list(survey.bands),
        "stats": attrs.get("stats", {}),
        **({"method_state": extra} if (extra := model.export_state()) is not None else {}),
    }, path, keep=0)
    return path
