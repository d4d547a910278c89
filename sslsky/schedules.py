"""Schedules as pure functions of the step, so resuming needs only the step."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr = base_lr x global_batch / reference_batch."""
    return base_lr * global_batch / reference_batch


def warmup_cosine(step: int, peak: float, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warm-up from ~0 to ``peak`` over ``warmup_steps``, then cosine decay to ``final`` at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(step: int, base: float, total_steps: int) -> float:
    """EMA momentum rising from ``base`` to 1 along a cosine (BYOL, Grill et al. 2020)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))
