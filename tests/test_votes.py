"""Issue 5, votes-only pretraining (``method: votes``, the supervised Dirichlet-multinomial baseline of Walmsley
et al. 2022): the model against NumPy, 2 gloo ranks vs 1, ``ShardDataset(label="votes")``, and a tiny
``sslsky pretrain method=votes`` run on shards where half the galaxies have no votes (sampler, logs,
validation, checkpoints, export, exact resume, the summary script, config errors)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import gloo_group, spawn_gloo
from torch import nn

from sslsky.data.schema import MANIFEST_NAME, VOTES_DATASET
from sslsky.methods import HybridBYOL, VoteModel
from sslsky.models import build_encoder

SLICES = [(0, 3), (3, 5), (5, 8)]  # three questions, 8 answers
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder() -> nn.Module:
    return build_encoder("resnet18", 3, "imagenet")


def views(view1: torch.Tensor, view2: torch.Tensor, votes: torch.Tensor | None = None) -> dict:
    """A method's batch: the two views and, when given, the vote counts."""
    return {"view1": view1, "view2": view2, **({"votes": votes} if votes is not None else {})}


def partly_labelled_copy(packed: Path, dest: Path, unlabelled=lambda object_id: object_id % 2 == 0) -> Path:
    """A copy of packed shards whose galaxies with ``unlabelled(object_id)`` have all their vote counts zeroed."""
    shutil.copytree(packed, dest)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        with h5py.File(dest / entry["path"], "r+") as handle:
            votes = handle[VOTES_DATASET][()]
            votes[unlabelled(handle["object_id"][()])] = 0
            handle[VOTES_DATASET][...] = votes
    return dest


def numpy_dm_nll(alpha: np.ndarray, counts: np.ndarray, slices) -> np.ndarray:
    """(B,) sum over questions of -log DirMult(counts | alpha), questions without votes skipped."""
    from scipy.special import gammaln

    out = np.zeros(len(alpha))
    for i in range(len(alpha)):
        for start, stop in slices:
            a, k = alpha[i, start:stop].astype(np.float64), counts[i, start:stop].astype(np.float64)
            n = k.sum()
            if n > 0:
                out[i] -= (gammaln(n + 1) - gammaln(k + 1).sum() + gammaln(a.sum()) - gammaln(n + a.sum())
                           + (gammaln(k + a) - gammaln(a)).sum())
    return out


def numpy_concentrations(features: torch.Tensor, head: nn.Linear) -> np.ndarray:
    """(B, A) 1 + 100 sigmoid(W f + b), in float64."""
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    return 1.0 + 100.0 / (1.0 + np.exp(-(features.detach().double().numpy() @ w.T + b)))


def numpy_first_answer_hits(alpha: np.ndarray, counts: np.ndarray, first: tuple[int, int]) -> tuple[int, int]:
    a, k = alpha[:, first[0]:first[1]], counts[:, first[0]:first[1]]
    asked = k.sum(axis=1) > 0
    return int(((a.argmax(axis=1) == k.argmax(axis=1)) & asked).sum()), int(asked.sum())


# ---- the model ------------------------------------------------------------------------------------


