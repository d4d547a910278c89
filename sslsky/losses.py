"""Self-supervised losses. One function per loss; shapes in the docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


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
