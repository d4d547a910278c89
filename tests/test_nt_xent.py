"""NT-Xent (SimCLR) against a plain NumPy version, hand-computed cases, gradcheck, and 2 gloo ranks = 1 process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import gloo_group, spawn_gloo
from torch import nn

from sslsky.losses import gather_with_grad, nt_xent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> tuple[float, float]:
    """float64, one anchor at a time: -log(exp(s_ip) / sum_{j != i} exp(s_ij)) with s = cos / T, averaged over
    the 2B anchors; and the fraction of anchors whose positive has the highest logit."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n, b = len(z), len(z1)
    losses, hits = [], []
    for i in range(n):
        positive = (i + b) % n
        others = [j for j in range(n) if j != i]  # the 2B - 1 candidates
        logits = np.array([z[i] @ z[j] for j in others]) / temperature
        top = logits.max()
        log_denominator = top + np.log(np.exp(logits - top).sum())
        losses.append(log_denominator - z[i] @ z[positive] / temperature)
        hits.append(z[i] @ z[positive] / temperature >= top)
    return float(np.mean(losses)), float(np.mean(hits))


def views(rng: np.random.Generator, b: int, d: int, noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated views with random norms in [0.1, 10] per row."""
    z1 = rng.normal(size=(b, d))
    z2 = z1 + noise * rng.normal(size=(b, d))
    return (z1 * rng.uniform(0.1, 10.0, size=(b, 1)), z2 * rng.uniform(0.1, 10.0, size=(b, 1)))


@pytest.mark.parametrize(("b", "d", "temperature"), [(1, 3, 0.1), (2, 4, 0.5), (5, 8, 0.1), (16, 32, 0.07),
                                                     (16, 32, 1.0), (33, 7, 2.5)])
def test_nt_xent_matches_numpy(b, d, temperature):
    z1, z2 = views(np.random.default_rng(b * 100 + d), b, d)
    loss, top1 = nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), temperature)
    ref_loss, ref_top1 = numpy_nt_xent(z1, z2, temperature)
    assert loss.dtype == torch.float32 and loss.shape == () and top1.shape == ()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert top1.item() == pytest.approx(ref_top1, abs=1e-6)
    if b >= 16:
        assert 0.0 < ref_top1 < 1.0  # a top1 test that can fail either way


def test_one_pair_has_loss_zero_whatever_the_input():
    """B = 1: each anchor's only candidate is its positive, so the softmax is 1 and the loss exactly 0."""
    rng = np.random.default_rng(0)
    for temperature in (0.01, 0.1, 3.0):
        z1, z2 = (torch.tensor(rng.normal(size=(1, 6)) * 5, dtype=torch.float32) for _ in range(2))
        loss, top1 = nt_xent(z1, z2, temperature)
        assert loss.item() == 0.0 and top1.item() == 1.0


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_two_pairs_closed_form(temperature):
    """B = 2 in 3-d: pair 0 is e1 and (cos c, sin c, 0) at cosine c; pair 1 is e3 and -e3 (cosine -1); the two
    pairs are orthogonal. Each anchor has 2B - 1 = 3 candidates: the positive and two at cosine 0, so
    pair 0's anchors lose log(1 + 2 exp(-c/T)) and pair 1's log(1 + 2 exp(1/T)); top1 is 1/2."""
    c = 0.6
    e1, e3 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    turned = torch.tensor([c, math.sqrt(1 - c * c), 0.0])
    z1 = torch.stack([3.0 * e1, 0.2 * e3])  # norms do not matter
    z2 = torch.stack([7.0 * turned, -e3])
    loss, top1 = nt_xent(z1, z2, temperature)
    expected = (math.log1p(2 * math.exp(-c / temperature)) + math.log1p(2 * math.exp(1 / temperature))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert top1.item() == 0.5


def test_nt_xent_gradcheck_float64():
    rng = np.random.default_rng(4)
    z1, z2 = (torch.tensor(z, dtype=torch.float64, requires_grad=True) for z in views(rng, 3, 4))
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3)[0], (z1, z2))
    assert nt_xent(z1, z2, 0.3)[0].dtype == torch.float64  # float64 is not lowered to float32


def test_nt_xent_is_float32_under_autocast():
    z1, z2 = (torch.tensor(z, dtype=torch.bfloat16) for z in views(np.random.default_rng(5), 8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, top1 = nt_xent(z1, z2)
    assert loss.dtype == torch.float32 and top1.dtype == torch.float32
    ref_loss, _ = numpy_nt_xent(z1.float().numpy(), z2.float().numpy(), 0.1)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)


def test_gather_with_grad_without_a_process_group_is_the_identity():
    x = torch.randn(4, 3)
    assert gather_with_grad(x) is x


@pytest.mark.parametrize(("shapes", "temperature", "match"), [
    (((4, 8), (3, 8)), 0.1, "z1 and z2"),
    (((4, 8), (4, 7)), 0.1, "z1 and z2"),
    (((4,), (4,)), 0.1, "z1 and z2"),
    (((2, 4, 8), (2, 4, 8)), 0.1, "z1 and z2"),
    (((0, 8), (0, 8)), 0.1, "B >= 1"),
    (((4, 0), (4, 0)), 0.1, "D >= 1"),
    (((4, 8), (4, 8)), 0.0, "temperature"),
    (((4, 8), (4, 8)), -0.1, "temperature"),
    (((4, 8), (4, 8)), float("inf"), "temperature"),
    (((4, 8), (4, 8)), float("nan"), "temperature"),
])
def test_nt_xent_rejects_bad_arguments(shapes, temperature, match):
    z1, z2 = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2, temperature)


# ---- 2 gloo ranks, each with half the batch, against one process with all of it ---------------------------

GLOBAL_BATCH, IN_DIM, OUT_DIM, TEMPERATURE = 12, 10, 6, 0.2


def linear_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    return x1, x1 + 0.8 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(IN_DIM, OUT_DIM)


def simclr_step(model: nn.Module, net: nn.Module, x1: torch.Tensor, x2: torch.Tensor, gather: bool = True) -> dict:
    loss, top1 = nt_xent(net(x1), net(x2), TEMPERATURE, gather=gather)
    loss.backward()
    return {"loss": loss.detach(), "top1": top1, "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, init_file):
        half = GLOBAL_BATCH // world
        x1, x2 = (x[rank * half:(rank + 1) * half] for x in linear_inputs())
        model = linear_model()
        result = simclr_step(model, DistributedDataParallel(model), x1, x2)  # DDP averages the gradients
        local_model = linear_model()  # the same without the gather: only this rank's negatives
        result["local"] = simclr_step(local_model, DistributedDataParallel(local_model), x1, x2, gather=False)
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = spawn_gloo(dist_worker, tmp_path)
    model = linear_model()
    ref = simclr_step(model, model, *linear_inputs())
    assert 0.0 < ref["top1"].item() < 1.0
    # each rank's loss and top1 are means over its own 2B anchors (against all 2 * world * B candidates)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / len(ranks), ref["loss"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sum(r["top1"] for r in ranks) / len(ranks), ref["top1"])
    for r in ranks:  # the update: DDP-averaged gradients equal the one-process gradients
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # the check has teeth: without the gather the loss and gradients are those of two separate half batches
    local_loss = sum(r["local"]["loss"] for r in ranks) / len(ranks)
    assert abs(local_loss.item() - ref["loss"].item()) > 1e-2
    assert not torch.allclose(ranks[0]["local"]["grads"]["weight"], ref["grads"]["weight"], atol=1e-4)
