"""The real trainer (`sslsky pretrain`) with 2 gloo ranks for method=byol, hybrid, votes and simclr, checked with
numbers.

Each rank runs ``sslsky.cli.main`` in its own process (torchrun variables, as under ``torchrun`` or
``srun``), the three methods one after the other in the same two processes (one start-up for all); the
test only wraps ``build_method`` to keep a handle on the rank's model and record, before the forward of
one step, the weights and that rank's inputs (views, vote counts). Then:

- the ranks end with identical weights (online, target, heads), the BN running statistics excepted
  (each rank's own batches: they must differ): rank 1's final weights against rank 0's final checkpoint;
- every logged loss is finite; the logged terms of the recorded step are recomputed from both ranks'
  inputs and weights: the vote NLL with NumPy (concentrations and Dirichlet-multinomial by hand), the
  BYOL term with the model on each rank's half batch, the hybrid loss from its formula, SimCLR's NT-Xent of
  rank 0's anchors against the projections of both ranks (NumPy).

A 2-rank trainer run cannot equal a 1-rank run on the combined batch: each rank draws its own
augmentations and BN normalises with each rank's own batch statistics. The 2-vs-1 equality of the
losses themselves is checked on fixed inputs in tests/test_hybrid.py and tests/test_votes.py.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

METHODS = ("byol", "hybrid", "votes", "simclr")
CAPTURE_STEP = 3  # 1-based: the forward of the last step
STEPS = ("optim.total_steps=3", "checkpoint_every=3", "log_every=1", "val_every=3", "data.val_batches=1",
         "augment.geometry.crop_size=16")
#: Each method's tiny settings (its own config section).
METHOD_STEPS = {"byol": ("model.byol.hidden=32",), "hybrid": ("model.byol.hidden=32",), "votes": (),
                "simclr": ("model.simclr.dim=32",)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainer_worker(rank: int, world: int, runs: list[tuple[list[str], int, str]]) -> None:
    """One rank of ``sslsky pretrain ARGS`` for each (ARGS, MASTER_PORT, OUT) of ``runs``; saves OUT/rank<r>.pt:
    the rank's inputs of the forward of CAPTURE_STEP and, rank 0, the weights before it (the same on every
    rank but for BN statistics, which a train-mode forward does not use), rank 1, its final weights (rank 0's
    are in its checkpoint)."""
    torch.set_num_threads(1)
    from sslsky.cli import main
    from sslsky.train import pretrain

    build_method = pretrain.build_method
    for args, port, out in runs:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        seen: dict = {"forwards": 0}

        def build_and_watch(cfg, n_bands, image_size, votes, data=None, seen=seen):
            model = build_method(cfg, n_bands, image_size, votes, data)

            def before_forward(module, inputs):  # training forwards only: validation calls embed()
                seen["forwards"] += 1
                if seen["forwards"] == CAPTURE_STEP:
                    batch = inputs[0]  # {"view1", "view2", and "votes" for the vote methods}
                    seen["inputs"] = [batch[k].detach().clone() for k in ("view1", "view2", "votes") if k in batch]
                    if rank == 0:
                        seen["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

            model.register_forward_pre_hook(before_forward)
            seen["model"] = model
            return model

        pretrain.build_method = build_and_watch
        assert main(args) == 0, f"rank {rank}: sslsky {' '.join(args)} failed"
        saved = {"inputs": seen["inputs"], **({"state": seen["state"]} if rank == 0 else
                                             {"final": seen["model"].state_dict()})}
        torch.save(saved, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def partly_labelled(packed_mock, tmp_path_factory):
    from test_votes import partly_labelled_copy

    return partly_labelled_copy(packed_mock, tmp_path_factory.mktemp("ddp_partly_labelled") / "packed")


def fresh_model(cfg, state: dict):
    from sslsky.train.pretrain import build_method, vote_schema

    model = build_method(cfg, 5, cfg.augment.geometry.crop_size, vote_schema(cfg))
    model.load_state_dict(state)
    return model.train()


def recomputed_votes(cfg, state: dict, ranks: list[dict]) -> dict:
    """NumPy vote NLL per galaxy (both views averaged), labelled mask and concentrations over both ranks."""
    from test_votes import numpy_concentrations, numpy_dm_nll

    from sslsky.vocabulary import VoteSchema

    slices = VoteSchema.from_campaigns(cfg.votes.campaigns).slices
    nll, labelled, alpha, counts = [], [], [], []
    model = fresh_model(cfg, state)
    for r in ranks:
        v1, v2, votes = r["inputs"]
        with torch.no_grad():  # train-mode BN: each rank's own batch statistics, as in its forward
            a1 = numpy_concentrations(model.online_encoder(v1), model.vote_head)
            a2 = numpy_concentrations(model.online_encoder(v2), model.vote_head)
        k = votes.numpy()
        nll.append(0.5 * (numpy_dm_nll(a1, k, slices) + numpy_dm_nll(a2, k, slices)))
        labelled.append(k.sum(axis=1) > 0)
        alpha.append(a1 + a2)
        counts.append(k)
    return {"nll": nll, "labelled": labelled, "alpha": np.concatenate(alpha), "counts": np.concatenate(counts),
            "slices": slices}


def recomputed_byol(cfg, state: dict, ranks: list[dict]) -> list[tuple[float, float]]:
    """(loss, top1) of each rank's BYOL forward at the captured step (the target as the step before left it)."""
    out = []
    for r in ranks:
        model = fresh_model(cfg, state)
        with torch.no_grad():
            loss, top1, _ = model.byol_forward(*r["inputs"][:2])
        out.append((loss.item(), top1.item()))
    return out


