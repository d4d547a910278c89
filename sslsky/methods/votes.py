"""``method: votes``: the volunteer-vote loss alone, the supervised baseline of Walmsley et al. 2022 (Zoobot).

The encoder and a vote head predict Dirichlet concentrations ``1 + 100 sigmoid(Linear(features))`` in
(1, 101) for every answer of ``votes.campaigns``; the loss is the Dirichlet-multinomial NLL
(:func:`sslsky.losses.dirichlet_multinomial_nll`) averaged over both augmented views and over the labelled
galaxies of the global batch -- exactly the hybrid's ``L_votes`` (:mod:`sslsky.methods.hybrid`), so votes
only versus hybrid isolates the BYOL term, at the cost of a second forward pass per step. Only galaxies
with votes are drawn (:meth:`VoteModel.draws`).

:class:`VoteHead` is the head both methods share. The encoder is ``online_encoder`` (as in BYOL), the head
``vote_head``: the state-dict keys of checkpoints written before the method contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sslsky import dist
from sslsky.losses import dirichlet_multinomial_nll
from sslsky.methods.base import Method, check_views

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig
    from sslsky.vocabulary import VoteSchema

#: Vote-head concentrations lie in (CONCENTRATION_MIN, CONCENTRATION_MIN + CONCENTRATION_RANGE).
CONCENTRATION_MIN = 1.0
CONCENTRATION_RANGE = 100.0


class VoteHead:
    """The vote head of :class:`~sslsky.methods.hybrid.HybridBYOL` and :class:`VoteModel` (a mixin):
    ``vote_head = Linear(F, A)`` -> concentrations.

    Call :meth:`init_vote_head` in ``__init__`` (after ``nn.Module.__init__``).
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

    def check_votes(self, votes: Tensor | None, batch: int) -> None:
        if votes is None:
            raise ValueError(f"the {type(self).__name__} method needs the batch's vote counts (batch['votes'])")
        if votes.dim() != 2 or votes.shape != (batch, self.n_answers):
            raise ValueError(f"votes must be (B, A) = ({batch}, {self.n_answers}), got {tuple(votes.shape)}")

    def concentrations(self, features: Tensor) -> Tensor:
        """``(B, F)`` features -> ``(B, A)`` Dirichlet concentrations in (1, 101), float32."""
        return CONCENTRATION_MIN + CONCENTRATION_RANGE * torch.sigmoid(self.vote_head(features).float())

    def concentration_nll(self, concentrations: Tensor, votes: Tensor) -> Tensor:
        """``(B,)`` per-galaxy Dirichlet-multinomial NLL of ``(B, A)`` concentrations (0 for a galaxy without votes)."""
        return dirichlet_multinomial_nll(concentrations, votes, self.question_slices, reduction="none")

    def vote_nll(self, features: Tensor, votes: Tensor) -> Tensor:
        """``(B,)`` per-galaxy Dirichlet-multinomial NLL (0 for a galaxy without votes)."""
        return self.concentration_nll(self.concentrations(features), votes)

    def first_answer_hits(self, concentrations: Tensor, votes: Tensor) -> tuple[Tensor, Tensor]:
        """``(hits, asked)``: of the galaxies with votes on the first question, how many have its most-voted answer
        (first on ties) equal to the answer of the largest predicted concentration (= expected vote fraction)."""
        start, stop = self.question_slices[0]
        k = votes[:, start:stop]  # (B, A_0)
        asked = k.sum(dim=1) > 0
        hits = (concentrations[:, start:stop].argmax(dim=1) == k.argmax(dim=1)) & asked
        return hits.sum().float(), asked.sum().float()

    @torch.no_grad()
    def held_out_votes(self, batches: Iterable[dict[str, Tensor]], eval_view: Callable[[Tensor], Tensor]
                       ) -> dict[str, float]:
        """Held-out vote NLL (mean over the galaxies) and first-question answer accuracy, on the centred eval view."""
        nll_sum, count, hits, asked = 0.0, 0, 0.0, 0.0
        for batch in batches:
            concentrations = self.concentrations(self.embed(eval_view(batch["image"])))  # (B, A)
            nll_sum += self.concentration_nll(concentrations, batch["votes"]).sum().item()
            count += len(concentrations)
            h, a = self.first_answer_hits(concentrations, batch["votes"])
            hits, asked = hits + h.item(), asked + a.item()
        return {"val_loss_votes": nll_sum / max(1, count), "val_vote_acc": hits / max(1.0, asked)}


class VoteModel(VoteHead, Method):
    """Votes only: encoder + vote head; ``forward(batch) -> (loss, {"vote_acc", "loss_votes", "labelled"})``.

    ``loss``: mean NLL over the labelled galaxies (any vote) of the global batch. Its value is that global
    mean on every rank; its gradient is this rank's share times the world size, so DDP's average gives the
    gradient of the global mean (as one process on the whole batch). ``vote_acc``: over the galaxies of the
    global batch with votes on the first question, how often the most-voted answer is the one with the
    largest predicted concentration (:meth:`first_answer_hits`); ``loss_votes`` and ``labelled`` (count)
    are global.

    Args:
        question_slices: Q ``(start, stop)`` column ranges of the questions in the vote counts
            (:class:`~sslsky.vocabulary.VoteSchema`); the head has one output per column.
        encoder: the encoder.
    """

    batch_keys = ("votes",)
    shape_keys = ("votes.campaigns",)

    @classmethod
    def draws(cls, cfg: PretrainConfig) -> str:
        return "votes"  # a supervised method: the others would add nothing to the loss

    def __init__(self, encoder: nn.Module, question_slices: Sequence[tuple[int, int]]):
        super().__init__()
        self.online_encoder = encoder
        self.feature_dim: int = encoder.feature_dim
        self.init_vote_head(question_slices, self.feature_dim)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes: VoteSchema | None = None,
                    data=None) -> VoteModel:
        return cls(encoder, votes.slices)

    @property
    def encoder(self) -> nn.Module:
        return self.online_encoder

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = check_views(batch)
        votes = batch.get("votes")
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
        return loss, {"vote_acc": total[2] / total[3].clamp(min=1), "loss_votes": g_votes, "labelled": total[1]}

    def held_out(self, batches, eval_view) -> dict[str, float]:
        return self.held_out_votes(batches, eval_view)

    @staticmethod
    def describe(record: dict[str, float]) -> str:
        return f"val vote NLL {record['val_loss_votes']:.3f}, first-answer accuracy {record['val_vote_acc']:.3f}"
