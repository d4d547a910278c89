"""The contract between the trainer and a pretraining method.

A method is an ``nn.Module`` subclass of :class:`Method` in a file of its own under ``sslsky/methods/``,
named in the registry :data:`sslsky.methods.METHODS`. The trainer (:mod:`sslsky.train.pretrain`) knows
nothing else about it; it calls, in this order:

1. :meth:`Method.from_config` (``cfg`` the whole :class:`~sslsky.config.PretrainConfig`: the method reads
   ``cfg.model.<its section>``, and ``cfg.votes`` when it uses votes; ``encoder`` the configured encoder,
   randomly initialised, which becomes the method's :attr:`~Method.encoder`; ``votes`` the
   :class:`~sslsky.vocabulary.VoteSchema` when the method uses votes), then :meth:`check_batch` with the
   global batch size;
2. every step: ``loss, metrics = method(batch)`` (through DDP when there are several ranks), where ``batch``
   holds the two augmented views ``view1``, ``view2`` ``(B, C, H, W)`` and the loader columns named in
   :attr:`Method.batch_keys` (``votes``: ``(B, A)`` counts); ``metrics`` are every term the method logs, as
   0-d detached tensors, the one shown on the progress bar first. Then backward, the optimizer step over
   :meth:`parameters_to_optimize`, and :meth:`after_step` with the number of steps done (EMA targets,
   queues: anything that is a function of the step, so a resume from a checkpoint is exact);
3. every ``val_every`` steps on rank 0: :meth:`held_out` on validation batches -> ``{name: value}``;
4. at the end: :attr:`encoder`, the backbone whose weights become ``encoder.pt``.

Class attributes declare what the trainer must provide: :attr:`section` (the ``model.*`` section it reads:
a changed value in another method's section is a config error), :attr:`batch_keys` (or, when they depend on
the config, :meth:`batch_keys_for`), :meth:`draws` (which galaxies the sampler draws: all, or only those
with a label), :attr:`shape_keys` (config keys that set weight shapes: a resume can never change them),
:attr:`find_unused_parameters` (some parameters get no gradient in some steps: DDP must look for them), and
:meth:`make_encoder` (the backbone before ``from_config``: by default ``model.arch`` randomly initialised).
:meth:`export_state` adds what else the method exports to ``encoder.pt`` (under ``method_state``).

State: everything the method needs to resume is in its ``state_dict`` (parameters and buffers); attributes
that are functions of the step (BYOL's momentum) are set again by :meth:`after_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

if TYPE_CHECKING:
    from sslsky.config import PretrainConfig
    from sslsky.vocabulary import VoteSchema

class Method(nn.Module):
    """Base class of the pretraining methods (see the module docstring for the contract)."""

    #: The ``model.*`` config section the method reads (None: none, it uses only the encoder's keys).
    section: ClassVar[str | None] = None
    #: Loader columns the loss needs besides the views (``"votes"``: the vote counts of ``votes.campaigns``;
    #: ``"morph_class"``: the catalog label).
    batch_keys: ClassVar[tuple[str, ...]] = ()
    #: Config keys that set the shapes of the method's own weights (besides the encoder's).
    shape_keys: ClassVar[tuple[str, ...]] = ()
    #: Some parameters get no gradient in some steps (DDP's ``find_unused_parameters``).
    find_unused_parameters: ClassVar[bool] = False
    #: Config keys outside ``model.<section>`` that the method reads and others do not (``votes.weight``).
    reads: ClassVar[tuple[str, ...]] = ()

    #: The backbone: ``(B, C, H, W) -> (B, feature_dim)``; exported as ``encoder.pt``.
    encoder: nn.Module
    feature_dim: int

    @classmethod
    def batch_keys_for(cls, cfg: PretrainConfig) -> tuple[str, ...]:
        """The loader columns a method of this config needs (default :attr:`batch_keys`)."""
        return cls.batch_keys

    @classmethod
    def draws(cls, cfg: PretrainConfig) -> str | None:
        """The galaxies drawn: None, all of them; ``"votes"`` or ``"morph_class"``, only those with that label."""
        return None

    @classmethod
    def make_encoder(cls, cfg: PretrainConfig, n_bands: int, image_size: int) -> nn.Module:
        """The backbone: ``model.arch`` (and its section) for these bands and crops, randomly initialised."""
        from sslsky.models.encoders import encoder_from_config

        return encoder_from_config(cfg.model, n_bands, image_size)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, encoder: nn.Module, votes: VoteSchema | None = None,
                    data=None) -> Method:
        """The method on ``encoder``; ``data`` the training :class:`~sslsky.data.shards.ShardDataset` (its labels,
        the pack's attributes), for a method that needs to know them."""
        raise NotImplementedError

    # ---- what the trainer calls -----------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` of one batch (``view1``, ``view2`` and :attr:`batch_keys`)."""
        raise NotImplementedError

    def parameters_to_optimize(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates (not momentum copies); the order is part of the checkpoint format."""
        return self.parameters()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step; ``step`` steps are done. Default: nothing."""

    def check_batch(self, global_batch: int) -> None:
        """ValueError when the method cannot train with this global batch (checked before the first step)."""

    def embed(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, C, H, W) -> (B, feature_dim)``."""
        return self.encoder(images)

    @torch.no_grad()
    def held_out(self, batches: Iterable[dict[str, Tensor]], eval_view: Callable[[Tensor], Tensor]
                 ) -> dict[str, float]:
        """Validation on held-out batches (augmented ``view1``, ``view2``, the :attr:`batch_keys` and the raw
        ``image``; ``eval_view`` maps raw images to the centred, normalised view). Default: the contrastive
        top-1 of :func:`contrastive_top1`."""
        return {"val_top1": contrastive_top1(self.embed, batches)}

    @staticmethod
    def describe(record: dict[str, float]) -> str:
        """A :meth:`held_out` record in words, for the log."""
        return f"val contrastive top-1 {record['val_top1']:.3f}"

    def export_state(self) -> dict | None:
        """What ``encoder.pt`` carries besides the encoder, under ``method_state`` (weights_only-safe); None: none."""
        return None


def check_views(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The two views of ``batch``; ValueError when they differ in shape."""
    view1, view2 = batch["view1"], batch["view2"]
    if view1.shape != view2.shape:
        raise ValueError(f"the two views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
    return view1, view2


def contrastive_top1(embed: Callable[[Tensor], Tensor], batches: Iterable[dict[str, Tensor]]) -> float:
    """Held-out contrastive top-1: how often a view's nearest other view (in-batch, cosine) is its pair."""
    hits, total = 0, 0
    for batch in batches:
        q = F.normalize(embed(batch["view1"]), dim=1)
        k = F.normalize(embed(batch["view2"]), dim=1)
        pred = (q @ k.T).argmax(dim=1)
        hits += (pred == torch.arange(len(q), device=q.device)).sum().item()
        total += len(q)
    return hits / max(1, total)


@torch.no_grad()
def ema_update(target: Iterable[nn.Parameter], online: Iterable[nn.Parameter], momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_o`` for each pair of parameters (buffers are the target's own)."""
    target, online = list(target), [p.detach() for p in online]
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, torch._foreach_mul(online, 1.0 - momentum))


def encoder_prefix(method: nn.Module) -> str:
    """The state-dict prefix of ``method.encoder`` in ``method.state_dict()`` (``encoder_q.``, ...)."""
    for name, module in method.named_children():
        if module is method.encoder:
            return f"{name}."
    raise ValueError(f"{type(method).__name__}.encoder is not one of its direct children")