def recomputed_nt_xent(cfg, state: dict, ranks: list[dict]) -> tuple[float, float]:
    """Rank 0's logged NT-Xent: its 2B anchors against the projections of both ranks (rank order), by NumPy."""
    model = fresh_model(cfg, state)
    with torch.no_grad():  # train-mode BN: each rank's own batch statistics, as in its forward
        z = [torch.cat([model.head(model.backbone(r["inputs"][0])), model.head(model.backbone(r["inputs"][1]))])
             for r in ranks]
    z = [x.double().numpy() for x in z]
    z = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in z]
    anchors, candidates = z[0], np.concatenate(z)  # (2B, D), (4B, D)
    b = len(anchors) // 2
    logits = anchors @ candidates.T / cfg.model.simclr.temperature
    logits[np.arange(2 * b), np.arange(2 * b)] = -np.inf  # rank 0's own anchors sit first
    positive = np.r_[np.arange(b, 2 * b), np.arange(b)]
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    loss = np.mean(log_z - logits[np.arange(2 * b), positive])
    top1 = np.mean(logits[np.arange(2 * b), positive] >= logits.max(axis=1))
    return float(loss), float(top1)


@pytest.fixture(scope="module")
def two_rank_runs(partly_labelled, tmp_path_factory):
    """METHOD -> its folder: run/ (the run directory) and rank0.pt, rank1.pt (see :func:`trainer_worker`)."""
    from conftest import tiny_pretrain_args

    root = tmp_path_factory.mktemp("two_rank_runs")
    runs = []
    for method in METHODS:
        (root / method).mkdir()
        args = tiny_pretrain_args(partly_labelled, root / method / "run", f"method={method}", *STEPS,
                                  *METHOD_STEPS[method])
        runs.append((args, free_port(), str(root / method)))
    mp.spawn(trainer_worker, args=(2, runs), nprocs=2, join=True)
    return {method: root / method for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_two_rank_trainer_keeps_ranks_in_sync_and_logs_the_recomputed_loss(method, two_rank_runs):
    from test_votes import numpy_first_answer_hits

    from sslsky.config import PretrainConfig, load_config
    from sslsky.train.checkpoint import load_checkpoint

    run_dir = two_rank_runs[method] / "run"
    ranks = [torch.load(two_rank_runs[method] / f"rank{r}.pt", weights_only=True) for r in range(2)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    assert sorted(train) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train.values())

    # DDP kept the ranks' weights identical, bit for bit; BN statistics are each rank's own.
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"step-{CAPTURE_STEP:08d}.pt")  # rank 0's final weights
    assert ckpt["step"] == CAPTURE_STEP and len(ckpt["rng"]["augment"]) == 2
    finals = [ckpt["model"], ranks[1]["final"]]
    assert finals[0].keys() == finals[1].keys()
    bn_stats = [k for k in finals[0] if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and any(not torch.equal(finals[0][k], finals[1][k]) for k in bn_stats)
    for name in finals[0].keys() - set(bn_stats):
        assert torch.equal(finals[0][name], finals[1][name]), name
    assert not torch.equal(ranks[0]["inputs"][0], ranks[1]["inputs"][0])  # each rank its own galaxies

    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    logged = train[CAPTURE_STEP]
    if method == "byol":
        (loss0, top1_0), _ = recomputed_byol(cfg, ranks[0]["state"], ranks)
        assert logged["loss"] == pytest.approx(loss0, rel=1e-5) and logged["acc"] == pytest.approx(top1_0)
        return
    if method == "simclr":
        loss0, top1_0 = recomputed_nt_xent(cfg, ranks[0]["state"], ranks)
        assert logged["loss"] == pytest.approx(loss0, rel=1e-5) and logged["acc"] == pytest.approx(top1_0)
        return
    votes = recomputed_votes(cfg, ranks[0]["state"], ranks)
    labelled = np.concatenate(votes["labelled"])
    count = labelled.sum()
    g_votes = np.concatenate(votes["nll"])[labelled].mean()  # mean over the labelled galaxies of both ranks
    assert logged["labelled"] == count and logged["loss_votes"] == pytest.approx(g_votes, rel=1e-4)
    if method == "hybrid":
        byol = recomputed_byol(cfg, ranks[0]["state"], ranks)
        g_byol = np.mean([loss for loss, _ in byol])
        scale = abs(g_byol) / g_votes
        rank0_votes = 2 * votes["nll"][0][votes["labelled"][0]].sum() / count  # rank 0's share, times the world
        assert logged["loss_byol"] == pytest.approx(g_byol, rel=1e-5)
        assert logged["vote_scale"] == pytest.approx(scale, rel=1e-4)
        assert logged["loss"] == pytest.approx(byol[0][0] + cfg.votes.weight * scale * rank0_votes, rel=1e-4)
        assert logged["acc"] == pytest.approx(byol[0][1])
    else:  # votes: only galaxies with votes are drawn, and the loss is the global mean on every rank
        assert count == 2 * cfg.data.batch_size and "acc" not in logged
        assert logged["loss"] == pytest.approx(g_votes, rel=1e-4)
        hits, asked = numpy_first_answer_hits(votes["alpha"], votes["counts"], votes["slices"][0])
        assert logged["vote_acc"] == pytest.approx(hits / asked)
        assert any("val_loss_votes" in r for r in records)
