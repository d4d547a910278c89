"""``method: align`` (GalaxAlign, issue 13): the CLIP / UniCL loss against NumPy and across 2 gloo ranks, vote-path
captions and the tokenizer on hand examples, the stage-2 copy and exact resumes of real CLI runs, config errors,
zero-shot accuracy at test scale, and a run that never touches the network."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import REPO, gloo_group, spawn_gloo, tiny_pretrain_args
from torch import nn

from sslsky.cli import main
from sslsky.config import AlignConfig
from sslsky.data.captions import (
    EOT,
    PAD,
    SOT,
    UNK,
    VotePath,
    WordTokenizer,
    chosen_answers,
    path_index,
    path_table,
    vote_caption,
    vote_paths,
    words,
)
from sslsky.losses import clip_loss
from sslsky.models.text import TextTransformer
from sslsky.train.checkpoint import CHECKPOINT_PATTERN, load_checkpoint
from sslsky.vocabulary import default_vote_schema

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---- 1. clip_loss against NumPy ----------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def numpy_clip(a: np.ndarray, b: np.ndarray, logit_scale: float, mask=None, labels=None) -> float:
    """float64: only the rows of ``mask`` exist; target of row i = uniform over the kept columns with row i's label
    (its own column alone without labels); mean over kept pairs of (row CE + column CE) / 2; 0 without a pair."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.ones(len(a), bool) if mask is None else np.asarray(mask, bool)
    if not keep.any():
        return 0.0
    lab = np.arange(len(a)) if labels is None else np.asarray(labels)
    a_hat = a[keep] / np.linalg.norm(a[keep], axis=1, keepdims=True)
    b_hat = b[keep] / np.linalg.norm(b[keep], axis=1, keepdims=True)
    lab = lab[keep]
    logits = math.exp(logit_scale) * a_hat @ b_hat.T  # (n, n): row i = a_i against every b
    target = (lab[:, None] == lab[None, :]).astype(np.float64)
    target /= target.sum(axis=1, keepdims=True)
    rows = -(target * log_softmax(logits)).sum(axis=1)
    cols = -(target * log_softmax(logits.T)).sum(axis=1)  # b_j against every a; same-label targets (symmetric)
    return float(np.mean(0.5 * (rows + cols)))


def pairs(rng: np.random.Generator, b: int, d: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(b, d))
    return a * rng.uniform(0.2, 5.0, (b, 1)), (a + noise * rng.normal(size=(b, d))) * rng.uniform(0.2, 5.0, (b, 1))


CASES = [  # (B, D, logit_scale, mask, labels)
    (1, 3, 2.0, None, None),
    (6, 4, math.log(1 / 0.07), None, None),
    (9, 5, 0.3, [1, 0, 1, 1, 0, 1, 1, 1, 0], None),
    (8, 6, 1.5, None, [0, 1, 0, 2, 1, 0, 3, 2]),
    (10, 4, 2.5, [1, 1, 0, 1, 1, 1, 0, 1, 1, 0], [2, 2, 2, 1, 0, 1, 1, 0, 2, 1]),
    (5, 3, 1.0, None, [4, 4, 4, 4, 4]),  # one label for all: every target uniform
    (12, 8, math.log(100), None, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),  # all distinct labels = plain CLIP
]


