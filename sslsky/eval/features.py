"""What the head of a supervised evaluation is fed: frozen features of a split, mini-batches of precomputed
features (linear protocol) or of cutouts from the shards (finetune / scratch), and the light training
augmentation.

Inputs: the centred crop and flux normalisation the encoder was pretrained with (``load_encoder``'s transform).
With ``cfg.augment`` (finetune / scratch) training crops get a random flip + 90-degree rotation (exact, no
resampling) and Galactic reddening (de-redden with the catalog E(B-V), re-redden with one drawn from the
footprint distribution): :class:`LightAugment`. With ``cfg.use_ebv`` the E(B-V) is concatenated to the features
(Pasquet et al. 2019); under the reddening augmentation that input is the drawn E(B-V), the one the image now
shows. Loader workers are capped at the CPUs this process may use (:func:`usable_cpus`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sslsky.augment import Reddening
from sslsky.config import SupervisedEvalConfig
from sslsky.data.shards import ShardDataset
from sslsky.eval.task import Task
from sslsky.models.loading import EvalTransform


def usable_cpus() -> int:
    """CPUs this process may run on (the SLURM allocation, not the node), for capping loader workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def make_loader(dataset: Dataset, cfg: SupervisedEvalConfig, device: torch.device, *, train: bool,
                sampler=None) -> DataLoader:
    """A loader of ``dataset`` with ``cfg.data``'s batch size and workers (at most :func:`usable_cpus`). Training
    (``train``): full batches only (BatchNorm needs two rows), batch <= the rows there are."""
    batch = min(cfg.data.batch_size, len(dataset)) if train else cfg.data.batch_size
    workers = min(cfg.data.num_workers, usable_cpus())
    return DataLoader(dataset, batch_size=max(1, batch), sampler=sampler, shuffle=False, drop_last=train,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=sampler is not None and workers > 0, generator=torch.Generator())


def spread_sample(dataset: ShardDataset, n: int) -> Dataset:
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
    for batch in make_loader(dataset, cfg, device, train=bn_train):
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


class ImageBatches:
    """Mini-batches of cutouts from shards: ``(normalised crops, ebv, target)`` on the device."""

    def __init__(self, dataset: ShardDataset, task: Task, transform: EvalTransform, cfg: SupervisedEvalConfig,
                 device: torch.device, train: bool, augment: LightAugment | None = None):
        self.dataset, self.task, self.transform, self.device = dataset, task, transform, device
        self.augment = augment
        self.sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed) \
            if train else None
        self.loader = make_loader(dataset, cfg, device, train=train, sampler=self.sampler)

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
