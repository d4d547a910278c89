"""``method: hybrid``: BYOL plus the volunteer-vote loss (Walmsley et al. 2022).

A vote head (:class:`~sslsky.methods.votes.VoteHead`) on the online encoder features predicts Dirichlet
concentrations for every answer; the vote loss is the Dirichlet-multinomial NLL (both views averaged) over
the *labelled* galaxies (any vote) of the global batch, and

    L = L_BYOL + w * (|L_BYOL| / L_votes).detach() * L_votes

so the vote term has the size of the BYOL term times w (``votes.weight``) whatever the number of
volunteers. Across ranks the vote mean and the ratio are global (counts and losses are gathered), so the
mean of the per-rank losses and the DDP-averaged gradients equal those of one process on the whole batch.
BYOL reads ``model.byol``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sslsky import dist
from sslsky.methods.base import check_views
from sslsky.methods.byol import BYOL
from sslsky.methods.votes import VoteHead

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig
    from sslsky.vocabulary import VoteSchema


class HybridBYOL(VoteHead, BYOL):
    """BYOL + a Dirichlet-multinomial vote head; ``forward(batch) -> (loss, metrics)``.

    Args:
        encoder: the online encoder.
        question_slices: Q ``(start, stop)`` column ranges of the questions in the vote counts
            (:class:`~sslsky.vocabulary.VoteSchema`); the head has one output per column.
        vote_weight: w of the hybrid loss.
        other arguments: as :class:`~sslsky.methods.byol.BYOL`.

    Metrics: ``acc`` (BYOL's in-batch top-1) and the global (all-rank) ``loss_byol``, ``loss_votes`` (mean
    over labelled galaxies), ``vote_scale`` ``(|L_BYOL| / L_votes)`` and ``labelled`` (count).
    """

    batch_keys = ("votes",)
    shape_keys = ("model.byol.dim", "model.byol.hidden", "votes.campaigns")
    reads = ("votes.weight",)

    def __init__(self, encoder: nn.Module, question_slices: Sequence[tuple[int, int]], vote_weight: float = 1.0,
                 **byol_kwargs):
        super().__init__(encoder, **byol_kwargs)
        if not vote_weight >= 0:
            raise ValueError(f"vote_weight must be >= 0, got {vote_weight}")
        self.init_vote_head(question_slices, self.feature_dim)
        self.vote_weight = vote_weight

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes: VoteSchema | None = None,
                    data=None) -> HybridBYOL:
        b = cfg.model.byol
        return cls(encoder, votes.slices, vote_weight=cfg.votes.weight, dim=b.dim, hidden=b.hidden,
                   base_momentum=b.base_momentum)

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        yield from super().parameters_to_optimize()
        yield from self.vote_head.parameters()

    @staticmethod
    def combine(l_byol: Tensor, nll: Tensor, labelled: Tensor, weight: float) -> tuple[Tensor, dict[str, Tensor]]:
        """This rank's hybrid loss from its BYOL loss, per-galaxy vote NLL ``(B,)`` and labelled mask ``(B,)``.

        ``L_votes`` is the mean NLL over the labelled galaxies of all ranks (this rank's share, times the
        world size, so that DDP's average over ranks gives the global mean); the ratio uses the global
        losses and carries no gradient. No labelled galaxy anywhere: ``L_votes = 0`` and ``L = L_BYOL``.
        """
        world = dist.world_size()
        nll_sum = torch.where(labelled, nll, torch.zeros_like(nll)).sum()
        local = torch.stack([l_byol.detach().float(), nll_sum.detach(), labelled.sum().float()]).view(1, 3)
        total = dist.all_gather_tensor(local).sum(dim=0)  # (3,): sum of L_BYOL, sum of NLL, labelled count
        g_byol, g_votes = total[0] / world, total[1] / total[2].clamp(min=1)
        l_votes = world * nll_sum / total[2].clamp(min=1)
        scale = torch.where(g_votes > 0, g_byol.abs() / g_votes.clamp(min=torch.finfo(torch.float32).tiny),
                            torch.zeros_like(g_votes)).detach()
        loss = l_byol + weight * scale * l_votes
        return loss, {"loss_byol": g_byol, "loss_votes": g_votes, "vote_scale": scale, "labelled": total[2]}

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = check_views(batch)
        votes = batch.get("votes")
        self.check_votes(votes, view1.shape[0])
        l_byol, top1, (f1, f2) = self.byol_forward(view1, view2)
        nll = 0.5 * (self.vote_nll(f1, votes) + self.vote_nll(f2, votes))  # (B,)
        labelled = votes.sum(dim=1) > 0
        loss, terms = self.combine(l_byol, nll, labelled, self.vote_weight)
        return loss, {"acc": top1, **terms}