@pytest.mark.parametrize(("b", "d", "logit_scale", "mask", "labels"), CASES)
def test_clip_loss_matches_numpy(b, d, logit_scale, mask, labels):
    a, bb = pairs(np.random.default_rng(b * 10 + d), b, d)
    kw = {"mask": None if mask is None else torch.tensor(mask, dtype=torch.bool),
          "labels": None if labels is None else torch.tensor(labels)}
    loss = clip_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(bb, dtype=torch.float32), logit_scale, **kw)
    ref = numpy_clip(a, bb, logit_scale, mask, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    loss64 = clip_loss(torch.tensor(a), torch.tensor(bb), torch.tensor(logit_scale, dtype=torch.float64), **kw)
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    if b >= 6 and labels is None:  # the case has teeth: the mask/labels change the value
        assert abs(ref - numpy_clip(a, bb, logit_scale, None, [0] * b)) > 1e-3


def test_clip_loss_all_distinct_labels_equal_no_labels_and_a_single_pair_is_zero():
    a, b = (torch.tensor(x) for x in pairs(np.random.default_rng(1), 7, 5))
    assert clip_loss(a, b, 1.2, labels=torch.arange(10, 17)).item() == pytest.approx(clip_loss(a, b, 1.2).item(),
                                                                                     abs=1e-14)
    one = torch.tensor([True, False, False, False, False, False, False])
    assert clip_loss(a, b, 1.2, mask=one).item() == pytest.approx(0.0, abs=1e-14)  # one candidate: softmax = 1


def test_clip_loss_without_any_pair_is_zero_with_zero_gradients():
    a, b = (torch.tensor(x, requires_grad=True) for x in pairs(np.random.default_rng(2), 4, 3))
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(a, b, scale, mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    for t in (a, b, scale):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def numeric_gradient(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f at every entry of x (float64)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


@pytest.mark.parametrize(("mask", "labels"), [(None, None), ([1, 1, 0, 1, 1, 1], None),
                                              ([1, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 2])])
def test_clip_loss_gradients_match_numpy_finite_differences(mask, labels):
    a0, b0 = pairs(np.random.default_rng(3), 6, 4)
    s0 = 1.7
    a, b = torch.tensor(a0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    scale = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(a, b, scale, mask=None if mask is None else torch.tensor(mask, dtype=torch.bool),
                     labels=None if labels is None else torch.tensor(labels))
    loss.backward()
    ref_a = numeric_gradient(lambda x: numpy_clip(x, b0, s0, mask, labels), a0)
    ref_b = numeric_gradient(lambda x: numpy_clip(a0, x, s0, mask, labels), b0)
    ref_s = numeric_gradient(lambda x: numpy_clip(a0, b0, float(x[0]), mask, labels), np.array([s0]))[0]
    np.testing.assert_allclose(a.grad.numpy(), ref_a, atol=1e-7, rtol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), ref_b, atol=1e-7, rtol=1e-5)
    assert scale.grad.item() == pytest.approx(ref_s, rel=1e-5, abs=1e-8)
    assert abs(ref_s) > 1e-3  # the scale gradient is not trivially 0
    if mask is not None:  # a masked-out row takes no part: zero gradient
        dropped = [i for i, m in enumerate(mask) if not m]
        assert torch.count_nonzero(a.grad[dropped]) == 0 and torch.count_nonzero(b.grad[dropped]) == 0


@pytest.mark.parametrize(("shape_a", "shape_b", "mask_shape", "match"), [
    ((4, 8), (3, 8), None, "a and b"),
    ((4, 8), (4, 7), None, "a and b"),
    ((4,), (4,), None, "a and b"),
    ((2, 4, 8), (2, 4, 8), None, "a and b"),
    ((0, 8), (0, 8), None, "a and b"),
    ((4, 8), (4, 8), (3,), "mask"),
    ((4, 8), (4, 8), (4, 1), "mask"),
])
def test_clip_loss_rejects_bad_shapes(shape_a, shape_b, mask_shape, match):
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        clip_loss(torch.randn(shape_a), torch.randn(shape_b), 1.0, mask=mask)


@pytest.mark.parametrize("labels_shape", [(1,), (3,), (5,), (4, 1)])
def test_clip_loss_rejects_labels_of_the_wrong_shape(labels_shape):
    """labels must be (B,) like mask (docstring). (1,) broadcasts silently to a wrong value today."""
    with pytest.raises(ValueError, match="labels"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0, labels=torch.zeros(labels_shape, dtype=torch.int64))


# ---- 2. two gloo ranks = one process on the combined batch -----------------------------------------------------

GLOBAL_BATCH, IN_DIM, OUT_DIM = 12, 7, 5
MASK = [1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0]  # rank 0 has 5 labelled rows, rank 1 has 2
LABELS = [0, 1, 2, 0, 1, 2, 2, 2, 0, 1, 3, 3]  # same-label pairs across the two ranks
DIST_CASES = {"plain": (None, None), "mask": (MASK, None), "labels": (None, LABELS), "both": (MASK, LABELS)}


class PairTowers(nn.Module):
    """Two linear towers and a learnable logit scale; forward is the CLIP loss (float64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(IN_DIM, OUT_DIM).double(), nn.Linear(IN_DIM, OUT_DIM).double()
        self.logit_scale = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x, y, mask, labels, gather=True):
        return clip_loss(self.image(x), self.text(y), self.logit_scale, mask=mask, labels=labels, gather=gather)


def dist_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    return x, x + 0.7 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)


def as_tensors(mask, labels, rows=slice(None)):
    return (None if mask is None else torch.tensor(mask, dtype=torch.bool)[rows],
            None if labels is None else torch.tensor(labels)[rows])


def towers_step(net: nn.Module, model: nn.Module, x, y, mask, labels, gather=True) -> dict:
    loss = net(x, y, mask, labels, gather=gather)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, world, init_file):
        half = GLOBAL_BATCH // world
        rows = slice(rank * half, (rank + 1) * half)
        x, y = (t[rows] for t in dist_inputs())
        result = {}
        for name, (mask, labels) in DIST_CASES.items():
            model = PairTowers()
            result[name] = towers_step(DistributedDataParallel(model), model, x, y, *as_tensors(mask, labels, rows))
        model = PairTowers()  # without the gather: each rank's half batch alone
        result["local"] = towers_step(DistributedDataParallel(model), model, x, y, None, None, gather=False)
        torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    ranks = spawn_gloo(dist_worker, tmp_path)
    x, y = dist_inputs()
    for name, (mask, labels) in DIST_CASES.items():
        model = PairTowers()
        ref = towers_step(model, model, x, y, *as_tensors(mask, labels))
        with torch.no_grad():  # the one-process reference is itself the NumPy loss
            expected = numpy_clip(model.image(x).numpy(), model.text(y).numpy(), 1.3, mask, labels)
        assert ref["loss"].item() == pytest.approx(expected, rel=1e-12)
        for rank, r in enumerate(ranks):  # the value is the global loss on every rank, not a share
            torch.testing.assert_close(r[name]["loss"], ref["loss"], atol=1e-12, rtol=1e-10,
                                       msg=f"{name} rank {rank}")
            for param, grad in ref["grads"].items():  # DDP-averaged gradients = one process's
                torch.testing.assert_close(r[name]["grads"][param], grad, atol=1e-12, rtol=1e-10,
                                           msg=f"{name} rank {rank} {param}")
    # teeth: without the gather the loss and gradients are those of two separate half batches
    model = PairTowers()
    ref = towers_step(model, model, x, y, None, None)
    assert abs(ranks[0]["local"]["loss"].item() - ref["loss"].item()) > 1e-2
    assert not torch.allclose(ranks[0]["local"]["grads"]["image.weight"], ref["grads"]["image.weight"], atol=1e-4)


# ---- 3. vote-path captions on hand examples -----------------------------------------------------------------

# default tree columns: smooth-or-featured 0 smooth 1 featured 2 artifact | how-rounded 3 round 4 in-between
# 5 cigar (after smooth) | disk-edge-on 6 yes 7 no (after featured) | has-bar 8 yes 9 no (after edge-on no) |
# spiral-arms 10 yes 11 no (after edge-on no) | merging 12 none 13 minor 14 major
HAND = [  # (votes by column, chosen column per question, caption with the default phrases)
    ({0: 10, 1: 3, 3: 2, 4: 5, 5: 5, 6: 4, 12: 1, 13: 1},  # ties -> the first; edge-on votes but featured not chosen
     (0, 4, -1, -1, -1, 12), "a galaxy that is smooth and in between round and cigar-shaped"),
    ({0: 1, 1: 9, 3: 3, 6: 2, 7: 6, 8: 3, 9: 3, 14: 4},  # how-rounded votes under featured: not asked; arms 0 votes
     (1, -1, 7, 8, -1, 14), "a galaxy that is featured with a disk, seen face-on, barred and in a major merger"),
    ({13: 2, 3: 5}, (-1, -1, -1, -1, -1, 13), "a galaxy that is merging with a smaller galaxy"),  # top unanswered
    ({0: 3, 1: 3, 2: 3, 6: 5}, (0, -1, -1, -1, -1, -1), "a galaxy that is smooth"),  # three-way tie
    ({1: 4, 6: 3, 7: 1, 8: 9, 11: 2, 12: 8}, (1, -1, 6, -1, -1, 12),
     "a galaxy that is featured with a disk and seen edge-on"),  # bar/arms votes under edge-on yes: not asked
    ({2: 1}, (2, -1, -1, -1, -1, -1), "a galaxy that is an artifact"),
    ({}, (-1, -1, -1, -1, -1, -1), ""),  # no votes at all
]


def vote_matrix(schema, rows) -> torch.Tensor:
    out = torch.zeros(len(rows), schema.n_answers, dtype=torch.int64)
    for i, row in enumerate(rows):
        for column, count in row.items():
            out[i, column] = count
    return out


def test_default_tree_is_the_one_the_hand_examples_assume():
    schema = default_vote_schema()
    assert schema.slices == ((0, 3), (3, 6), (6, 8), (8, 10), (10, 12), (12, 15))
    assert schema.parents == (None, 0, 1, 7, 7, None)


def test_chosen_answers_captions_and_path_index_on_hand_votes():
    schema, cfg = default_vote_schema(), AlignConfig()
    votes = vote_matrix(schema, [v for v, _, _ in HAND])
    chosen = chosen_answers(votes, schema)
    assert chosen.tolist() == [list(c) for _, c, _ in HAND]
    assert chosen_answers(votes.float(), schema).tolist() == chosen.tolist()  # float counts (the loader's) too
    for (_, c, caption) in HAND:
        assert vote_caption(VotePath(c), schema, cfg.answer_phrases, cfg.vote_caption) == caption
    paths, codes = path_table(schema)
    index = path_index(votes, schema, codes)
    assert [paths[i].chosen for i in index.tolist()] == [c for _, c, _ in HAND]
    assert len(set(index.tolist())) == len(HAND)


def test_number_of_vote_paths_of_the_default_tree():
    """By hand: smooth-or-featured smooth -> how-rounded 3 answers or not asked (4); featured -> disk-edge-on yes (1),
    not asked (1) or no -> has-bar (3 ways: 2 answers or not asked) x spiral-arms (3) = 9, so 11; artifact (1);
    not asked (1): 4 + 11 + 1 + 1 = 17, times merging (3 answers or not asked: 4) = 68."""
    schema = default_vote_schema()
    paths, codes = path_table(schema)
    assert len(paths) == len(vote_paths(schema)) == 68
    assert len({p.chosen for p in paths}) == 68
    assert torch.all(codes[1:] > codes[:-1])  # sorted and unique: searchsorted finds each


def test_every_vote_path_comes_back_from_votes_that_realise_it():
    """One vote on each chosen answer realises a path; path_index must give its own position in path_table."""
    schema = default_vote_schema()
    paths, codes = path_table(schema)
    votes = vote_matrix(schema, [{c: 1 for c in p.chosen if c >= 0} for p in paths])
    assert chosen_answers(votes, schema).tolist() == [list(p.chosen) for p in paths]
    assert path_index(votes, schema, codes).tolist() == list(range(len(paths)))


def test_vote_caption_without_a_phrase_names_the_answer():
    schema = default_vote_schema()
    phrases = dict(AlignConfig().answer_phrases)
    del phrases["has-bar/yes"]
    with pytest.raises(ValueError, match="has-bar/yes"):
        vote_caption(VotePath((1, -1, 7, 8, -1, 12)), schema, phrases, "a galaxy that is {answers}")


# ---- 4. the tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_ids_positions_and_round_trip():
    texts = ["A smooth, round galaxy", "a cigar-shaped galaxy", "in-between smooth"]
    tok = WordTokenizer.from_texts(texts)
    assert tok.vocabulary == ["<pad>", "<sot>", "<eot>", "<unk>", ",", "a", "cigar-shaped", "galaxy", "in-between",
                              "round", "smooth"]
    ids = tok.encode(texts, 8)
    assert ids.shape == (3, 8) and ids.dtype == torch.int64
    assert ids[0].tolist() == [SOT, 5, 10, 4, 9, 7, EOT, PAD]
    assert ids[1].tolist() == [SOT, 5, 6, 7, EOT, PAD, PAD, PAD]
    assert ids[2].tolist() == [SOT, 8, 10, EOT, PAD, PAD, PAD, PAD]
    for text, row in zip(texts, ids.tolist()):
        end = row.index(EOT)
        assert [tok.vocabulary[i] for i in row[1:end]] == words(text) == text.lower().replace(",", " ,").split()
        assert all(i == PAD for i in row[end + 1:])
    assert tok.encode(["a blue galaxy"], 6)[0].tolist() == [SOT, 5, UNK, 7, EOT, PAD]  # not strict: <unk>
    assert WordTokenizer(tok.vocabulary).encode(texts, 8).equal(ids)  # rebuilt from the stored vocabulary


def test_tokenizer_errors():
    tok = WordTokenizer.from_texts(["a smooth round galaxy"])
    with pytest.raises(ValueError) as err:
        tok.encode(["a smooth, blue elliptical galaxy"], 10, strict=True)
    assert "[',', 'blue', 'elliptical']" in str(err.value)  # every unknown word, the comma included
    assert tok.unknown("a smooth, blue elliptical galaxy") == [",", "blue", "elliptical"]
    assert tok.encode(["a smooth round"], 5).tolist() == [[SOT, 4, 7, 6, EOT]]  # exactly context - 2 words fit
    with pytest.raises(ValueError, match="context"):
        tok.encode(["a smooth round galaxy"], 5)
    with pytest.raises(ValueError):
        WordTokenizer(["a", "b"])  # no specials
    with pytest.raises(ValueError):
        WordTokenizer(["<pad>", "<sot>", "<eot>", "<unk>", "a", "a"])  # repeated word


def test_text_tower_reads_the_eot_token_and_ignores_what_follows():
    torch.manual_seed(0)
    tower = TextTransformer(12, 8, EOT, width=16, depth=2, heads=2).eval()
    tokens = torch.tensor([[SOT, 5, 6, EOT, PAD, PAD, PAD, PAD], [SOT, 5, 6, EOT, 9, 10, 11, 7],
                           [SOT, 5, 7, EOT, PAD, PAD, PAD, PAD]])
    with torch.no_grad():
        out = tower(tokens)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-6)  # causal: tokens after <eot> do not reach it
    assert not torch.allclose(out[0], out[2], atol=1e-4)  # a different word before it does


# ---- 5. stage 2: the copy at its start, and exact resumes ----------------------------------------------------

STAGES = "model.align.stages=[{steps: 3}, {steps: 3, symbol_tower: own, image_symbol: 1.0}]"
SMALL = ("method=align", "model.align.text_depth=1", "model.align.text_width=32", "model.align.embed_dim=16")


def stage_args(packed: Path, run_dir: Path) -> list[str]:
    return tiny_pretrain_args(packed, run_dir, *SMALL, "optim.total_steps=6", STAGES, "val_every=3",
                              "checkpoint_every=1", "keep_checkpoints=10")


def checkpoint(run_dir: Path, step: int) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / CHECKPOINT_PATTERN.format(step=step))


@pytest.fixture(scope="module")
def stage_run(packed_mock, tmp_path_factory) -> Path:
    """The two-stage CLI run of 6 steps with a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("align_stages") / "run"
    assert main(stage_args(packed_mock, run_dir)) == 0
    return run_dir


def tower(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_stage_two_starts_from_a_copy_of_the_image_tower(stage_run):
    states = {s: checkpoint(stage_run, s)["model"] for s in (1, 2, 3, 4, 6)}
    for s, state in states.items():
        assert int(state["steps_done"]) == s
    image, symbol = ({s: {**tower(st, f"{t}_tower."), **{f"proj.{k}": v for k, v in tower(st, f"{t}_projection.")
                                                            .items()}} for s, st in states.items()}
                     for t in ("image", "symbol"))
    assert len(image[3]) > 10 and "proj.weight" in image[3]
    assert same(symbol[1], symbol[2])  # stage 1: the symbols go through the image tower, the own one idles
    assert not same(image[1], image[2])  # ... while the image tower trains
    assert not same(symbol[2], image[2])
    assert same(symbol[3], image[3])  # after_step(3): the copy, weights and BN statistics alike
    assert not same(symbol[4], symbol[3])  # stage 2 trains the symbol tower
    assert not any(torch.equal(symbol[6][k], image[6][k]) for k in ("proj.weight", "conv1.weight"))


@pytest.mark.parametrize("from_step", [3, 2])
def test_resume_is_bit_identical_to_the_uninterrupted_run(stage_run, packed_mock, tmp_path, from_step):
    """From the step-3 checkpoint (the copy done) and from step 2 (stage 1: the copy still to come)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = CHECKPOINT_PATTERN.format(step=from_step)
    shutil.copy(stage_run / "checkpoints" / name, run_dir / "checkpoints" / name)
    assert main(stage_args(packed_mock, run_dir)) == 0
    resumed, whole = checkpoint(run_dir, 6), checkpoint(stage_run, 6)
    assert resumed["model"].keys() == whole["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert int(resumed["model"]["steps_done"]) == 6
    for a, b in zip(resumed["optimizer"]["state"].values(), whole["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # the metrics of the resumed steps are those of the whole run
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = {r["step"]: r for r in map(json.loads, (stage_run / "metrics.jsonl").read_text().splitlines())
           if "loss" in r}
    losses = [r for r in logged if "loss" in r]
    assert losses and all(r["loss"] == ref[r["step"]]["loss"] for r in losses)


# ---- 6. config errors ---------------------------------------------------------------------------------------


def test_stages_that_do_not_add_up_are_a_config_error(packed_mock, tmp_path, capsys):
    args = tiny_pretrain_args(packed_mock, tmp_path / "run", *SMALL, "optim.total_steps=6",
                              "model.align.stages=[{steps: 2}, {steps: 3, symbol_tower: own}]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "add up to 5" in err and "optim.total_steps=6" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stage_without_any_weight_is_a_config_error(packed_mock, tmp_path, capsys):
    args = tiny_pretrain_args(packed_mock, tmp_path / "run", *SMALL, "optim.total_steps=6",
                              "model.align.stages=[{steps: 3}, {steps: 3, image_text: 0, symbol_text: 0}]")
    assert main(args) == 2
    assert "stages[1]" in capsys.readouterr().err


def test_a_class_without_a_caption_is_a_config_error_naming_it(packed_mock, tmp_path, capsys):
    captions = dict(AlignConfig().class_captions)
    del captions["barred spiral"]
    args = tiny_pretrain_args(packed_mock, tmp_path / "run", *SMALL, "optim.total_steps=2",
                              f"model.align.class_captions={json.dumps(captions)}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no caption for class(es) ['barred spiral'] in model.align.class_captions" in err


# ---- 7. zero-shot beats chance at test scale ------------------------------------------------------------------

# The recipe of config/pretrain_align.yaml (AdamW, the text tower being a transformer from scratch) at test scale.
ZERO_SHOT = ("data.batch_size=16", "optim.total_steps=60", "optim.name=adamw", "optim.base_lr=0.016",
             "optim.weight_decay=0.05", "optim.warmup_steps=5", "val_every=0", "checkpoint_every=100",
             "log_every=10", 'model.align.init=""',
             "model.align.stages=[{steps: 30}, {steps: 30, symbol_tower: own, image_symbol: 1.0}]")


@pytest.fixture(scope="module")
def zero_shot(packed_mock, tmp_path_factory) -> dict:
    from sslsky.data.shards import ShardDataset
    from sslsky.methods.align import load_aligned

    run_dir = tmp_path_factory.mktemp("align_zero_shot") / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "method=align", *ZERO_SHOT)) == 0
    model, loaded = load_aligned(run_dir / "encoder.pt")
    proto = model.prototypes()["text"]  # (K, D)
    # the 102 train galaxies the towers were aligned on: 13 val galaxies could not tell a model from chance;
    # whether the alignment generalises is what benchmarks/align.py measures, on a mock 40 times larger
    train = ShardDataset(packed_mock, split="train")
    batch = train.read_batch(np.arange(len(train)))
    truth = batch["morph_class"].numpy()
    with torch.no_grad():
        image = F.normalize(model.embed_image(loaded.transform(batch["image"])).float(), dim=1)
    predicted = (image @ proto.T).argmax(dim=1).numpy()
    return {"accuracy": float((predicted == truth).mean()), "majority": float(np.bincount(truth).max() / len(truth)),
            "chance": 1 / len(proto), "predicted": np.bincount(predicted, minlength=len(proto)).tolist(),
            "k": len(proto), "names": model.class_names}


def test_zero_shot_set_up(zero_shot):
    assert zero_shot["k"] == 7 and zero_shot["names"][4] == "barred spiral"


def test_zero_shot_beats_the_majority_class_and_chance(zero_shot):
    """Nearest text prototype beats always answering the commonest class, and the towers did not collapse onto one
    direction (several classes are predicted)."""
    assert zero_shot["accuracy"] > max(zero_shot["majority"], zero_shot["chance"]), zero_shot
    assert sum(n > 0 for n in zero_shot["predicted"]) >= 4, zero_shot


# ---- 8. nothing touches the network ---------------------------------------------------------------------------

GUARD = r'''
import ipaddress, os, socket

_LOG = os.environ["SSLSKY_NET_LOG"]
open(_LOG + ".loaded", "a").write(f"{os.getpid()}\n")


def _local_host(host):
    if host is None or host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(what, address):
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return
    if isinstance(address, tuple) and address and _local_host(address[0]):
        return
    with open(_LOG, "a") as handle:
        handle.write(f"{what} {address!r}\n")
    raise OSError(f"network access blocked by the test: {what} {address!r}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    _check("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    _check("connect_ex", address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    _check("getaddrinfo", (host.decode() if isinstance(host, bytes) else host,))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def guarded_env(tmp_path: Path) -> tuple[dict, Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), SSLSKY_NET_LOG=str(log),
               OMP_NUM_THREADS="1")
    return env, log


def test_the_network_guard_has_teeth(tmp_path):
    env, log = guarded_env(tmp_path)
    code = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\nexcept OSError as e:\n"
            "    print('blocked' if 'blocked' in str(e) else 'other', e)\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
            "socket.create_connection(s.getsockname(), timeout=1).close(); print('loopback ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "blocked" in proc.stdout and "loopback ok" in proc.stdout
    assert "192.0.2.1" in log.read_text()


def test_an_align_run_with_vote_captions_never_touches_the_network(packed_mock, tmp_path):
    """Also ``model.align.labels=votes`` on a pack with votes: it trains, and its export holds the 68 path captions."""
    from sslsky.methods.align import load_aligned

    env, log = guarded_env(tmp_path)
    run_dir = tmp_path / "run"
    args = tiny_pretrain_args(packed_mock, run_dir, *SMALL, "optim.total_steps=2", "model.align.labels=votes",
                              "val_every=1", "log_every=1", "optim.warmup_steps=1")
    proc = subprocess.run([sys.executable, "-m", "sslsky", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(f"{log}.loaded").read_text().strip()  # the guard was loaded in the run's process
    assert not log.exists(), log.read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 2 and all(r["labelled"] == 8 and math.isfinite(r["loss"]) for r in trained)
    model, _ = load_aligned(run_dir / "encoder.pt")
    from sslsky.config import AlignConfig
    from sslsky.data.captions import path_table, vote_caption
    from sslsky.vocabulary import default_vote_schema

    schema, a = default_vote_schema(), AlignConfig()
    distinct = {vote_caption(p, schema, a.answer_phrases, a.vote_caption) or "a galaxy" for p in path_table(schema)[0]}
    assert model.label == "votes" and len(model.captions) == len(distinct) == 51  # 68 paths, 51 distinct captions
