"""``method: moco``: MoCo v2 (He et al. 2020; Chen et al. 2020), after facebookresearch/moco ``builder.py``.

- query encoder + projection head (MoCo v2: Linear(F, F) - ReLU - Linear(F, dim), F the encoder's
  feature dimension) receive gradients;
- the key encoder + head are a momentum copy, ``requires_grad=False``, updated after every optimizer
  step (:meth:`MoCo.after_step`) as ``theta_k <- m theta_k + (1 - m) theta_q``;
- the queue ``(dim, K)`` of negatives and its pointer are registered buffers (saved in the state dict);
  a step's keys, gathered from all ranks, are enqueued after the step, so every rank holds the same queue;
- BN of the key encoder: ``"shuffle"`` shuffles the key batch across ranks (a permutation drawn on
  rank 0 and broadcast) and un-shuffles the keys, so a key's BN statistics come from other samples
  than its query's (with one process the shuffle is local); ``"syncbn"`` converts both encoders to
  :class:`~torch.nn.SyncBatchNorm` instead (statistics over the global batch; needs GPUs when more
  than one rank runs).

The state-dict keys (``encoder_q.*``, ``head_q.*``, ``encoder_k.*``, ``head_k.*``, ``queue``, ``queue_ptr``)
are those of the checkpoints written before the method contract, so those still load and resume.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from sslsky import dist
from sslsky.losses import info_nce
from sslsky.methods.base import Method, check_views, ema_update
from sslsky.models.projection import projection_head

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig

BN_MODES = ("shuffle", "syncbn")


class MoCo(Method):
    """MoCo v2 with a queue of negatives; ``forward(batch) -> (loss, {"acc": top1})``.

    Args:
        encoder: the query encoder (the key encoder starts as a copy of it).
        dim: projection dimension D.
        queue_size: K, the number of negatives; a multiple of the global batch (:meth:`check_batch`).
        momentum: m of the key-encoder update.
        temperature: T of InfoNCE.
        mlp: MoCo v2 MLP head (else a linear head).
        bn: ``"shuffle"`` (shuffled BN) or ``"syncbn"``.
    """

    section = "moco"
    shape_keys = ("model.moco.dim", "model.moco.queue_size", "model.moco.mlp")

    def __init__(self, encoder: nn.Module, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, mlp: bool = True, bn: str = "shuffle"):
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

        self.encoder_q = encoder
        self.feature_dim: int = encoder.feature_dim
        self.head_q = projection_head(self.feature_dim, dim, mlp=mlp)
        if bn == "syncbn":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # same initial weights as the query encoder
        self.head_k = copy.deepcopy(self.head_q)
        for param in self.key_parameters():
            param.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # (D, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next column to write
        self._keys: Tensor | None = None  # this step's keys, enqueued by after_step

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes=None, data=None) -> MoCo:
        m = cfg.model.moco
        return cls(encoder, dim=m.dim, queue_size=m.queue_size, momentum=m.momentum, temperature=m.temperature,
                   mlp=m.mlp, bn=m.bn)

    @property
    def encoder(self) -> nn.Module:
        return self.encoder_q

    # ---- parameters -------------------------------------------------------------------------

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        """Query encoder + query head: what the optimizer gets (the key encoder is a momentum copy)."""
        yield from self.encoder_q.parameters()
        yield from self.head_q.parameters()

    def key_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.encoder_k.parameters()
        yield from self.head_k.parameters()

    # ---- MoCo mechanics ---------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` for every key parameter (buffers are the key encoder's own)."""
        ema_update(self.key_parameters(), self.parameters_to_optimize(), self.momentum)

    def check_batch(self, global_batch: int) -> None:
        """ValueError unless K is a multiple of the global batch (so an enqueue never straddles the end)."""
        if global_batch < 1 or self.queue_size % global_batch:
            raise ValueError(f"model.moco.queue_size K={self.queue_size} is not a multiple of the global batch "
                             f"{global_batch} (batch per rank x {dist.world_size()} ranks); pick K = n x "
                             f"{global_batch}")

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Gather ``(B, D)`` keys from all ranks and write them over the oldest queue columns."""
        keys = dist.all_gather_tensor(keys)
        batch = keys.shape[0]
        self.check_batch(batch)
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch) % self.queue_size

    @torch.no_grad()
    def _shuffle(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's share of the globally shuffled batch, and the inverse permutation."""
        gathered = dist.all_gather_tensor(images)  # (world * B, C, H, W)
        world = gathered.shape[0] // images.shape[0]
        perm = torch.randperm(gathered.shape[0], device=images.device)
        if world > 1:
            dist.broadcast_tensor(perm, src=0)  # one permutation for all ranks
        mine = perm.view(world, -1)[dist.rank()]
        return gathered[mine], torch.argsort(perm)

    @torch.no_grad()
    def _unshuffle(self, keys: Tensor, inverse: Tensor) -> Tensor:
        gathered = dist.all_gather_tensor(keys)
        world = gathered.shape[0] // keys.shape[0]
        return gathered[inverse.view(world, -1)[dist.rank()]]

    @torch.no_grad()
    def keys(self, im_k: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, D)`` normalised keys of the key encoder (shuffled BN if configured)."""
        if self.bn == "shuffle":
            shuffled, inverse = self._shuffle(im_k)
            k = F.normalize(self.head_k(self.encoder_k(shuffled)), dim=1)
            return self._unshuffle(k, inverse)
        return F.normalize(self.head_k(self.encoder_k(im_k)), dim=1)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Views ``view1`` (queries) and ``view2`` (keys) -> ``(loss, {"acc": top1})``; in training mode the keys
        are kept for :meth:`after_step` to enqueue."""
        im_q, im_k = check_views(batch)
        self.check_batch(im_q.shape[0] * dist.world_size())
        if self.bn == "syncbn" and self.training and dist.world_size() > 1 and im_q.device.type == "cpu":
            raise RuntimeError("model.moco.bn=syncbn needs GPUs when more than one rank runs (torch's SyncBatchNorm); "
                               "use model.moco.bn=shuffle on CPU")
        q = F.normalize(self.head_q(self.encoder_q(im_q)), dim=1)  # (B, D)
        k = self.keys(im_k)  # (B, D), no gradient
        loss, top1 = info_nce(q, k, self.queue.clone(), self.temperature)
        if self.training:
            self._keys = k
        return loss, {"acc": top1}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Enqueue the step's keys, then move the key encoder towards the updated query encoder."""
        if self._keys is not None:
            self.enqueue(self._keys)
            self._keys = None
        self.momentum_update()
