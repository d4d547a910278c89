"""Issue 5: vote schema, Dirichlet-multinomial loss vs NumPy, BYOL EMA, hybrid weighting, 2 gloo ranks vs 1,
and tiny `sslsky pretrain method=byol|hybrid` runs (checkpoints, export, exact resume)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import gloo_group, spawn_gloo
from torch import nn

from sslsky.config import PretrainConfig, VoteCampaignConfig, VoteQuestionConfig, load_config
from sslsky.losses import byol_loss, dirichlet_multinomial_nll
from sslsky.methods import BYOL, HybridBYOL
from sslsky.models import build_encoder
from sslsky.vocabulary import VoteSchema, default_vote_schema, vote_columns

TINY = {"dim": 8, "hidden": 16}


def tiny_encoder() -> nn.Module:
    return build_encoder("resnet18", 3, "imagenet")
SLICES = [(0, 3), (3, 5), (5, 8)]  # three questions, 8 answers


# ---- vote schema --------------------------------------------------------------------------------


def test_default_config_tree_is_the_mock_tree():
    cfg = PretrainConfig()
    schema = VoteSchema.from_campaigns(cfg.votes.campaigns)
    assert schema == default_vote_schema() and list(schema.columns) == vote_columns()
    assert schema.slices[0] == (0, 3) and schema.parents[:3] == (None, 0, 1)  # how-rounded <- smooth


def test_two_campaigns_are_separate_columns(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("votes:\n  campaigns:\n    - {prefix: votes_gz2_}\n"
                    "    - prefix: votes_dr5_\n      questions:\n"
                    "        - {name: smooth-or-featured, answers: [smooth, featured]}\n"
                    "        - {name: has-bar, answers: [strong, weak, none],\n"
                    "           parent: [smooth-or-featured, featured]}\n")
    cfg = load_config(PretrainConfig, path)
    schema = VoteSchema.from_campaigns(cfg.votes.campaigns)
    assert schema.n_answers == 15 + 5 and len(schema.questions) == 6 + 2
    assert schema.columns[15:] == ("votes_dr5_smooth-or-featured_smooth", "votes_dr5_smooth-or-featured_featured",
                                   "votes_dr5_has-bar_strong", "votes_dr5_has-bar_weak", "votes_dr5_has-bar_none")
    assert schema.slices[-1] == (17, 20) and schema.parents[-1] == 16


@pytest.mark.parametrize(("campaigns", "match"), [
    ([VoteCampaignConfig(prefix="gz_")], "must start with 'votes_'"),
    ([VoteCampaignConfig(), VoteCampaignConfig()], "more than one campaign"),
    ([VoteCampaignConfig(questions=[VoteQuestionConfig("a", ["x", "y"], ["b", "x"])])], "parent"),
    ([VoteCampaignConfig(questions=[VoteQuestionConfig("a", ["x"])])], "two or more distinct answers"),
])
def test_bad_schemas_are_explained(campaigns, match):
    with pytest.raises(ValueError, match=match):
        VoteSchema.from_campaigns(campaigns)


# ---- losses against NumPy -------------------------------------------------------------------------


def numpy_dm_nll(alpha: np.ndarray, counts: np.ndarray, slices) -> np.ndarray:
    """(B,) sum over questions of -log DirMult(counts | alpha), questions without votes skipped."""
    from scipy.special import gammaln

    out = np.zeros(len(alpha))
    for i in range(len(alpha)):
        for start, stop in slices:
            a, k = alpha[i, start:stop], counts[i, start:stop]
            n = k.sum()
            if n == 0:
                continue
            log_p = (gammaln(n + 1) - gammaln(k + 1).sum() + gammaln(a.sum()) - gammaln(n + a.sum())
                     + (gammaln(k + a) - gammaln(a)).sum())
            out[i] -= log_p
    return out


def test_dirichlet_multinomial_matches_numpy_with_unasked_questions_and_unlabelled_galaxies():
    rng = np.random.default_rng(0)
    alpha = 1.0 + 100.0 * rng.random((6, 8))
    counts = rng.integers(0, 30, (6, 8))
    counts[1, 3:5] = 0  # question 2 never asked of galaxy 1
    counts[2, :] = 0  # galaxy 2: no votes at all
    counts[4, 0:3] = [0, 0, 1]  # a single vote
    a, k = torch.tensor(alpha, dtype=torch.float32, requires_grad=True), torch.tensor(counts, dtype=torch.int32)
    per_galaxy = dirichlet_multinomial_nll(a, k, SLICES, reduction="none")
    expected = numpy_dm_nll(alpha, counts, SLICES)
    np.testing.assert_allclose(per_galaxy.detach().numpy(), expected, rtol=1e-5)
    assert per_galaxy[2].item() == 0.0 and (per_galaxy > 0).sum() == 5
    mean = dirichlet_multinomial_nll(a, k, [slice(s, e) for s, e in SLICES])
    np.testing.assert_allclose(mean.item(), expected.mean(), rtol=1e-5)  # the unlabelled galaxy counts, with 0
    mean.backward()
    assert torch.all(a.grad[2] == 0) and torch.all(a.grad[1, 3:5] == 0) and torch.all(a.grad[0] != 0)


def test_dirichlet_multinomial_rejects_bad_input():
    with pytest.raises(ValueError, match="both be"):
        dirichlet_multinomial_nll(torch.ones(2, 3), torch.ones(2, 4), [(0, 3)])
    with pytest.raises(ValueError, match="reduction"):
        dirichlet_multinomial_nll(torch.ones(2, 3), torch.ones(2, 3), [(0, 3)], reduction="sum")


def test_byol_loss_matches_numpy():
    rng = np.random.default_rng(1)
    p, z = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    cos = (p * z).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
    got = byol_loss(torch.tensor(p, dtype=torch.float32), torch.tensor(z, dtype=torch.float32))
    np.testing.assert_allclose(got.item(), np.mean(2 - 2 * cos), rtol=1e-5)


# ---- BYOL ---------------------------------------------------------------------------------------


def perturb_online(model: BYOL) -> None:
    """Move the online network away from the target (they start equal)."""
    with torch.no_grad():
        for param in model.online_parameters():
            param.add_(0.1 * torch.randn_like(param))


def test_byol_ema_update_is_exact_and_targets_get_no_gradient():
    torch.manual_seed(0)
    model = BYOL(tiny_encoder(), base_momentum=0.9, **TINY)
    perturb_online(model)
    online = [p.detach().clone() for p in model.online_parameters()]
    target = [p.detach().clone() for p in model.target_parameters()]
    x = torch.randn(4, 3, 16, 16)
    loss, metrics = model({"view1": x, "view2": x.flip(-1)})
    top1 = metrics["acc"]
    assert all(torch.equal(a, b) for a, b in zip(target, model.target_parameters()))  # the forward leaves it
    total = 10
    model.after_step(3, total)  # after the optimizer step: EMA with the cosine momentum of step 3
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / total) + 1) / 2
    assert model.momentum == pytest.approx(m)
    for o, t, new in zip(online, target, model.target_parameters()):
        torch.testing.assert_close(new, m * t + (1 - m) * o, rtol=0, atol=1e-7)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_parameters())
    assert all(p.grad is not None for p in model.parameters_to_optimize())
    names = {id(p) for p in model.parameters_to_optimize()}
    assert not names & {id(p) for p in model.target_parameters()}
    assert 0 <= loss.item() <= 8 and 0 <= top1.item() <= 1


def test_byol_from_config_and_encoder_export():
    from sslsky.train.pretrain import build_method

    cfg = load_config(PretrainConfig, None, ["method=byol", "model.arch=resnet18", "model.stem=imagenet",
                                             "model.byol.dim=8", "model.byol.hidden=16"])
    model = build_method(cfg, n_bands=5, image_size=32, votes=None)
    assert isinstance(model, BYOL) and model.momentum == 0.99 and model.feature_dim == 512
    assert model.encoder is model.online_encoder and model.predictor[0].out_features == 16
    encoder = build_encoder("resnet18", 5, "imagenet")
    encoder.load_state_dict(model.encoder.state_dict())  # strict


# ---- hybrid weighting ---------------------------------------------------------------------------


def test_hybrid_weighting_scales_the_vote_gradient_without_gradient_through_the_ratio():
    l_byol = torch.tensor(-0.6, requires_grad=True)  # negative: |L_BYOL| in the ratio
    nll = torch.tensor([3.0, 5.0, 0.0, 9.0], requires_grad=True)
    labelled = torch.tensor([True, True, False, True])
    loss, terms = HybridBYOL.combine(l_byol, nll, labelled, weight=0.5)
    l_votes = (3.0 + 5.0 + 9.0) / 3
    scale = 0.6 / l_votes
    assert loss.item() == pytest.approx(-0.6 + 0.5 * scale * l_votes)  # = L_BYOL + w |L_BYOL|
    assert terms["loss_votes"].item() == pytest.approx(l_votes) and terms["vote_scale"].item() == pytest.approx(scale)
    loss.backward()
    assert l_byol.grad.item() == pytest.approx(1.0)  # no gradient through the ratio
    torch.testing.assert_close(nll.grad, torch.tensor([1.0, 1.0, 0.0, 1.0]) * 0.5 * scale / 3)
    # No labelled galaxy: the vote term vanishes (and nothing is NaN).
    loss, terms = HybridBYOL.combine(torch.tensor(0.7), torch.zeros(4, requires_grad=True), torch.zeros(4, dtype=bool),
                                     weight=1.0)
    assert loss.item() == pytest.approx(0.7) and terms["vote_scale"].item() == 0.0


def test_hybrid_head_concentrations_and_votes_check():
    torch.manual_seed(0)
    model = HybridBYOL(tiny_encoder(), SLICES, vote_weight=1.0, **TINY)
    with torch.no_grad():
        model.vote_head.bias.fill_(50.0)
        high = model.concentrations(torch.randn(3, 512))
        model.vote_head.bias.fill_(-50.0)
        low = model.concentrations(torch.randn(3, 512))
    assert high.shape == (3, 8) and torch.all(high <= 101) and torch.all(low >= 1)
    with pytest.raises(ValueError, match="vote counts"):
        model({"view1": torch.randn(2, 3, 16, 16), "view2": torch.randn(2, 3, 16, 16)})


# ---- 2 gloo processes against 1 ------------------------------------------------------------------

GLOBAL_BATCH = 8


def freeze_bn(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def hybrid_inputs():
    gen = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
    votes = torch.randint(0, 20, (GLOBAL_BATCH, 8), generator=gen, dtype=torch.int32)
    votes[[1, 2, 3, 6]] = 0  # rank 0 has 1 labelled galaxy of 4, rank 1 has 3: the global mean is not a mean of means
    votes[0, 3:5] = 0
    return v1, v2, votes


def tiny_hybrid() -> HybridBYOL:
    torch.manual_seed(0)
    model = HybridBYOL(tiny_encoder(), SLICES, vote_weight=0.7, base_momentum=0.9, **TINY)
    perturb_online(model)
    freeze_bn(model)  # BN on running statistics: per-sample network, so 2 x half batch = 1 x full batch
    return model


def hybrid_step(model: HybridBYOL, net: nn.Module, v1, v2, votes) -> dict:
    optimizer = torch.optim.SGD(model.parameters_to_optimize(), lr=0.5)
    loss, metrics = net({"view1": v1, "view2": v2, "votes": votes})
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.after_step(1, 10)
    return {"loss": loss.detach(), "terms": {k: v.clone() for k, v in metrics.items() if k != "acc"},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, init_file):
        half = GLOBAL_BATCH // world
        v1, v2, votes = (x[rank * half:(rank + 1) * half] for x in hybrid_inputs())
        model = tiny_hybrid()
        result = hybrid_step(model, DistributedDataParallel(model, broadcast_buffers=False), v1, v2, votes)
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_hybrid_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = spawn_gloo(dist_worker, tmp_path)
    model = tiny_hybrid()
    ref = hybrid_step(model, model, *hybrid_inputs())
    assert ref["terms"]["labelled"].item() == 4 and ref["terms"]["vote_scale"].item() > 0
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref["loss"], atol=1e-5, rtol=1e-5)
    for r in ranks:
        for name, value in ref["terms"].items():  # global terms, the same on every rank
            torch.testing.assert_close(r["terms"][name], value, atol=1e-5, rtol=1e-5, msg=name)
        for name, value in ref["state"].items():  # online (after SGD), target (EMA), vote head, BN buffers
            torch.testing.assert_close(r["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)


# ---- shards and tiny pretraining runs ---------------------------------------------------------------


def test_shards_return_votes_in_the_schema_order(packed_mock):
    from sslsky.data.shards import ShardDataset

    columns = vote_columns()
    ds = ShardDataset(packed_mock, split="train")
    assert ds.vote_columns == columns
    item, batch = ds[3], ds.read_batch([3, 0, 5])
    assert item["votes"].shape == (len(columns),) and item["votes"].dtype == torch.int32
    assert batch["votes"].shape == (3, len(columns)) and torch.equal(batch["votes"][0], item["votes"])
    reordered = ShardDataset(packed_mock, split="train", vote_columns=columns[::-1])
    assert torch.equal(reordered[3]["votes"], item["votes"].flip(0))
    assert (ds.vote_counts.sum(axis=1) > 0).any()
    with pytest.raises(ValueError, match="votes_dr5_x"):
        ShardDataset(packed_mock, vote_columns=[*columns, "votes_dr5_x"])


@dataclass
class TinyRun:
    method: str
    run_dir: object
    records: list = field(default_factory=list)


# 4 steps on 16x16 crops, validation once at the end: checkpoints at 2 and 4.
TINY_STEPS = ("optim.total_steps=4", "checkpoint_every=2", "val_every=4", "log_every=2", "model.byol.hidden=32",
              "model.byol.dim=64",
              "augment.geometry.crop_size=16", "data.val_batches=1")


@pytest.fixture(scope="module", params=["byol", "hybrid"])
def tiny_run(request, packed_mock, tmp_path_factory) -> TinyRun:
    from conftest import tiny_pretrain_args  # imported here: the gloo workers import this module, keep it light

    from sslsky.cli import main

    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    # byol: only the final checkpoint (the mid-run one is for the hybrid's resume test)
    extra = ("checkpoint_every=4",) if request.param == "byol" else ()
    assert main(tiny_pretrain_args(packed_mock, run_dir, f"method={request.param}", *TINY_STEPS, *extra)) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return TinyRun(request.param, run_dir, records)


def test_tiny_run_checkpoints_exports_and_logs(tiny_run, packed_mock):
    from sslsky.models.loading import load_encoder
    from sslsky.train.checkpoint import list_checkpoints, load_checkpoint

    train = [r for r in tiny_run.records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    if tiny_run.method == "hybrid":
        assert all(r["loss_votes"] > 0 and r["vote_scale"] > 0 and r["labelled"] > 0 for r in train)
    ckpts = list_checkpoints(tiny_run.run_dir / "checkpoints")
    assert [c.name for c in ckpts][-1] == "step-00000004.pt"
    state = load_checkpoint(ckpts[-1])
    assert any(k.startswith("target_encoder.") for k in state["model"])
    assert any(k.startswith("vote_head.") for k in state["model"]) == (tiny_run.method == "hybrid")
    export = load_encoder(tiny_run.run_dir / "encoder.pt")
    from_ckpt = load_encoder(ckpts[-1])
    assert from_ckpt.source == "sslsky-checkpoint"
    for name, tensor in export.encoder.state_dict().items():
        assert torch.equal(tensor, state["model"][f"online_encoder.{name}"]), name
        assert torch.equal(tensor, from_ckpt.encoder.state_dict()[name]), name


def test_tiny_run_resumes_exactly_from_its_middle_checkpoint(tiny_run, packed_mock, tmp_path, capsys):
    if tiny_run.method != "hybrid":
        pytest.skip("byol resumes through the same code (the hybrid run covers it)")
    from conftest import tiny_pretrain_args

    from sslsky.cli import main
    from sslsky.train.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run.run_dir / "checkpoints" / "step-00000002.pt", run_dir / "checkpoints")
    assert main(tiny_pretrain_args(packed_mock, run_dir, f"method={tiny_run.method}", *TINY_STEPS)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a = load_checkpoint(tiny_run.run_dir / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    for name, tensor in a["model"].items():  # online, target (EMA from the step's momentum), heads, BN buffers
        assert torch.equal(tensor, b["model"][name]), name


def test_hybrid_on_shards_without_the_configured_votes_is_a_config_error(packed_mock, tmp_path, capsys):
    from conftest import tiny_pretrain_args

    from sslsky.cli import main

    rc = main(tiny_pretrain_args(packed_mock, tmp_path / "run", "method=hybrid",
                                 "votes.campaigns=[{prefix: votes_dr5_}]"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "votes_dr5_smooth-or-featured_smooth" in err and "votes.campaigns" in err
