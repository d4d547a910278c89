"""``method: simclr``: SimCLR (Chen et al. 2020), the contrastive learner of Wei et al. 2022.

One encoder and a 2-layer projection MLP (``Linear(F, hidden) - ReLU - Linear(hidden, dim)``, hidden F by
default) map both views to ``z1, z2``; the loss is NT-Xent (:func:`sslsky.losses.nt_xent`): each of the 2B
projections against its other view and every other projection of the batch, at ``model.simclr.temperature``
(0.1, as Wei et al.). Under DDP the candidates are gathered from every rank with the gradient flowing back
to each rank's own part, so 2 ranks compute the loss and update of one process with the combined batch
(exactly so when the encoder has no BatchNorm, e.g. ``model.arch: vit``; BN layers see their rank's batch).
No momentum encoder, no queue: nothing happens after the step. With ``model.arch: fusion`` this is the
system of Wei et al. 2022 (their optimizer was Adam; SGD with the cosine schedule here, as for every method).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from sslsky.losses import nt_xent
from sslsky.methods.base import Method, check_views
from sslsky.models.projection import projection_head

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig


class SimCLR(Method):
    """SimCLR; ``forward(batch) -> (loss, {"acc": top1})`` (top1: anchors whose positive has the highest logit).

    Args:
        encoder: the encoder.
        dim: projection dimension.
        hidden: hidden width of the projection MLP (0: the encoder's feature dimension).
        temperature: NT-Xent temperature.
    """

    section = "simclr"
    shape_keys = ("model.simclr.dim", "model.simclr.hidden")

    def __init__(self, encoder: nn.Module, dim: int = 128, hidden: int = 0, temperature: float = 0.1):
        super().__init__()
        if dim < 1 or hidden < 0:
            raise ValueError(f"dim must be >= 1 and hidden >= 0, got dim={dim}, hidden={hidden}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.backbone = encoder
        self.feature_dim: int = encoder.feature_dim
        self.head = projection_head(self.feature_dim, dim, hidden=hidden)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes=None, data=None) -> SimCLR:
        s = cfg.model.simclr
        return cls(encoder, dim=s.dim, hidden=s.hidden, temperature=s.temperature)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = check_views(batch)
        z1, z2 = self.head(self.backbone(view1)), self.head(self.backbone(view2))
        loss, top1 = nt_xent(z1, z2, self.temperature)
        return loss, {"acc": top1}
