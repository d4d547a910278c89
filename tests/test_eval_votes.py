"""Vote-fraction targets of the morphology evaluation (``eval-morph target=votes``): the metrics against a plain
NumPy/SciPy version on a hand-made example, the kNN average, the head's starting point, and end-to-end runs on
the packed mock (tiny epochs: the model must still beat the train-mean fractions)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO
from scipy.special import gammaln

from sslsky.cli import main
from sslsky.data.shards import ShardDataset
from sslsky.eval import morphology
from sslsky.models.heads import build_head
from sslsky.vocabulary import VoteSchema, default_vote_schema

VOTE_KEYS = ("task", "target", "protocol", "label_fraction", "seed", "n_train_labels", "n_val", "n_test", "ckpt",
             "ckpt_sha256", "vote_mae", "vote_nll", "most_voted_accuracy", "per_question", "questions",
             "vote_columns", "train_mean_baseline", "knn", "history", "best_epoch", "epochs_run", "config")


def toy_schema() -> VoteSchema:
    """Two questions: q1 (a, b, c) asked of all, q2 (x, y) asked after q1 = a."""
    q1 = SimpleNamespace(name="q1", answers=["a", "b", "c"], parent=[])
    q2 = SimpleNamespace(name="q2", answers=["x", "y"], parent=["q1", "a"])
    return VoteSchema.from_campaigns([SimpleNamespace(prefix="votes_t_", questions=[q1, q2])])


#: (N, A) counts of toy_schema: every case the metrics must handle.
TOY_COUNTS = np.array([
    [5, 2, 1, 3, 2],  # both questions scored
    [0, 4, 0, 0, 0],  # q2 never asked
    [2, 2, 1, 1, 1],  # q1 tie for the most votes; q2 only 2 votes (< 3): neither scored for accuracy
    [1, 0, 1, 0, 1],  # q1: 2 votes, not scored for accuracy (and a tie); q2: 1 vote
    [0, 6, 1, 4, 0],  # q2 asked although nobody chose a (a real catalog can have this)
])


def numpy_vote_metrics(pred: np.ndarray, counts: np.ndarray, alpha: np.ndarray | None, slices) -> dict:
    """The definitions in eval/morphology.py's docstring, galaxy by galaxy; NLL with scipy's gammaln."""
    per_question = []
    for start, stop in slices:
        errors, hits = [], []
        for i in range(len(counts)):
            k = counts[i, start:stop].astype(float)
            if k.sum() == 0:
                continue
            errors.append(np.mean(np.abs(pred[i, start:stop] - k / k.sum())))
            if k.sum() >= 3 and np.sum(k == k.max()) == 1:
                hits.append(float(np.argmax(pred[i, start:stop]) == np.argmax(k)))
        per_question.append((np.mean(errors) if errors else None, np.mean(hits) if hits else None, len(errors),
                             len(hits)))
    nll = None
    if alpha is not None:
        per_galaxy = []
        for i in range(len(counts)):
            if counts[i].sum() == 0:
                continue
            total = 0.0
            for start, stop in slices:
                k, a = counts[i, start:stop].astype(float), alpha[i, start:stop]
                n, a0 = k.sum(), a.sum()
                if n > 0:
                    total -= (gammaln(n + 1) - gammaln(k + 1).sum() + gammaln(a0) - gammaln(n + a0)
                              + (gammaln(k + a) - gammaln(a)).sum())
            per_galaxy.append(total)
        nll = float(np.mean(per_galaxy))
    maes = [q[0] for q in per_question if q[0] is not None]
    accs = [q[1] for q in per_question if q[1] is not None]
    return {"per_question": per_question, "vote_mae": float(np.mean(maes)), "most_voted_accuracy": float(np.mean(accs)),
            "vote_nll": nll}


def test_vote_metrics_match_numpy_on_a_hand_made_example():
    schema = toy_schema()
    assert schema.slices == ((0, 3), (3, 5))
    rng = np.random.default_rng(3)
    alpha = rng.uniform(1.0, 101.0, size=TOY_COUNTS.shape)
    pred = morphology.expected_fractions(alpha, schema.slices)
    np.testing.assert_allclose(pred[:, :3], alpha[:, :3] / alpha[:, :3].sum(1, keepdims=True))
    got = morphology.vote_metrics(pred, TOY_COUNTS, schema, alpha)
    want = numpy_vote_metrics(pred, TOY_COUNTS, alpha, schema.slices)
    assert got["vote_mae"] == pytest.approx(want["vote_mae"])
    assert got["most_voted_accuracy"] == pytest.approx(want["most_voted_accuracy"])
    assert got["vote_nll"] == pytest.approx(want["vote_nll"], rel=1e-5)  # float32 lgamma inside the loss
    for (name, q), (mae, acc, n_asked, n_scored) in zip(got["per_question"].items(), want["per_question"]):
        assert q["vote_mae"] == pytest.approx(mae) and q["most_voted_accuracy"] == pytest.approx(acc)
        assert (q["n_asked"], q["n_most_voted"]) == (n_asked, n_scored), name
    assert [q["n_asked"] for q in got["per_question"].values()] == [5, 4]
    assert [q["n_most_voted"] for q in got["per_question"].values()] == [3, 2]  # ties and < 3 votes left out
    # Observed fractions: NaN where a question was not asked; the train mean over the galaxies asked.
    observed = morphology.observed_fractions(TOY_COUNTS, schema.slices)
    assert np.isnan(observed[1, 3:]).all() and np.allclose(observed[0, :3], [5 / 8, 2 / 8, 1 / 8])
    mean = morphology.train_mean_fractions(TOY_COUNTS, schema.slices)
    np.testing.assert_allclose(mean[3:], np.mean([[3 / 5, 2 / 5], [1 / 2, 1 / 2], [0, 1], [1, 0]], axis=0))
    # Predicting the observed fractions themselves is perfect; without concentrations there is no NLL.
    exact = np.where(np.isfinite(observed), observed, 0.5)
    perfect = morphology.vote_metrics(exact, TOY_COUNTS, schema)
    assert perfect["vote_mae"] == 0.0 and perfect["most_voted_accuracy"] == 1.0 and perfect["vote_nll"] is None


def test_knn_vote_fractions_average_the_neighbours_asked():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    fractions = np.array([[0.8, 0.2, 1.0, 0.0], [0.4, 0.6, np.nan, np.nan], [0.0, 1.0, 0.0, 1.0]])
    fallback = np.array([0.5, 0.5, 0.3, 0.7])
    query = np.array([[1.0, 0.05], [0.95, 0.05]])
    got = morphology.knn_vote_fractions(train, fractions, query, fallback, k=2)
    # Both queries' two nearest are rows 0 and 1; only row 0 was asked the second question.
    np.testing.assert_allclose(got, [[0.6, 0.4, 1.0, 0.0]] * 2)
    got = morphology.knn_vote_fractions(train, fractions, np.array([[0.85, 0.15]]), fallback, k=1)
    np.testing.assert_allclose(got, [[0.4, 0.6, 0.3, 0.7]])  # its one neighbour was not asked: the fallback
    weighted = morphology.knn_vote_fractions(train, fractions, query[:1], fallback, k=3, weighted=True)
    sim = (query[:1] / np.linalg.norm(query[:1])) @ (train / np.linalg.norm(train, axis=1, keepdims=True)).T
    w = np.exp(sim[0] / morphology.KNN_TEMPERATURE)
    np.testing.assert_allclose(weighted[0, :2], (w[:, None] * fractions[:, :2]).sum(0) / w.sum(), atol=1e-8)
    np.testing.assert_allclose(weighted[0, 2:], (w[[0, 2], None] * fractions[[0, 2], 2:]).sum(0) / w[[0, 2]].sum(),
                               atol=1e-8)


def test_the_vote_head_starts_at_the_train_mean_fractions():
    schema = toy_schema()
    rng = np.random.default_rng(0)
    true_alpha = np.array([6.0, 3.0, 1.5, 4.0, 2.0])
    p = np.concatenate([rng.dirichlet(true_alpha[s:e], size=3000) for s, e in schema.slices], axis=1)
    counts = np.concatenate([np.stack([rng.multinomial(40, row[s:e]) for row in p]) for s, e in schema.slices], 1)
    alpha = morphology.vote_prior_concentrations(counts, schema.slices)
    mean = morphology.train_mean_fractions(counts, schema.slices)
    np.testing.assert_allclose(morphology.expected_fractions(alpha[None], schema.slices)[0], mean, atol=1e-9)
    np.testing.assert_allclose(alpha, true_alpha, rtol=0.15)  # the likelihood finds the spread of the votes
    task = morphology.vote_task(schema)
    head = build_head("linear", 4, schema.n_answers)
    task.init_head(head, counts)
    outputs = task.outputs(head(torch.randn(7, 4)).detach())  # any input: the prior
    assert task.output_name == "concentrations" and outputs.shape == (7, 5)
    np.testing.assert_allclose(outputs.numpy(), np.broadcast_to(alpha, (7, 5)), rtol=1e-5)
    loss = task.loss(head(torch.randn(7, 4)), torch.as_tensor(counts[:7], dtype=torch.float32))
    assert loss.shape == (7,) and torch.isfinite(loss).all()


# ---------------------------------------------------------------------------
# End to end on the packed mock.
# ---------------------------------------------------------------------------


def votes_args(packed, out, *overrides: str) -> list[str]:
    return ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={packed}", f"out={out}",
            "target=votes", "data.batch_size=32", "data.num_workers=0", "optim.epochs=2", "optim.min_steps=0",
            "optim.patience=0", "device=cpu", "progress=false", *overrides]


def read_h5(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f} | {k: f.attrs[k] for k in f.attrs}


def test_linear_votes_beat_the_train_mean_and_write_the_contract(packed_mock, encoder_path, tmp_path):
    out = tmp_path / "linear"
    assert main(votes_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=linear", "optim.epochs=20",
                           "optim.patience=5")) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in VOTE_KEYS:
        assert key in m, key
    schema = default_vote_schema()
    assert (m["task"], m["target"]) == ("morph", "votes") and m["vote_columns"] == list(schema.columns)
    train = ShardDataset(packed_mock, split="train", label="votes", vote_columns=schema.columns)
    test = ShardDataset(packed_mock, split="test", label="votes", vote_columns=schema.columns)
    assert m["n_train_labels"] == len(train) and m["n_test"] == len(test)
    assert (train.vote_counts[train.indices].sum(1) > 0).all()
    # The model learned something the train-mean fractions do not know (the head starts at them).
    assert m["vote_mae"] < m["train_mean_baseline"]["vote_mae"], (m["vote_mae"], m["train_mean_baseline"])
    assert m["vote_nll"] > 0 and m["history"][0]["epoch"] == 0 and m["best_epoch"] > 0
    assert set(m["per_question"]) == set(schema.questions)

    p = read_h5(out / "predictions.h5")
    counts = test.vote_counts[test.indices]
    np.testing.assert_array_equal(p["votes"], counts)
    np.testing.assert_array_equal(p["object_id"], test.index.columns["object_id"][test.indices])
    assert p["pred_fractions"].shape == p["concentrations"].shape == counts.shape
    assert (p["concentrations"] > 1).all() and (p["concentrations"] < 101).all()
    np.testing.assert_allclose(p["pred_fractions"], morphology.expected_fractions(p["concentrations"], schema.slices),
                               rtol=1e-5)
    assert list(p["vote_columns"]) == list(schema.columns) and p["question_slices"].tolist() == list(
        map(list, schema.slices))
    want = numpy_vote_metrics(p["pred_fractions"].astype(np.float64), counts, None, schema.slices)
    assert m["vote_mae"] == pytest.approx(want["vote_mae"], rel=1e-5)
    assert (out / "plots" / "vote_fractions.png").stat().st_size > 1000


def test_knn_and_finetune_votes(packed_mock, encoder_path, tmp_path):
    out = tmp_path / "knn"
    assert main(votes_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=knn", "plots=false",
                           "label_fraction=0.5")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["vote_nll"] is None and m["knn"]["k"] == 15 and m["label_fraction"] == 0.5
    n_all = len(ShardDataset(packed_mock, split="train", label="votes", vote_columns=default_vote_schema().columns))
    assert m["n_train_labels"] == round(0.5 * n_all)
    p = read_h5(out / "predictions.h5")
    assert "concentrations" not in p
    for start, stop in default_vote_schema().slices:
        np.testing.assert_allclose(p["pred_fractions"][:, start:stop].sum(1), 1.0, atol=1e-6)
    # Fine-tuning: images through the loader with float count targets.
    out = tmp_path / "finetune"
    assert main(votes_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=finetune", "optim.epochs=1",
                           "plots=false", "optim.allow_prior=true")) == 0  # one epoch: plumbing, not a result
    m = json.loads((out / "metrics.json").read_text())
    trained = [h for h in m["history"] if h["stage"] == "train"]  # after the LP-FT probe epochs
    assert len(trained) == 1 and m["epochs_run"] == trained[0]["epoch"] and np.isfinite(m["vote_nll"])
    assert all(np.isfinite(h["train_loss"]) for h in m["history"][1:])


def test_votes_config_errors_and_a_declared_tree(packed_mock, encoder_path, tmp_path, capsys):
    # Shards without vote counts (a legacy ssl-sky-surveys file): the data path and the fix.
    legacy = tmp_path / "legacy.h5"
    with h5py.File(legacy, "w") as handle:
        handle["images"] = np.zeros((8, 16, 16, 5), np.float32)
        handle["specz_redshift"] = np.linspace(0.01, 0.3, 8)
        handle["e_bv"] = np.full(8, 0.02)
        handle["ObjID"] = np.arange(8)
        handle["ra"] = handle["dec"] = np.zeros(8)
    common = ["ckpt=", "protocol=scratch", "arch=resnet18", "stem=imagenet", "crop_size=16", "data.survey=sdss"]
    assert main(votes_args(legacy, tmp_path / "x", *common)) == 2
    err = capsys.readouterr().err
    assert str(legacy) in err and "no vote counts" in err and "pack a catalog with these votes_* columns" in err
    assert main(votes_args(packed_mock, tmp_path / "x", *common, "target=vote")) == 2
    assert "target='vote': choose one of class, votes" in capsys.readouterr().err
    assert main(votes_args(packed_mock, tmp_path / "x", *common, "votes.campaigns=[{prefix: gz2_}]")) == 2
    assert "the prefix must start with 'votes_'" in capsys.readouterr().err
    # A tree the shards do not have: names the missing columns.
    other = "votes.campaigns=[{prefix: votes_gz2_}]"
    assert main(votes_args(packed_mock, tmp_path / "x", *common, other)) == 2
    err = capsys.readouterr().err
    assert "votes_gz2_smooth-or-featured_smooth" in err and str(packed_mock) in err
    # A tree declared in config: a part of the mock's tree (two of its questions) is a campaign of its own.
    tree = ("votes.campaigns=[{prefix: votes_, questions: [{name: smooth-or-featured, answers: [smooth, featured, "
            "artifact]}, {name: merging, answers: [none, minor, major]}]}]")
    assert main(votes_args(packed_mock, tmp_path / "ok", f"ckpt={encoder_path}", "protocol=linear", tree,
                           "plots=false")) == 0
    m = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert list(m["per_question"]) == ["votes_smooth-or-featured", "votes_merging"] and len(m["vote_columns"]) == 6
    assert read_h5(tmp_path / "ok" / "predictions.h5")["pred_fractions"].shape == (m["n_test"], 6)
