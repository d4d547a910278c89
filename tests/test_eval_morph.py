"""Morphology evaluation end to end on the packed mock (kNN, linear, scratch without a checkpoint) and the kNN
vote against a plain NumPy kNN. Tiny epochs: plumbing and contracts, not science."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO

import sslsky.eval.morphology as morphology
from sslsky.cli import main
from sslsky.config import EvalMorphConfig, load_config
from sslsky.data.shards import ShardDataset
from sslsky.models.loading import load_encoder
from sslsky.vocabulary import MORPH_CLASSES

TASK_KEYS = ("n_train_labels", "protocol", "label_fraction", "seed", "accuracy", "macro_f1", "recall")


def morph_args(packed, out, *overrides: str) -> list[str]:
    return ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={packed}", f"out={out}",
            "data.batch_size=32", "data.num_workers=0", "optim.epochs=2", "optim.min_steps=0", "optim.patience=0",
            "device=cpu", "progress=false", *overrides]


def read_predictions(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f} | {"classes": list(f.attrs["classes"])}


def numpy_knn(packed, ckpt, k: int, label_fraction: float = 1.0, seed: int = 0):
    """Majority vote of the k most cosine-similar labelled train galaxies, features computed here."""
    loaded = load_encoder(ckpt)

    def features(split, **kw):
        ds = ShardDataset(packed, split=split, label="morph_class", **kw)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        with torch.no_grad():
            f = loaded.encoder(loaded.transform(images)).numpy().astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True), ds.index.columns["morph_class"][ds.indices]

    train, train_y = features("train", label_fraction=label_fraction, seed=seed)
    test, test_y = features("test")
    sim = test @ train.T
    pred = []
    for row in sim:
        nn_idx = np.argsort(-row, kind="stable")[:k]
        counts = np.bincount(train_y[nn_idx], minlength=len(MORPH_CLASSES)).astype(float)
        summed = np.bincount(train_y[nn_idx], weights=row[nn_idx], minlength=len(MORPH_CLASSES))
        best = np.flatnonzero(counts == counts.max())
        pred.append(best[np.argmax(summed[best])])
    return np.array(pred), test_y


def test_knn_matches_numpy_and_writes_the_contract(packed_mock, encoder_path, tmp_path):
    out = tmp_path / "knn"
    assert main(morph_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=knn")) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in TASK_KEYS:
        assert key in m, key
    assert m["knn"] == {"k": 15, "weighted": False, "metric": "cosine"}
    assert set(m["recall"]) == set(MORPH_CLASSES) and m["classes"] == list(MORPH_CLASSES)
    assert (out / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()

    p = read_predictions(out / "predictions.h5")
    want_pred, want_true = numpy_knn(packed_mock, encoder_path, 15)
    np.testing.assert_array_equal(p["true_class"], want_true)
    np.testing.assert_array_equal(p["pred_class"], want_pred)
    np.testing.assert_allclose(p["probs"].sum(1), 1.0, atol=1e-6)
    assert m["accuracy"] == pytest.approx(np.mean(want_pred == want_true))
    cm = np.zeros((7, 7), int)
    np.add.at(cm, (want_true, want_pred), 1)
    assert m["confusion_matrix"] == cm.tolist()
    for c, name in enumerate(MORPH_CLASSES):
        support = np.sum(want_true == c)
        expected = None if support == 0 else np.sum((want_true == c) & (want_pred == c)) / support
        assert m["recall"][name] == (pytest.approx(expected) if expected is not None else None), name


def test_knn_vote_ties_and_weights():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    query = np.array([[1.0, 0.05]])
    pred, shares = morphology.knn_classify(train, labels, query, 3, k=4)
    assert pred[0] == 0  # 2 vs 2 votes: the larger summed similarity wins
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.0]])
    pred, shares = morphology.knn_classify(train, labels, query, 3, k=4, weighted=True)
    assert pred[0] == 0 and shares[0, 0] > 0.99
    pred, _ = morphology.knn_classify(train, labels, np.array([[0.0, 1.0]]), 3, k=100)  # k > train rows
    assert pred[0] == 1


def test_linear_and_rerun(packed_mock, encoder_path, tmp_path, capsys):
    out = tmp_path / "linear"
    args = morph_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=linear", "label_fraction=0.3",
                      "plots=false", "optim.allow_prior=true")  # 31 labels, 2 epochs: plumbing, not a result
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    n_all = len(ShardDataset(packed_mock, split="train", label="morph_class"))
    assert m["n_train_labels"] == round(0.3 * n_all) and m["label_fraction"] == 0.3
    p = read_predictions(out / "predictions.h5")
    assert p["probs"].shape == (m["n_test"], 7)
    np.testing.assert_array_equal(p["pred_class"], p["probs"].argmax(1))
    assert m["accuracy"] == pytest.approx(np.mean(p["pred_class"] == p["true_class"]))
    assert 0.0 <= m["macro_f1"] <= 1.0
    capsys.readouterr()
    assert main(args) == 0
    assert "exists for this config; not training again" in capsys.readouterr().out


def test_scratch_without_checkpoint_uses_the_config_network(packed_mock, tmp_path):
    cfg = load_config(EvalMorphConfig, REPO / "config" / "eval_morph.yaml",
                      morph_args(packed_mock, tmp_path / "s", "ckpt=", "protocol=scratch", "arch=resnet18",
                                 "stem=imagenet", "crop_size=32", "optim.epochs=1", "plots=false",
                                 "optim.allow_prior=true")[3:])
    m = morphology.run_morph(cfg)
    assert (m["arch"], m["stem"], m["encoder_source"], m["ckpt"]) == ("resnet18", "imagenet", "random", "")
    assert math.isfinite(m["accuracy"]) and m["epochs_run"] == 1


def test_knn_needs_a_checkpoint(packed_mock, tmp_path, capsys):
    assert main(morph_args(packed_mock, tmp_path / "x", "ckpt=", "protocol=knn")) == 2
    assert "protocol=knn needs a pretrained encoder" in capsys.readouterr().err
    assert main(morph_args(packed_mock, tmp_path / "x", "ckpt=", "protocol=svm")) == 2
    assert "choose one of linear, finetune, scratch, knn" in capsys.readouterr().err


def test_diverging_training_is_a_message_and_exit_4(packed_mock, encoder_path, tmp_path, capsys):
    out = tmp_path / "nan"
    status = main(morph_args(packed_mock, out, f"ckpt={encoder_path}", "protocol=finetune", "optim.lr=1e30",
                             "optim.epochs=3", "plots=false"))
    err = capsys.readouterr().err
    assert status == 4, err
    assert "stopped:" in err and "lower optim.lr" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()
