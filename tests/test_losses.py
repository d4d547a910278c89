"""InfoNCE against a plain NumPy version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslsky.losses import info_nce


def numpy_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, temperature: float) -> tuple[float, float]:
    """Mean over i of -log softmax([q_i.k_i, q_i.queue]/T)[0], and the fraction with the positive on top."""
    losses, hits = [], []
    for qi, ki in zip(q, k):
        logits = np.concatenate([[qi @ ki], qi @ queue]) / temperature
        top = logits.max()
        log_softmax = logits - top - np.log(np.exp(logits - top).sum())
        losses.append(-log_softmax[0])
        hits.append(logits[0] >= logits[1:].max())
    return float(np.mean(losses)), float(np.mean(hits))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    q = unit_rows(rng, 8, 16)
    k = unit_rows(rng, 8, 16)
    k[:5] = q[:5] + 0.1 * k[:5]  # most positives close: accuracy strictly between 0 and 1
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    queue = unit_rows(rng, 32, 16).T  # (D, K)
    loss, acc = info_nce(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32),
                         torch.tensor(queue, dtype=torch.float32), temperature)
    ref_loss, ref_acc = numpy_info_nce(q, k, queue, temperature)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-6)
    assert 0.0 < ref_acc < 1.0


def test_info_nce_gradient_reaches_queries_only():
    rng = np.random.default_rng(1)
    q = torch.tensor(unit_rows(rng, 4, 8), dtype=torch.float32, requires_grad=True)
    k = torch.tensor(unit_rows(rng, 4, 8), dtype=torch.float32, requires_grad=True)
    queue = torch.tensor(unit_rows(rng, 16, 8).T, dtype=torch.float32)
    loss, _ = info_nce(q, k, queue, 0.2)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert k.grad is None  # keys are constants, as in MoCo


@pytest.mark.parametrize("shapes, temperature, match", [
    (((4, 8), (4, 8), (8, 0)), 0.2, "queue"),
    (((4, 8), (4, 8), (7, 16)), 0.2, "queue"),
    (((4, 8), (3, 8), (8, 16)), 0.2, "q and k"),
    (((4,), (4,), (8, 16)), 0.2, "q and k"),
    (((4, 8), (4, 8), (8, 16)), 0.0, "temperature"),
    (((4, 8), (4, 8), (8, 16)), -1.0, "temperature"),
])
def test_info_nce_rejects_bad_arguments(shapes, temperature, match):
    q, k, queue = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        info_nce(q, k, queue, temperature)
