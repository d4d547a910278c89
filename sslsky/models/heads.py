"""Supervised heads on encoder features: linear or a small MLP.

Both start with :class:`Standardize`, a fixed per-feature standardisation whose mean and standard deviation
are set once from the training features (``head[0].set_stats``): the features and any extra input
concatenated to them (E(B−V), whose scale is ~0.03) reach the first layer at unit scale, so one learning rate
suits every encoder. Unlike a BatchNorm it has no running statistics to converge, so a model trained for a
handful of steps (few labels) is evaluated with exactly the statistics it was trained with.
``(B, in_dim) -> (B, n_outputs)`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

HEADS = ("linear", "mlp")


class Standardize(nn.Module):
    """``(x − mean) / std`` per feature with fixed buffers (identity until :meth:`set_stats`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def set_stats(self, features: Tensor) -> None:
        """Mean and standard deviation of ``features`` (N, dim); constant features keep std 1."""
        features = features.to(dtype=torch.float64)
        std = features.std(dim=0, unbiased=False) if len(features) > 1 else torch.ones(features.shape[1])
        self.mean.copy_(features.mean(dim=0).to(self.mean))
        self.std.copy_(torch.where(std > self.eps, std, torch.ones_like(std)).to(self.std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def init_prior(head: nn.Sequential, prior: Tensor) -> None:
    """Start the head at the class prior: last layer weights 0, bias log ``prior`` (K,).

    The untrained head then predicts the training distribution of the classes (for photo-z, the
    redshift distribution) instead of a random one, so early stopping after a few epochs of a few
    labels never returns something worse than the prior.
    """
    last = head[-1]
    if not isinstance(last, nn.Linear) or prior.shape != (last.out_features,):
        raise ValueError(f"prior of shape {tuple(prior.shape)} does not fit the head's last layer {last}")
    last.weight.zero_()
    last.bias.copy_(torch.log(prior.to(torch.float64).clamp_min(1e-12)).to(last.bias))


def build_head(kind: str, in_dim: int, n_outputs: int, hidden: int = 512, dropout: float = 0.0) -> nn.Sequential:
    """A head mapping ``(B, in_dim)`` features to ``(B, n_outputs)`` logits; ``head[0]`` is the :class:`Standardize`.

    Args:
        kind: ``"linear"`` (standardize -> dropout -> linear) or ``"mlp"`` (standardize -> linear -> ReLU ->
            dropout -> linear).
        hidden: width of the MLP's hidden layer.
        dropout: dropout probability before the last layer.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if in_dim < 1 or n_outputs < 1 or hidden < 1:
        raise ValueError(f"in_dim, n_outputs and hidden must be positive, got {in_dim}, {n_outputs}, {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    norm = Standardize(in_dim)
    if kind == "linear":
        return nn.Sequential(norm, nn.Dropout(dropout), nn.Linear(in_dim, n_outputs))
    return nn.Sequential(norm, nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, n_outputs))
