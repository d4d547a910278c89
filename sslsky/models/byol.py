"""BYOL (Grill et al. 2020), the hybrid BYOL + vote-count model and the votes-only model (Walmsley et al. 2022).

BYOL:

- online network = encoder + projector MLP + predictor MLP (``Linear - BN - ReLU - Linear``) receive gradients;
- target network = a copy of the online encoder + projector, ``requires_grad=False``, updated under
  ``torch.no_grad`` at the start of every training forward as ``theta_t <- m theta_t + (1 - m) theta_o``.
  ``m`` is the attribute :attr:`BYOL.momentum`; the trainer sets it every step from
  :func:`sslsky.train.schedules.cosine_momentum` (``base_momentum`` -> 1), so a resume needs only the step;
- loss: symmetric ``L = mean(2 - 2 cos(q(v1), z_t(v2))) + mean(2 - 2 cos(q(v2), z_t(v1)))`` in [0, 8];
- the metric returned with the loss is the in-batch top-1: how often a prediction's nearest target
  projection (cosine, this rank's batch) is that of its own pair.

Hybrid: BYOL plus a vote head on the online encoder features predicting Dirichlet concentrations
``1 + 100 sigmoid(Linear(features))`` in (1, 101) for every answer; the vote loss is the
Dirichlet-multinomial NLL (:func:`sslsky.losses.dirichlet_multinomial_nll`, both views averaged) over the
*labelled* galaxies (any vote) of the global batch, and

    L = L_BYOL + w * (|L_BYOL| / L_votes).detach() * L_votes

so the vote term has the size of the BYOL term times w whatever the number of volunteers. Across ranks
the vote mean and the ratio are global (counts and losses are gathered), so the mean of the per-rank losses
and the DDP-averaged gradients equal those of one process on the whole batch.

Votes only (:class:`VoteModel`, ``method: votes``): the supervised baseline of Walmsley et al. 2022 (Zoobot)
-- the same encoder and the same vote head (:class:`VoteHeadMixin`, shared with the hybrid) and no BYOL: the
loss is the Dirichlet-multinomial NLL averaged over both augmented views and over the labelled galaxies of
the global batch, exactly the hybrid's ``L_votes``, so that votes-only versus hybrid isolates the BYOL term.

Optimise ``model.parameters_to_optimize()``; for BYOL and the hybrid ``model.parameters()`` also yields the
target network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from sslsky import dist
from sslsky.losses import byol_loss, dirichlet_multinomial_nll
from sslsky.models.encoders import build_encoder

if TYPE_CHECKING:
    from sslsky.config import ModelConfig

#: Vote-head concentrations lie in (CONCENTRATION_MIN, CONCENTRATION_MIN + CONCENTRATION_RANGE).
CONCENTRATION_MIN = 1.0
CONCENTRATION_RANGE = 100.0


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """BYOL projector / predictor ``(B, in_dim) -> (B, out_dim)``: Linear - BN - ReLU - Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def _bands(cfg: ModelConfig, n_bands: int | None) -> int:
    bands = cfg.n_bands or n_bands
    if not bands:
        raise ValueError("model.n_bands is 0 and the data gave no band count; set model.n_bands")
    if cfg.n_bands and n_bands and cfg.n_bands != n_bands:
        raise ValueError(f"model.n_bands={cfg.n_bands} but the data have {n_bands} bands; "
                         f"set model.n_bands={n_bands} (or 0 to follow the data)")
    return bands


