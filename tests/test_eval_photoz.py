"""Photo-z evaluation end to end on the packed mock with a tiny pretrained encoder, plus the pieces of the
supervised loop (light augmentation, heads). Tiny epochs: these check plumbing and contracts, not science."""

from __future__ import annotations

import json
import math
import runpy
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

import sslsky.eval.photoz as photoz
from sslsky.cli import main
from sslsky.config import EvalSpeczConfig, load_config
from sslsky.data.shards import ShardDataset
from sslsky.eval import supervised
from sslsky.eval.features import LightAugment
from sslsky.models.heads import build_head, init_prior
from sslsky.surveys import SURVEYS

TASK_KEYS = ("n_train_labels", "protocol", "label_fraction", "seed", "sigma_mad", "bias", "eta", "bin_accuracy",
             "crps")


def tiny(packed, out, *overrides: str) -> list[str]:
    """Overrides of config/eval_specz.yaml for a seconds-long CPU run."""
    return [f"data.path={packed}", f"out={out}", "data.batch_size=32", "data.num_workers=0", "optim.epochs=2",
            "optim.min_steps=0", "optim.patience=0", "n_bins=40", "device=cpu", "progress=false", *overrides]


def specz_config(packed, out, *overrides: str) -> EvalSpeczConfig:
    return load_config(EvalSpeczConfig, REPO / "config" / "eval_specz.yaml", tiny(packed, out, *overrides))


def recompute(pred_file) -> dict:
    """Metrics from predictions.h5 with plain NumPy (not sslsky.eval.metrics)."""
    with h5py.File(pred_file, "r") as f:
        pdf, z, edges = f["pdf"][()].astype(np.float64), f["z_spec"][()], f["bin_edges"][()]
        z_mean = f["z_mean"][()]
    centres = (edges[1:] + edges[:-1]) / 2
    dz = (z_mean - z) / (1 + z)
    true_bin = np.clip(np.digitize(z, edges) - 1, 0, len(centres) - 1)
    return {"z_mean": pdf @ centres, "stored_mean": z_mean, "pdf": pdf, "z": z,
            "sigma_mad": 1.4826 * np.median(np.abs(dz - np.median(dz))), "bias": dz.mean(),
            "eta": np.mean(np.abs(dz) > 0.05), "bin_accuracy": np.mean(pdf.argmax(1) == true_bin)}


def test_linear_outputs_contract_and_idempotent_rerun(packed_mock, encoder_path, tmp_path, monkeypatch):
    out = tmp_path / "linear"
    ckpt = tmp_path / "encoder.pt"
    shutil.copy(encoder_path, ckpt)
    cfg = specz_config(packed_mock, out, f"ckpt={ckpt}", "protocol=linear", "optim.epochs=3")
    m = photoz.run_specz(cfg)
    for key in TASK_KEYS:
        assert key in m, key
    assert (m["protocol"], m["label_fraction"], m["seed"]) == ("linear", 1.0, 0)
    assert all(math.isfinite(m[k]) for k in ("sigma_mad", "bias", "eta", "bin_accuracy", "crps"))
    assert json.loads((out / "metrics.json").read_text()) == m
    assert yaml.safe_load((out / "config.yaml").read_text())["protocol"] == "linear"
    assert not (out / "train_state.pt").exists()  # removed once finished
    for name in ("zphot_vs_zspec.png", "delta_z_hist.png", "example_pdfs.png"):
        assert (out / "plots" / name).stat().st_size > 1000

    # Per-object predictions: shapes, normalised PDFs, metrics recomputed independently.
    with h5py.File(out / "predictions.h5", "r") as f:
        n = len(f["object_id"])
        assert f["pdf"].shape == (n, 40) and f["bin_edges"].shape == (41,)
        for name in ("z_spec", "ebv", "z_mean", "z_median", "z_mode"):
            assert f[name].shape == (n,)
    assert n == m["n_test"] == m["n"] > 0
    r = recompute(out / "predictions.h5")
    np.testing.assert_allclose(r["pdf"].sum(1), 1.0, atol=1e-5)
    assert np.all(r["pdf"] >= 0)
    np.testing.assert_allclose(r["z_mean"], r["stored_mean"], atol=1e-5)  # float32 PDFs on disk
    for key in ("sigma_mad", "bias", "eta", "bin_accuracy"):
        assert m[key] == pytest.approx(r[key], abs=1e-6), key
    assert m["n_train_labels"] == len(ShardDataset(packed_mock, split="train", label="z"))

    # Same config again: the stored metrics come back and nothing trains.
    monkeypatch.setattr(photoz, "train_supervised", lambda *a, **k: pytest.fail("trained again"))
    assert photoz.run_specz(specz_config(packed_mock, out, f"ckpt={ckpt}", "protocol=linear",
                                         "optim.epochs=3", "data.num_workers=1")) == m
    # A changed config is a new task (here it fails on purpose, proving it tried to train) ...
    with pytest.raises(pytest.fail.Exception):
        photoz.run_specz(specz_config(packed_mock, out, f"ckpt={ckpt}", "protocol=linear", "optim.epochs=3",
                                      "seed=1"))
    # ... and so is the same config on a retrained encoder at the same path.
    state = torch.load(ckpt, weights_only=True)
    state["encoder"]["conv1.weight"] += 0.01
    torch.save(state, ckpt)
    with pytest.raises(pytest.fail.Exception):
        photoz.run_specz(cfg)


