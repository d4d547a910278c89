"""MoCo v2 (He et al. 2020; Chen et al. 2020) as one ``nn.Module``, after facebookresearch/moco ``builder.py``.

- query encoder + projection head (MoCo v2: Linear(F, F) - ReLU - Linear(F, dim), F the encoder's
  feature dimension) receive gradients;
- the key encoder + head are a momentum copy, ``requires_grad=False``, updated under ``torch.no_grad``
  as ``theta_k <- m theta_k + (1 - m) theta_q`` at the start of every forward;
- the queue ``(dim, K)`` of negatives and its pointer are registered buffers (saved in the state dict);
  the keys of all ranks are gathered before they are enqueued, so every rank holds the same queue;
- BN of the key encoder: ``"shuffle"`` shuffles the key batch across ranks (a permutation drawn on
  rank 0 and broadcast) and un-shuffles the keys, so a key's BN statistics come from other samples
  than its query's (with one process the shuffle is local); ``"syncbn"`` converts both encoders to
  :class:`~torch.nn.SyncBatchNorm` instead (statistics over the global batch; needs GPUs when more
  than one rank runs).

Optimise :meth:`MoCo.parameters_to_optimize` (query encoder + head). ``model.parameters()`` also
yields the key encoder: its parameters never get a gradient (so SGD skips them), but weight decay
or parameter counts built from ``model.parameters()`` would be wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from sslsky import dist
from sslsky.losses import info_nce
from sslsky.models.encoders import build_encoder

if TYPE_CHECKING:
    from sslsky.config import ModelConfig

BN_MODES = ("shuffle", "syncbn")


def projection_head(feature_dim: int, dim: int, mlp: bool = True) -> nn.Module:
    """MoCo v2 MLP head ``(B, F) -> (B, dim)`` (hidden width F), or one linear layer (MoCo v1) if not ``mlp``."""
    if mlp:
        return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, dim))
    return nn.Linear(feature_dim, dim)


class MoCo(nn.Module):
    """MoCo v2 with a queue of negatives; ``forward(im_q, im_k) -> (loss, top1)``.

    Args:
        arch, in_channels, stem: the encoder (see :func:`sslsky.models.encoders.build_encoder`).
        dim: projection dimension D.
        queue_size: K, the number of negatives; a multiple of the global batch (checked in forward).
        momentum: m of the key-encoder update.
        temperature: T of InfoNCE.
        mlp: MoCo v2 MLP head (else a linear head).
        bn: ``"shuffle"`` (shuffled BN) or ``"syncbn"``.
    """

    def __init__(self, arch: str = "resnet50", in_channels: int = 5, stem: str = "hayat", dim: int = 128,
                 queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2, mlp: bool = True,
                 bn: str = "shuffle"):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if queue_size < 1:
            raise ValueError(f"queue_size (K) must be >= 1, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; choose 'shuffle' (shuffled BN) or 'syncbn'")
        self.dim, self.queue_size, self.momentum, self.temperature, self.bn = dim, queue_size, momentum, temperature, bn

        self.encoder_q = build_encoder(arch, in_channels, stem)
        self.feature_dim: int = self.encoder_q.feature_dim
        self.head_q = projection_head(self.feature_dim, dim, mlp)
        if bn == "syncbn":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # same initial weights as the query encoder
        self.head_k = copy.deepcopy(self.head_q)
        for param in self.key_parameters():
            param.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # (D, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next column to write

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_bands: int | None = None) -> MoCo:
        """Build from a :class:`~sslsky.config.ModelConfig`; ``n_bands`` (from the data) fills ``cfg.n_bands = 0``."""
        bands = cfg.n_bands or n_bands
        if not bands:
            raise ValueError("model.n_bands is 0 and the data gave no band count; set model.n_bands")
        if cfg.n_bands and n_bands and cfg.n_bands != n_bands:
            raise ValueError(f"model.n_bands={cfg.n_bands} but the data have {n_bands} bands; "
                             f"set model.n_bands={n_bands} (or 0 to follow the data)")
        return cls(arch=cfg.arch, in_channels=bands, stem=cfg.stem, dim=cfg.dim, queue_size=cfg.queue_size,
                   momentum=cfg.momentum, temperature=cfg.temperature, mlp=cfg.mlp, bn=cfg.bn)

    # ---- parameters -------------------------------------------------------------------------

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        """Query encoder + query head: what the optimizer gets (the key encoder is a momentum copy)."""
        yield from self.encoder_q.parameters()
        yield from self.head_q.parameters()

    def key_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.encoder_k.parameters()
        yield from self.head_k.parameters()

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The query encoder's weights (no head): what evaluation and export load into :func:`build_encoder`."""
        return {name: t.detach().clone() for name, t in self.encoder_q.state_dict().items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Query-encoder features ``(B, C, H, W) -> (B, feature_dim)`` (before the head), for evaluation."""
        return self.encoder_q(images)

    # ---- MoCo mechanics ---------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` for every key parameter (buffers are the key encoder's own)."""
        q_params = list(self.parameters_to_optimize())
        k_params = list(self.key_parameters())
        torch._foreach_mul_(k_params, self.momentum)
        torch._foreach_add_(k_params, torch._foreach_mul([p.detach() for p in q_params], 1.0 - self.momentum))

    def check_batch(self, global_batch: int) -> None:
        """ValueError unless K is a multiple of the global batch (so an enqueue never straddles the end)."""
        if global_batch < 1 or self.queue_size % global_batch:
            raise ValueError(f"queue_size K={self.queue_size} is not a multiple of the global batch {global_batch} "
                             f"(batch per rank x {dist.world_size()} ranks); pick K = n x {global_batch}")

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Gather ``(B, D)`` keys from all ranks and write them over the oldest queue columns."""
        keys = dist.all_gather_tensor(keys)
        batch = keys.shape[0]
        self.check_batch(batch)
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch) % self.queue_size

    @torch.no_grad()
    def _shuffle(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the globally shuffled batch, and the inverse permutation."""
        gathered = dist.all_gather_tensor(images)  # (world * B, C, H, W)
        world = gathered.shape[0] // images.shape[0]
        perm = torch.randperm(gathered.shape[0], device=images.device)
        if world > 1:
            dist.broadcast_tensor(perm, src=0)  # one permutation for all ranks
        mine = perm.view(world, -1)[dist.rank()]
        return gathered[mine], torch.argsort(perm)

    @torch.no_grad()
    def _unshuffle(self, keys: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        gathered = dist.all_gather_tensor(keys)
        world = gathered.shape[0] // keys.shape[0]
        return gathered[inverse.view(world, -1)[dist.rank()]]

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, D)`` normalised keys of the key encoder (shuffled BN if configured)."""
        if self.bn == "shuffle":
            shuffled, inverse = self._shuffle(im_k)
            k = F.normalize(self.head_k(self.encoder_k(shuffled)), dim=1)
            return self._unshuffle(k, inverse)
        return F.normalize(self.head_k(self.encoder_k(im_k)), dim=1)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``(B, C, H, W)`` -> ``(loss, top1)``; updates the key encoder and the queue (training only).

        In eval mode the key encoder and the queue are left as they are.
        """
        if im_q.shape != im_k.shape:
            raise ValueError(f"the two views differ in shape: {tuple(im_q.shape)} vs {tuple(im_k.shape)}")
        self.check_batch(im_q.shape[0] * dist.world_size())
        if self.bn == "syncbn" and self.training and dist.world_size() > 1 and im_q.device.type == "cpu":
            raise RuntimeError("model.bn=syncbn needs GPUs when more than one rank runs (torch's SyncBatchNorm); "
                               "use model.bn=shuffle on CPU")
        q = F.normalize(self.head_q(self.encoder_q(im_q)), dim=1)  # (B, D)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = self.keys(im_k)  # (B, D)
        loss, top1 = info_nce(q, k, self.queue.clone(), self.temperature)
        if self.training:
            self.enqueue(k)
        return loss, top1