def test_vote_model_shares_the_hybrid_vote_head():
    torch.manual_seed(0)
    hybrid = HybridBYOL(tiny_encoder(), SLICES, dim=8, hidden=16)
    votes_only = VoteModel(tiny_encoder(), SLICES)
    for name in ("concentrations", "concentration_nll", "vote_nll", "first_answer_hits", "check_votes"):
        assert getattr(VoteModel, name) is getattr(HybridBYOL, name), name  # one implementation
    hybrid_state = hybrid.state_dict()
    assert set(votes_only.state_dict()) <= set(hybrid_state)  # online_encoder.* and vote_head.*, same names
    votes_only.load_state_dict({k: hybrid_state[k] for k in votes_only.state_dict()})  # strict
    features = torch.randn(4, hybrid.feature_dim)
    torch.testing.assert_close(votes_only.concentrations(features), hybrid.concentrations(features), rtol=0, atol=0)
    assert {id(p) for p in votes_only.parameters_to_optimize()} == {id(p) for p in votes_only.parameters()}
    with pytest.raises(ValueError, match="vote counts"):
        votes_only(views(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"\(B, A\) = \(2, 8\)"):
        votes_only(views(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.ones(2, 7)))


def test_vote_model_loss_is_the_mean_nll_over_labelled_galaxies_of_both_views():
    torch.manual_seed(0)
    model = VoteModel(tiny_encoder(), SLICES).eval()  # BN on running statistics: per-galaxy features
    gen = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(6, 3, 16, 16, generator=gen), torch.randn(6, 3, 16, 16, generator=gen)
    votes = torch.randint(0, 25, (6, 8), generator=gen, dtype=torch.int32)
    votes[[1, 4]] = 0  # no votes
    votes[2, 0:3] = 0  # first question never asked
    votes[3, 0:3] = torch.tensor([2, 9, 9])  # tie: the first most-voted answer counts
    loss, metrics = model(views(v1, v2, votes))
    acc = metrics["vote_acc"]
    assert list(metrics) == ["vote_acc", "loss_votes", "labelled"]  # the progress bar shows the first
    with torch.no_grad():
        a1 = numpy_concentrations(model.online_encoder(v1), model.vote_head)
        a2 = numpy_concentrations(model.online_encoder(v2), model.vote_head)
    k = votes.numpy()
    nll = 0.5 * (numpy_dm_nll(a1, k, SLICES) + numpy_dm_nll(a2, k, SLICES))
    labelled = k.sum(axis=1) > 0
    np.testing.assert_allclose(loss.item(), nll[labelled].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_votes"].item(), nll[labelled].mean(), rtol=1e-5)
    assert metrics["labelled"].item() == 4
    hits, asked = numpy_first_answer_hits(a1 + a2, k, SLICES[0])
    assert asked == 3 and acc.item() == pytest.approx(hits / asked)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # The galaxies without votes contribute nothing: other images there give the same loss.
    v1[[1, 4]], v2[[1, 4]] = 5.0, -5.0
    torch.testing.assert_close(model(views(v1, v2, votes))[0], loss.detach())


GLOBAL_BATCH = 8


def vote_inputs():
    gen = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
    votes = torch.randint(0, 20, (GLOBAL_BATCH, 8), generator=gen, dtype=torch.int32)
    votes[[1, 2, 3, 6]] = 0  # rank 0 has 1 labelled galaxy of 4, rank 1 has 3: the global mean is not a mean of means
    return v1, v2, votes


def tiny_vote_model() -> VoteModel:
    torch.manual_seed(0)
    model = VoteModel(tiny_encoder(), SLICES)
    for module in model.modules():  # BN on running statistics: 2 x half batch = 1 x full batch
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def vote_step(model: VoteModel, net: nn.Module, v1, v2, votes) -> dict:
    optimizer = torch.optim.SGD(model.parameters_to_optimize(), lr=0.5)
    loss, metrics = net(views(v1, v2, votes))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.after_step(1, 10)
    return {"loss": loss.detach(), "acc": metrics["vote_acc"],
            "terms": {k: v.clone() for k, v in metrics.items() if k != "vote_acc"},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, init_file):
        half = GLOBAL_BATCH // world
        v1, v2, votes = (x[rank * half:(rank + 1) * half] for x in vote_inputs())
        model = tiny_vote_model()
        result = vote_step(model, DistributedDataParallel(model, broadcast_buffers=False), v1, v2, votes)
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_votes_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = spawn_gloo(dist_worker, tmp_path)
    model = tiny_vote_model()
    ref = vote_step(model, model, *vote_inputs())
    assert ref["terms"]["labelled"].item() == 4
    for r in ranks:  # the loss value, accuracy and terms are global: the same on every rank
        torch.testing.assert_close(r["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["acc"], ref["acc"])
        for name, value in ref["terms"].items():
            torch.testing.assert_close(r["terms"][name], value, atol=1e-5, rtol=1e-5, msg=name)
        for name, value in ref["state"].items():  # encoder and vote head after SGD on the global mean
            torch.testing.assert_close(r["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)


# ---- shards ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partly_labelled(packed_mock, tmp_path_factory) -> Path:
    """packed_mock with the votes of every even object_id removed."""
    return partly_labelled_copy(packed_mock, tmp_path_factory.mktemp("partly_labelled") / "packed")


def test_shards_select_the_galaxies_with_votes(partly_labelled):
    from sslsky.data.shards import ShardDataset
    from sslsky.vocabulary import default_vote_schema

    everything = ShardDataset(partly_labelled, split="train")
    has_votes = everything.vote_counts[everything.indices].sum(axis=1) > 0
    ids = everything.index.columns["object_id"][everything.indices]
    np.testing.assert_array_equal(has_votes, ids % 2 == 1)
    labelled = ShardDataset(partly_labelled, split="train", label="votes")
    np.testing.assert_array_equal(labelled.indices, everything.indices[has_votes])
    assert (labelled.read_batch(list(range(len(labelled))))["votes"].sum(dim=1) > 0).all()
    # The selection follows the chosen columns: galaxies whose only votes are on "merging".
    merging = [c for c in default_vote_schema().columns if c.startswith("votes_merging_")]
    only = ShardDataset(partly_labelled, split="train", label="votes", vote_columns=merging)
    merging_votes = everything.vote_counts[:, [everything.vote_columns.index(c) for c in merging]]  # (N, 3)
    np.testing.assert_array_equal(only.indices, [g for g in everything.indices if merging_votes[g].sum() > 0])
    half = ShardDataset(partly_labelled, split="train", label="votes", label_fraction=0.5, seed=1)
    assert set(half.indices) < set(labelled.indices) and len(half) == pytest.approx(len(labelled) / 2, abs=1)
    with pytest.raises(ValueError, match="choose one of z, morph_class, votes"):
        ShardDataset(partly_labelled, label="vote")


def test_shards_without_votes_refuse_the_votes_label(survey_master, tmp_path):
    from conftest import pack_args

    from sslsky.cli import main
    from sslsky.data.shards import ShardDataset

    out = tmp_path / "packed"
    assert main(pack_args(survey_master, out, "--shard-size", "16")) == 0
    for path in out.glob("shard-*.h5"):
        with h5py.File(path, "r+") as handle:
            del handle[VOTES_DATASET]
    with pytest.raises(ValueError, match="no vote counts"):
        ShardDataset(out, label="votes")


# ---- tiny `sslsky pretrain method=votes` ------------------------------------------------------------

# 4 steps on 16x16 crops, batch 8, validation at 0 and 4, checkpoints at 2 and 4.
TINY_STEPS = ("method=votes", "optim.total_steps=4", "checkpoint_every=2", "val_every=4", "log_every=1",
              "augment.geometry.crop_size=16", "data.val_batches=2")


@dataclass
class VotesRun:
    run_dir: Path
    out: str
    records: list = field(default_factory=list)


@pytest.fixture(scope="module")
def votes_run(partly_labelled, tmp_path_factory) -> VotesRun:
    import contextlib
    import io

    from conftest import tiny_pretrain_args

    from sslsky.cli import main

    run_dir = tmp_path_factory.mktemp("votes") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(tiny_pretrain_args(partly_labelled, run_dir, *TINY_STEPS)) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return VotesRun(run_dir, out.getvalue(), records)


def test_votes_run_draws_labelled_galaxies_and_logs_vote_metrics(votes_run, partly_labelled):
    from sslsky.data.shards import ShardDataset

    everything = ShardDataset(partly_labelled, split="train")
    n_votes = int((everything.vote_counts[everything.indices].sum(axis=1) > 0).sum())
    assert f"{n_votes} of {len(everything)} training galaxies have votes; only those are drawn" in votes_run.out
    assert f"| {n_votes} train /" in votes_run.out
    train = [r for r in votes_run.records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert "acc" not in r and 0 <= r["vote_acc"] <= 1
        assert r["labelled"] == 8  # every galaxy drawn has votes
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["loss"] == pytest.approx(r["loss_votes"])
    val = [r for r in votes_run.records if "val_loss_votes" in r]
    assert [r["step"] for r in val] == [0, 4] and not any("val_top1" in r for r in votes_run.records)
    assert all(r["val_loss_votes"] > 0 and 0 <= r["val_vote_acc"] <= 1 for r in val)
    assert "val vote NLL" in votes_run.out and "contrastive" not in votes_run.out


def test_votes_held_out_metrics_are_recomputed_from_the_checkpoint(votes_run, partly_labelled):
    """The step-4 validation record equals NumPy on the final weights and the labelled val galaxies' eval view."""
    from sslsky.augment import AstroAugment
    from sslsky.config import PretrainConfig, load_config
    from sslsky.data.shards import ShardDataset
    from sslsky.train.checkpoint import load_checkpoint
    from sslsky.vocabulary import default_vote_schema

    cfg = load_config(PretrainConfig, votes_run.run_dir / "config.yaml")
    schema = default_vote_schema()
    model = VoteModel(build_encoder(cfg.model.arch, 5, cfg.model.stem), schema.slices)
    model.load_state_dict(load_checkpoint(votes_run.run_dir / "checkpoints" / "step-00000004.pt")["model"])
    model.eval()
    val = ShardDataset(partly_labelled, split="val")
    rows = [i for i in range(len(val)) if val.vote_counts[val.indices[i]].sum() > 0][:2 * 8]  # val_batches=2
    batch = val.read_batch(rows)
    stats = val.attrs["stats"]
    augment = AstroAugment("sdss", cfg.augment, median=stats["median"], sigma=stats["sigma_mad"])
    with torch.no_grad():
        alpha = numpy_concentrations(model.online_encoder(augment.eval_view(batch["image"])), model.vote_head)
    k = batch["votes"].numpy()
    hits, asked = numpy_first_answer_hits(alpha, k, schema.slices[0])
    record = [r for r in votes_run.records if r.get("step") == 4 and "val_loss_votes" in r][0]
    assert record["val_loss_votes"] == pytest.approx(numpy_dm_nll(alpha, k, schema.slices).mean(), rel=1e-4)
    assert record["val_vote_acc"] == pytest.approx(hits / asked)


def test_votes_run_checkpoints_and_exports_an_encoder_evaluation_loads(votes_run):
    from sslsky.models.loading import load_encoder
    from sslsky.train.checkpoint import list_checkpoints, load_checkpoint

    ckpts = list_checkpoints(votes_run.run_dir / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002.pt", "step-00000004.pt"]
    state = load_checkpoint(ckpts[-1])
    prefixes = {k.split(".")[0] for k in state["model"]}
    assert prefixes == {"online_encoder", "vote_head"}  # no target network, projector or queue
    export, from_ckpt = load_encoder(votes_run.run_dir / "encoder.pt"), load_encoder(ckpts[-1])
    assert export.info["method"] == "votes" and from_ckpt.source == "sslsky-checkpoint"
    for name, tensor in export.encoder.state_dict().items():
        assert torch.equal(tensor, state["model"][f"online_encoder.{name}"]), name
        assert torch.equal(tensor, from_ckpt.encoder.state_dict()[name]), name


def test_votes_run_resumes_bit_identically_from_its_middle_checkpoint(votes_run, partly_labelled, tmp_path, capsys):
    from conftest import tiny_pretrain_args
    from test_pretrain import assert_same_tree

    from sslsky.cli import main
    from sslsky.train.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(votes_run.run_dir / "checkpoints" / "step-00000002.pt", run_dir / "checkpoints")
    assert main(tiny_pretrain_args(partly_labelled, run_dir, *TINY_STEPS)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a = load_checkpoint(votes_run.run_dir / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    for part in ("model", "optimizer", "rng"):  # encoder, vote head, BN statistics, SGD momenta
        assert_same_tree(a[part], b[part], part)
    again = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["vote_acc"]) for r in again if "loss" in r] == \
        [(r["step"], r["loss"], r["vote_acc"]) for r in votes_run.records if "loss" in r and r["step"] > 2]


def test_pretrain_summary_prints_the_vote_curve(votes_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pretrain_summary.py", str(votes_run.run_dir)])
    runpy.run_path(str(REPO / "utils" / "pretrain_summary.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "loss", "train", "acc", "val", "acc", "val", "NLL"]
    assert [line.split()[0] for line in lines[1:3]] == ["0", "4"] and "4 steps" in lines[-1]


def test_votes_without_any_vote_is_a_config_error(packed_mock, tmp_path, capsys):
    from conftest import tiny_pretrain_args

    from sslsky.cli import main

    packed = partly_labelled_copy(packed_mock, tmp_path / "packed", unlabelled=lambda ids: np.ones(len(ids), bool))
    assert main(tiny_pretrain_args(packed, tmp_path / "run", "method=votes")) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "none of the" in err and "has a vote" in err and "Traceback" not in err
