"""``method: byol``: BYOL (Grill et al. 2020).

- online network = encoder + projector MLP + predictor MLP (``Linear - BN - ReLU - Linear``) receive gradients;
- target network = a copy of the online encoder + projector, ``requires_grad=False``, updated after every
  optimizer step (:meth:`BYOL.after_step`) as ``theta_t <- m theta_t + (1 - m) theta_o``, with ``m`` from
  :func:`sslsky.schedules.cosine_momentum` (``base_momentum`` -> 1 over the run), so a resume needs only
  the step;
- loss: symmetric ``L = mean(2 - 2 cos(q(v1), z_t(v2))) + mean(2 - 2 cos(q(v2), z_t(v1)))`` in [0, 8];
- the metric ``acc`` is the in-batch top-1: how often a prediction's nearest target projection (cosine,
  this rank's batch) is that of its own pair.

State-dict keys (``online_encoder.*``, ``online_projector.*``, ``predictor.*``, ``target_*``) are those of
checkpoints written before the method contract.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from sslsky.losses import byol_loss
from sslsky.methods.base import Method, check_views, ema_update
from sslsky.models.projection import bn_mlp
from sslsky.schedules import cosine_momentum

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig


class BYOL(Method):
    """BYOL; ``forward(batch) -> (loss, {"acc": top1})``.

    Args:
        encoder: the online encoder (the target encoder starts as a copy of it).
        dim: projection dimension D (BYOL: 256).
        hidden: hidden width of the projector and predictor (BYOL: 4096).
        base_momentum: initial EMA momentum (BYOL: 0.996 for long ImageNet runs; 0.99 here).
    """

    section = "byol"
    shape_keys = ("model.byol.dim", "model.byol.hidden")

    def __init__(self, encoder: nn.Module, dim: int = 256, hidden: int = 4096, base_momentum: float = 0.99):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must lie in [0, 1], got {base_momentum}")
        self.dim, self.hidden, self.base_momentum = dim, hidden, base_momentum
        self.momentum = base_momentum  # of the next update; after_step sets it from the step
        self.online_encoder = encoder
        self.feature_dim: int = encoder.feature_dim
        self.online_projector = bn_mlp(self.feature_dim, hidden, dim)
        self.predictor = bn_mlp(dim, hidden, dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)  # same initial weights
        self.target_projector = copy.deepcopy(self.online_projector)
        for param in self.target_parameters():
            param.requires_grad = False

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes=None, data=None) -> BYOL:
        b = cfg.model.byol
        return cls(encoder, dim=b.dim, hidden=b.hidden, base_momentum=b.base_momentum)

    @property
    def encoder(self) -> nn.Module:
        return self.online_encoder

    # ---- parameters -------------------------------------------------------------------------

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        """Online encoder, projector and predictor (the target network is an EMA copy)."""
        yield from self.online_encoder.parameters()
        yield from self.online_projector.parameters()
        yield from self.predictor.parameters()

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """Online encoder + projector, in the order of :meth:`target_parameters`."""
        yield from self.online_encoder.parameters()
        yield from self.online_projector.parameters()

    def target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_encoder.parameters()
        yield from self.target_projector.parameters()

    # ---- BYOL mechanics -----------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_t <- m theta_t + (1 - m) theta_o`` with ``m = self.momentum`` (BN buffers are the target's own)."""
        ema_update(self.target_parameters(), self.online_parameters(), self.momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """The EMA step of the target network, with the momentum of the cosine schedule at ``step``."""
        self.momentum = cosine_momentum(step, self.base_momentum, total_steps)
        self.momentum_update()

    def byol_forward(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """``(loss, top1, (features1, features2))``: the BYOL loss and the online features ``(B, F)`` of each view."""
        f1, f2 = self.online_encoder(view1), self.online_encoder(view2)  # (B, F)
        p1, p2 = self.predictor(self.online_projector(f1)), self.predictor(self.online_projector(f2))  # (B, D)
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(view1))  # (B, D)
            z2 = self.target_projector(self.target_encoder(view2))
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        with torch.no_grad():
            sim = F.normalize(p1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T  # (B, B)
            top1 = (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean()
        return loss, top1, (f1, f2)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Two views -> ``(loss, {"acc": top1})``."""
        loss, top1, _ = self.byol_forward(*check_views(batch))
        return loss, {"acc": top1}