def test_finetune_with_ebv_augment_and_label_fraction(packed_mock, encoder_path, tmp_path):
    m = photoz.run_specz(specz_config(packed_mock, tmp_path / "ft", f"ckpt={encoder_path}", "protocol=finetune",
                                      "label_fraction=0.5", "use_ebv=true", "augment=true", "head.kind=mlp",
                                      "head.hidden=32", "plots=false", "optim.allow_prior=true"))  # plumbing
    n_all = len(ShardDataset(packed_mock, split="train", label="z"))
    assert m["n_train_labels"] == round(0.5 * n_all)
    stages = [h["stage"] for h in m["history"]]  # LP-FT (the default): the prior, the probe, then 2 epochs
    assert stages == ["prior"] + ["probe"] * 30 + ["train"] * 2, stages
    assert m["epochs_run"] == 32 and [h["epoch"] for h in m["history"]] == list(range(33))
    assert all(math.isfinite(h["val_crps"]) for h in m["history"])
    assert m["encoder_source"] == "sslsky" and math.isfinite(m["crps"])
    assert not (tmp_path / "ft" / "plots").exists()


def test_scratch_from_the_checkpoint_architecture_via_the_script(packed_mock, encoder_path, tmp_path, monkeypatch,
                                                                 capsys):
    """``python eval_specz.py`` (the thin script) runs scratch: random weights, the checkpoint's network."""
    out = tmp_path / "scratch"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["eval_specz.py", "--config", "config/eval_specz.yaml",
                                      *tiny(packed_mock, out, f"ckpt={encoder_path}", "protocol=scratch",
                                            "optim.epochs=1", "plots=false")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "eval_specz.py"), run_name="__main__")
    assert exit_info.value.code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["protocol"], m["encoder_source"], m["arch"], m["stem"]) == ("scratch", "random", "resnet18", "imagenet")
    assert "eval-specz: scratch with" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_result(packed_mock, encoder_path, tmp_path, monkeypatch):
    args = (f"ckpt={encoder_path}", "protocol=linear", "optim.epochs=4", "plots=false")
    reference = photoz.run_specz(specz_config(packed_mock, tmp_path / "ref", *args))

    real_save, calls = supervised.save_checkpoint, []

    def save_then_die(state, path, keep=2):
        real_save(state, path, keep)
        calls.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(supervised, "save_checkpoint", save_then_die)
    monkeypatch.setattr(supervised, "STATE_EVERY_S", 0.0)  # every epoch (the tiny epochs take under a second)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        photoz.run_specz(specz_config(packed_mock, out, *args))
    assert (out / "train_state.pt").exists() and not (out / "metrics.json").exists()
    resumed = photoz.run_specz(specz_config(packed_mock, out, *args))
    assert calls == [1, 2, 3, 4]  # epochs 3 and 4 only after the restart
    for key in ("sigma_mad", "bias", "eta", "bin_accuracy", "crps", "best_epoch"):
        assert resumed[key] == reference[key], key


@pytest.mark.parametrize("overrides, message", [
    (("protocol=linear",), "protocol=linear needs a pretrained encoder: set ckpt="),
    (("protocol=finetune", "ckpt=/nonexistent/encoder.pt"), "does not exist"),
    (("protocol=lineer", "ckpt=x"), "protocol='lineer': choose one of linear, finetune, scratch"),
    (("protocol=scratch", "label_fraction=0"), r"label_fraction=0.0 must be in \(0, 1\]"),
    (("protocol=scratch", "optim.lrr=1"), "unknown config key 'optim.lrr'"),
])
def test_config_errors_exit_2_with_a_message(packed_mock, tmp_path, capsys, overrides, message):
    import re

    rc = main(["eval-specz", "--config", str(REPO / "config" / "eval_specz.yaml"),
               *tiny(packed_mock, tmp_path / "x", "ckpt=", *overrides)])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_light_augment_is_an_exact_symmetry_plus_reddening():
    torch.manual_seed(0)
    x = torch.rand(64, 5, 8, 8, dtype=torch.float64) + 0.1
    ebv = torch.full((64,), 0.02, dtype=torch.float64)
    aug = LightAugment(SURVEYS["sdss"].extinction)
    gen = torch.Generator().manual_seed(1)
    out, shown = aug(x, ebv, gen)
    r = torch.tensor(SURVEYS["sdss"].extinction, dtype=torch.float64)
    seen = set()
    for i in range(64):
        gain = 10 ** (-0.4 * r * (shown[i] - 0.02))  # de-redden 0.02, re-redden with the E(B-V) now shown
        undone = out[i] / gain[:, None, None]
        matches = [k for k in range(8)
                   if torch.allclose(undone, (lambda v: v.flip(-1) if k >= 4 else v)(torch.rot90(x[i], k % 4,
                                                                                              (-2, -1))))]
        assert matches, f"sample {i} is no symmetry of its input"
        seen.add(matches[0])
    assert len(seen) == 8  # all eight symmetries of the square are drawn
    assert torch.all(shown > 0) and not torch.allclose(shown, ebv)


def test_head_starts_at_the_prior_and_standardises():
    head = build_head("linear", 3, 4)
    feats = torch.tensor([[1.0, 10.0, 0.03], [3.0, 30.0, 0.05], [5.0, 50.0, 0.01]])
    head[0].set_stats(feats)
    z = head[0](feats)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    init_prior(head, prior)
    probs = torch.softmax(head(torch.randn(5, 3)), dim=1)
    torch.testing.assert_close(probs, prior.float().expand(5, 4))
    with pytest.raises(ValueError, match="unknown head"):
        build_head("transformer", 3, 4)
