"""Self-supervised losses. One function per loss; shapes in the docstrings."""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F  # noqa: N812

from sslsky import dist


def _world() -> int:
    """Ranks in the default process group; 1 without torch.distributed or an initialised group."""
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank its slice of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (world * B, ...)
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # (world * B, ...) -> (B, ...)
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place: not autograd's buffer
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad.chunk(torch_dist.get_world_size(), dim=0)[torch_dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, differentiable: ``(B, ...)`` -> ``(world * B, ...)``.

    The backward sums the gradient of the gathered tensor over ranks and returns this rank's slice
    ``[rank * B, (rank + 1) * B)``: so each rank's ``x`` receives the gradient of *every* rank's loss
    with respect to it, and DDP's gradient averaging then gives the gradient of the mean of the ranks'
    losses, as one process with the combined batch would. Built on ``all_gather`` and ``all_reduce``
    alone, which every backend has (gloo and NCCL alike).

    ``x`` must have the same shape on every rank, and every rank must run the backward (it is a
    collective). Without an initialised process group, or with one rank, returns ``x`` itself.
    """
    return _GatherWithGrad.apply(x) if _world() > 1 else x


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo InfoNCE: each query against its own key (the positive) and the queue (the negatives).

    ``loss = -mean_i log softmax([q_i . k_i, q_i . queue[:, 0], ..., q_i . queue[:, K-1]] / T)[0]``

    Args:
        q: ``(B, D)`` L2-normalised queries (gradients flow through these).
        k: ``(B, D)`` L2-normalised keys, row i is the positive of query i (treated as constants).
        queue: ``(D, K)`` L2-normalised negative keys, one per column.
        temperature: T > 0.

    Returns:
        ``(loss, top1)``: scalar mean cross-entropy and the fraction of queries whose positive has the
        highest logit (ties count for the positive), both float32 0-dim tensors.

    Computed in float32 with autocast off, whatever the dtypes of the inputs.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, D); got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[0] == 0:
        raise ValueError("q and k are empty (batch of 0)")
    if queue.dim() != 2 or queue.shape[0] != q.shape[1] or queue.shape[1] == 0:
        raise ValueError(f"queue must be (D, K) with D = {q.shape[1]} and K >= 1; got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.detach().float(), queue.detach().float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q @ queue  # (B, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1 + K); the positive is class 0
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
        top1 = (logits.argmax(dim=1) == 0).float().mean()
    return loss, top1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent (Chen et al. 2020): each of the 2B embeddings against its other view (the positive)
    and the other 2B - 2 embeddings (the negatives).

    With ``z = normalize([z1; z2])`` ``(2B, D)``, ``s_ij = z_i . z_j / T`` and ``p(i)`` the other view of ``i``::

        loss = mean_i [ -s_i,p(i) + log sum_{j != i} exp(s_ij) ]

    i.e. cross-entropy over 2B - 1 candidates, the anchor itself excluded (its logit masked to -inf).

    Under ``torch.distributed`` (initialised, world > 1, ``gather=True``) the candidates are the
    embeddings of every rank, gathered with :func:`gather_with_grad`: this rank's 2B anchors against all
    2 * world * B. The returned loss and top1 are then this rank's share (means over its own anchors);
    their mean over ranks, and the DDP-averaged gradients, equal one process's on the combined batch.
    Every rank must pass the same B.

    Args:
        z1: ``(B, D)`` projections of view 1, any norm (L2-normalised here); B >= 1.
        z2: ``(B, D)`` projections of view 2; row i is the positive of row i of ``z1``.
        temperature: T > 0, finite (0.1 as in Wei et al. 2022).
        gather: gather the candidates across ranks when a process group is up; no effect without one.

    Returns:
        ``(loss, top1)``: scalar mean cross-entropy and the fraction of anchors whose positive has the
        highest logit (ties count for the positive), both 0-dim tensors.

    Computed in float32 (float64 inputs stay float64) with autocast off, whatever the input dtypes.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (B, D); got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}")
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"z1 and z2 must have B >= 1 rows and D >= 1 columns; got {tuple(z1.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    batch = z1.shape[0]
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2B, D): the anchors
        world = _world() if gather else 1
        candidates = gather_with_grad(z) if world > 1 else z  # (world * 2B, D), rank r's block at r * 2B
        offset = torch_dist.get_rank() * 2 * batch if world > 1 else 0
        logits = z @ candidates.T / temperature  # (2B, world * 2B)
        anchors = torch.arange(2 * batch, device=z.device)
        itself = torch.zeros_like(logits, dtype=torch.bool)
        itself[anchors, offset + anchors] = True
        logits = logits.masked_fill(itself, float("-inf"))  # the anchor itself is no candidate
        labels = offset + (anchors + batch) % (2 * batch)  # the other view
        loss = F.cross_entropy(logits, labels)
        top1 = (logits[anchors, labels] >= logits.max(dim=1).values).to(dtype).mean()
    return loss, top1.detach()


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
              mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
              gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021) between paired rows of ``a`` and ``b``.

    With ``â``, ``b̂`` the L2-normalised rows and ``s = exp(logit_scale)``, the logits are ``s â b̂ᵀ``; the loss is
    the mean of the cross-entropy over rows (each ``a_i`` picks its ``b_i`` among the ``b``) and over columns
    (each ``b_j`` picks its ``a_j``)::

        loss = ( mean_i CE(s â_i b̂ᵀ, i) + mean_j CE(s b̂_j âᵀ, j) ) / 2

    ``mask`` ``(B,)`` bool: only the rows with ``True`` take part, as anchors and as candidates (galaxies without
    a label). ``labels`` ``(B,)`` int: pairs of the same label are positives too (UniCL, Yang et al. 2022): the
    target of row i is spread evenly over the columns with row i's label instead of column i alone, so two
    galaxies of one class with the same caption are not pushed apart; with all labels distinct it is CLIP's.

    Under ``torch.distributed`` (initialised, world > 1, ``gather=True``) the candidates are every
    rank's rows, gathered with :func:`gather_with_grad`; each rank returns its share of the global loss (its own
    anchors' cross-entropies over the global number of pairs, times the world size) plus a constant that makes
    the value the global loss itself on every rank, so the mean over ranks and the DDP-averaged gradients equal
    one process's on the combined batch. No pair anywhere: 0 (with a gradient of zeros).

    Args:
        a, b: ``(B, D)``, any norm; row i of ``a`` is paired with row i of ``b``. Every rank the same B.
        logit_scale: ln of the scale (a learnable scalar in CLIP; clamp it before, as the caller wishes).
        mask: ``(B,)`` bool rows that take part (default all).
        labels: ``(B,)`` int64 label of each row (default: every row its own).

    Computed in float32 (float64 stays float64) with autocast off.
    """
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"a and b must both be (B, D) with B >= 1; got {tuple(a.shape)} and {tuple(b.shape)}")
    batch = a.shape[0]
    mask = torch.ones(batch, dtype=torch.bool, device=a.device) if mask is None else mask.to(torch.bool)
    if mask.shape != (batch,):
        raise ValueError(f"mask must be ({batch},), got {tuple(mask.shape)}")
    if labels is not None and tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must be ({batch},), got {tuple(labels.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        a_hat, b_hat = F.normalize(a.to(dtype), dim=1), F.normalize(b.to(dtype), dim=1)
        world = _world() if gather else 1
        own = torch.arange(batch, device=a.device)
        if world > 1:
            all_a, all_b = gather_with_grad(a_hat), gather_with_grad(b_hat)
            all_mask = dist.all_gather_tensor(mask)
            offset = torch_dist.get_rank() * batch
        else:
            all_a, all_b, all_mask, offset = a_hat, b_hat, mask, 0
        if labels is None:  # every row its own label: the global row number
            labels, all_labels = offset + own, torch.arange(world * batch, device=a.device)
        else:
            labels = labels.to(device=a.device, dtype=torch.int64)
            all_labels = dist.all_gather_tensor(labels) if world > 1 else labels
        scale = torch.as_tensor(logit_scale, dtype=dtype, device=a.device).exp()
        blocked = torch.finfo(dtype).min
        rows = (scale * a_hat @ all_b.T).masked_fill(~all_mask[None, :], blocked)  # (B, world B)
        cols = (scale * b_hat @ all_a.T).masked_fill(~all_mask[None, :], blocked)
        target = ((labels[:, None] == all_labels[None, :]) & all_mask[None, :]).to(dtype)  # (B, world B)
        target = target / target.sum(dim=1, keepdim=True).clamp(min=1)
        per_pair = 0.5 * (-(target * F.log_softmax(rows, dim=1)).sum(dim=1)
                          - (target * F.log_softmax(cols, dim=1)).sum(dim=1))
        per_pair = torch.where(mask, per_pair, torch.zeros_like(per_pair))
        count = all_mask.sum().to(dtype)
        share = world * per_pair.sum() / count.clamp(min=1)
        if world > 1:
            total = per_pair.detach().sum()
            torch_dist.all_reduce(total)
            value = total / count.clamp(min=1)
        else:
            value = share.detach()
        return share + (value - share).detach()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss (Grill et al. 2020): ``mean_i (2 - 2 cos(p_i, z_i))`` = mean squared distance of the
    L2-normalised vectors.

    Args:
        p: ``(B, D)`` online predictions (gradients flow through these).
        z: ``(B, D)`` target projections of the other view (treated as constants).

    Returns:
        scalar float32 loss in [0, 4] (autocast off).
    """
    if p.dim() != 2 or p.shape != z.shape or p.shape[0] == 0:
        raise ValueError(f"p and z must both be (B, D) with B >= 1; got p {tuple(p.shape)} and z {tuple(z.shape)}")
    with torch.autocast(p.device.type, enabled=False):
        cos = (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1)
        return (2.0 - 2.0 * cos).mean()


def dirichlet_multinomial_nll(concentrations: torch.Tensor, counts: torch.Tensor, question_slices,
                              reduction: str = "mean") -> torch.Tensor:
    """Dirichlet-multinomial negative log-likelihood of volunteer vote counts (Walmsley et al. 2022).

    For each question q with answer columns ``s``, total votes ``N = sum_s k_s`` and ``a0 = sum_s a_s``::

        -log p(k | a) = -[ lgamma(N + 1) - sum_s lgamma(k_s + 1) + lgamma(a0) - lgamma(N + a0)
                           + sum_s (lgamma(k_s + a_s) - lgamma(a_s)) ]

    summed over the questions; a question with N = 0 (never asked of this galaxy) contributes exactly 0,
    so a galaxy with no votes at all has loss 0.

    Args:
        concentrations: ``(B, A)`` Dirichlet concentrations > 0 (the vote head gives them in (1, 101)).
        counts: ``(B, A)`` vote counts (any int or float dtype), >= 0.
        question_slices: Q column ranges of the questions, as ``(start, stop)`` pairs or ``slice`` objects.
        reduction: ``"mean"`` over the B galaxies (those without votes count, with 0), or ``"none"``: ``(B,)``.

    Returns:
        scalar (or ``(B,)``) float32 loss, autocast off.
    """
    if concentrations.dim() != 2 or concentrations.shape != counts.shape:
        raise ValueError(f"concentrations and counts must both be (B, A); got {tuple(concentrations.shape)} and "
                         f"{tuple(counts.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    slices = [s if isinstance(s, slice) else slice(*s) for s in question_slices]
    if not slices:
        raise ValueError("question_slices is empty")
    with torch.autocast(concentrations.device.type, enabled=False):
        alpha, k = concentrations.float(), counts.detach().float()
        total = torch.zeros(alpha.shape[0], dtype=torch.float32, device=alpha.device)  # (B,)
        for s in slices:
            a_q, k_q = alpha[:, s], k[:, s]  # (B, A_q)
            n, a0 = k_q.sum(dim=1), a_q.sum(dim=1)  # (B,)
            log_p = (torch.lgamma(n + 1) - torch.lgamma(k_q + 1).sum(dim=1) + torch.lgamma(a0) - torch.lgamma(n + a0)
                     + (torch.lgamma(k_q + a_q) - torch.lgamma(a_q)).sum(dim=1))
            total = total + torch.where(n > 0, -log_p, torch.zeros_like(log_p))
        return total.mean() if reduction == "mean" else total