class BYOL(nn.Module):
    """BYOL; ``forward(view1, view2) -> (loss, top1)``.

    Args:
        arch, in_channels, stem: the encoder (see :func:`sslsky.models.encoders.build_encoder`).
        dim: projection dimension D (BYOL: 256).
        hidden: hidden width of the projector and predictor (BYOL: 4096).
        base_momentum: initial EMA momentum (BYOL: 0.996 for long ImageNet runs; 0.99 here).
    """

    def __init__(self, arch: str = "resnet50", in_channels: int = 5, stem: str = "hayat", dim: int = 256,
                 hidden: int = 4096, base_momentum: float = 0.99):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must lie in [0, 1], got {base_momentum}")
        self.dim, self.hidden, self.base_momentum = dim, hidden, base_momentum
        self.momentum = base_momentum  # of the next update; the trainer sets it from the step
        self.online_encoder = build_encoder(arch, in_channels, stem)
        self.feature_dim: int = self.online_encoder.feature_dim
        self.online_projector = mlp(self.feature_dim, hidden, dim)
        self.predictor = mlp(dim, hidden, dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)  # same initial weights
        self.target_projector = copy.deepcopy(self.online_projector)
        for param in self.target_parameters():
            param.requires_grad = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_bands: int | None = None) -> BYOL:
        """Build from a :class:`~sslsky.config.ModelConfig` (``arch``, ``stem``, ``dim``, ``byol_*``)."""
        return cls(arch=cfg.arch, in_channels=_bands(cfg, n_bands), stem=cfg.stem, dim=cfg.dim,
                   hidden=cfg.byol_hidden, base_momentum=cfg.byol_base_momentum)

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

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The online encoder's weights (no heads): what evaluation and export load into :func:`build_encoder`."""
        return {name: t.detach().clone() for name, t in self.online_encoder.state_dict().items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Online-encoder features ``(B, C, H, W) -> (B, feature_dim)``, for evaluation."""
        return self.online_encoder(images)

    # ---- BYOL mechanics -----------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_t <- m theta_t + (1 - m) theta_o`` with ``m = self.momentum`` (BN buffers are the target's own)."""
        online, target = list(self.online_parameters()), list(self.target_parameters())
        torch._foreach_mul_(target, self.momentum)
        torch._foreach_add_(target, torch._foreach_mul([p.detach() for p in online], 1.0 - self.momentum))

    def byol_forward(self, view1: torch.Tensor, view2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(loss, top1, (features1, features2))``: the BYOL loss and the online features ``(B, F)`` of each view.

        Updates the target network first when training (in eval mode it is left as it is).
        """
        if view1.shape != view2.shape:
            raise ValueError(f"the two views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        if self.training:
            self.momentum_update()
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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``(B, C, H, W)`` -> ``(loss, top1)``; updates the target network (training only)."""
        loss, top1, _ = self.byol_forward(view1, view2)
        return loss, top1


class VoteHeadMixin:
    """The vote head of :class:`HybridBYOL` and :class:`VoteModel`: ``vote_head = Linear(F, A)`` -> concentrations.

    Call :meth:`init_vote_head` in ``__init__`` (after ``nn.Module.__init__``); the head's weights are the
    ``vote_head.*`` entries of the state dict for both models.
    """

    question_slices: list[tuple[int, int]]
    n_answers: int
    vote_head: nn.Linear

    def init_vote_head(self, question_slices: Sequence[tuple[int, int]], feature_dim: int) -> None:
        slices = [tuple(s) for s in question_slices]
        if not slices or any(len(s) != 2 or s[1] - s[0] < 1 for s in slices):
            raise ValueError(f"question_slices must be non-empty (start, stop) pairs, got {question_slices}")
        self.question_slices = slices
        self.n_answers = max(stop for _, stop in slices)
        self.vote_head = nn.Linear(feature_dim, self.n_answers)

    def check_votes(self, votes: torch.Tensor | None, batch: int) -> None:
        if votes is None:
            raise ValueError(f"the {type(self).__name__} model needs the batch's vote counts: "
                             f"forward(view1, view2, votes)")
        if votes.dim() != 2 or votes.shape != (batch, self.n_answers):
            raise ValueError(f"votes must be (B, A) = ({batch}, {self.n_answers}), got {tuple(votes.shape)}")

    def concentrations(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` online features -> ``(B, A)`` Dirichlet concentrations in (1, 101), float32."""
        return CONCENTRATION_MIN + CONCENTRATION_RANGE * torch.sigmoid(self.vote_head(features).float())

    def concentration_nll(self, concentrations: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-galaxy Dirichlet-multinomial NLL of ``(B, A)`` concentrations (0 for a galaxy without votes)."""
        return dirichlet_multinomial_nll(concentrations, votes, self.question_slices, reduction="none")

    def vote_nll(self, features: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-galaxy Dirichlet-multinomial NLL (0 for a galaxy without votes)."""
        return self.concentration_nll(self.concentrations(features), votes)

    def first_answer_hits(self, concentrations: torch.Tensor, votes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hits, asked)``: of the galaxies with votes on the first question, how many have its most-voted answer
        (first on ties) equal to the answer of the largest predicted concentration (= expected vote fraction)."""
        start, stop = self.question_slices[0]
        k = votes[:, start:stop]  # (B, A_0)
        asked = k.sum(dim=1) > 0
        hits = (concentrations[:, start:stop].argmax(dim=1) == k.argmax(dim=1)) & asked
        return hits.sum().float(), asked.sum().float()


class HybridBYOL(VoteHeadMixin, BYOL):
    """BYOL + a Dirichlet-multinomial vote head; ``forward(view1, view2, votes) -> (loss, top1)``.

    Args:
        question_slices: Q ``(start, stop)`` column ranges of the questions in ``votes`` (see
            :class:`sslsky.data.votes.VoteSchema`); the head has one output per column.
        vote_weight: w of the hybrid loss.
        other arguments: as :class:`BYOL`.

    After each forward, :attr:`terms` holds the global (all-rank) ``loss_byol``, ``loss_votes`` (mean over
    labelled galaxies), ``vote_scale`` ``(|L_BYOL| / L_votes)`` and ``labelled`` (count), detached.
    """

    def __init__(self, question_slices: Sequence[tuple[int, int]], vote_weight: float = 1.0, **byol_kwargs):
        super().__init__(**byol_kwargs)
        if not vote_weight >= 0:
            raise ValueError(f"vote_weight must be >= 0, got {vote_weight}")
        self.init_vote_head(question_slices, self.feature_dim)
        self.vote_weight = vote_weight
        self.terms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_bands: int | None = None, question_slices=(),
                    vote_weight: float = 1.0) -> HybridBYOL:
        return cls(question_slices=question_slices, vote_weight=vote_weight, arch=cfg.arch,
                   in_channels=_bands(cfg, n_bands), stem=cfg.stem, dim=cfg.dim, hidden=cfg.byol_hidden,
                   base_momentum=cfg.byol_base_momentum)

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        yield from super().parameters_to_optimize()
        yield from self.vote_head.parameters()

    @staticmethod
    def combine(l_byol: torch.Tensor, nll: torch.Tensor, labelled: torch.Tensor, weight: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, votes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``(B, C, H, W)`` and their galaxies' vote counts ``(B, A)`` -> ``(loss, top1)``."""
        self.check_votes(votes, view1.shape[0])
        l_byol, top1, (f1, f2) = self.byol_forward(view1, view2)
        nll = 0.5 * (self.vote_nll(f1, votes) + self.vote_nll(f2, votes))  # (B,)
        labelled = votes.sum(dim=1) > 0
        loss, self.terms = self.combine(l_byol, nll, labelled, self.vote_weight)
        return loss, top1


class VoteModel(VoteHeadMixin, nn.Module):
    """Votes only: encoder + vote head; ``forward(view1, view2, votes) -> (loss, answer_accuracy)``.

    The supervised Dirichlet-multinomial baseline of Walmsley et al. 2022. Both augmented views go through
    the encoder and their per-galaxy NLLs are averaged (as in :class:`HybridBYOL`): the vote term and the
    augmentation are then those of the hybrid, so comparing the two isolates the BYOL term, at the cost of
    a second forward pass per step.

    ``loss``: mean NLL over the labelled galaxies (any vote) of the global batch. Its value is that global
    mean on every rank; its gradient is this rank's share times the world size, so DDP's average gives the
    gradient of the global mean (as one process on the whole batch). ``answer_accuracy``: over the galaxies
    of the global batch with votes on the first question, how often the most-voted answer is the one with
    the largest predicted concentration (see :meth:`first_answer_hits`). :attr:`terms` holds the global
    ``loss_votes`` and ``labelled`` (count), detached.

    The encoder is ``online_encoder`` (as in BYOL), so training checkpoints load for evaluation through the
    same key prefix (:data:`sslsky.eval.encoders.CHECKPOINT_ENCODERS`).

    Args:
        question_slices: as :class:`HybridBYOL`.
        arch, in_channels, stem: the encoder (see :func:`sslsky.models.encoders.build_encoder`).
    """

    def __init__(self, question_slices: Sequence[tuple[int, int]], arch: str = "resnet50", in_channels: int = 5,
                 stem: str = "hayat"):
        super().__init__()
        self.online_encoder = build_encoder(arch, in_channels, stem)
        self.feature_dim: int = self.online_encoder.feature_dim
        self.init_vote_head(question_slices, self.feature_dim)
        self.terms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_bands: int | None = None, question_slices=()) -> VoteModel:
        """Build from a :class:`~sslsky.config.ModelConfig` (``arch``, ``stem``; the BYOL/MoCo fields are unused)."""
        return cls(question_slices=question_slices, arch=cfg.arch, in_channels=_bands(cfg, n_bands), stem=cfg.stem)

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights (no head): what evaluation and export load into :func:`build_encoder`."""
        return {name: t.detach().clone() for name, t in self.online_encoder.state_dict().items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features ``(B, C, H, W) -> (B, feature_dim)``, for evaluation."""
        return self.online_encoder(images)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, votes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``(B, C, H, W)`` and their galaxies' vote counts ``(B, A)`` -> ``(loss, answer_accuracy)``."""
        if view1.shape != view2.shape:
            raise ValueError(f"the two views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        self.check_votes(votes, view1.shape[0])
        c1 = self.concentrations(self.online_encoder(view1))  # (B, A)
        c2 = self.concentrations(self.online_encoder(view2))
        nll = 0.5 * (self.concentration_nll(c1, votes) + self.concentration_nll(c2, votes))  # (B,)
        labelled = votes.sum(dim=1) > 0
        nll_sum = torch.where(labelled, nll, torch.zeros_like(nll)).sum()
        with torch.no_grad():
            hits, asked = self.first_answer_hits(c1 + c2, votes)  # the views' mean prediction
        local = torch.stack([nll_sum.detach(), labelled.sum().float(), hits, asked]).view(1, 4)
        total = dist.all_gather_tensor(local).sum(dim=0)  # (4,): NLL sum, labelled, hits, asked over all ranks
        count = total[1].clamp(min=1)
        g_votes = total[0] / count
        share = dist.world_size() * nll_sum / count  # DDP averages the ranks' gradients -> global mean's
        loss = share + (g_votes - share).detach()  # value: the global mean, the same on every rank
        self.terms = {"loss_votes": g_votes, "labelled": total[1]}
        return loss, total[2] / total[3].clamp(min=1)
