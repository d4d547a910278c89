"""`sslsky pretrain` end to end on a packed mock survey: resume after SIGKILL, DDP over gloo, export, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_pretrain_args

from sslsky.cli import main
from sslsky.models import build_encoder
from sslsky.train.checkpoint import list_checkpoints, load_checkpoint
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE

TOTAL_STEPS = 16  # tiny_pretrain_args: batch 8, ~100 training images -> 12 steps per epoch


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    found = list_checkpoints(run_dir / "checkpoints")
    assert found, f"no checkpoint in {run_dir}"
    return load_checkpoint(found[-1])


def assert_same_tree(a, b, where: str = "") -> None:
    """Bit-identical nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def run_cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env or dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference_run(packed_mock, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (in this process)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "tensorboard=true")) == 0
    return run_dir


def test_run_logs_validates_checkpoints_and_exports(reference_run, packed_mock):
    records = metrics(reference_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(2, TOTAL_STEPS + 1, 2))
    for r in train:
        assert r["loss"] > 0 and 0 <= r["acc"] <= 1 and r["images_per_s"] > 0
        assert {"time_data", "time_augment", "time_forward_backward", "time_optimizer"} <= r.keys()
    # lr: linear warm-up over 5 steps then cosine to 0 at the end (config/pretrain_tiny.yaml, batch 8).
    peak = 0.06 * 8 / 256
    assert train[0]["lr"] == pytest.approx(peak * 2 / 5)  # logged at step 2, lr of step index 1
    assert train[-1]["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (15 - 5) / (16 - 5))))
    val = [r for r in records if "val_top1" in r]
    assert [r["step"] for r in val] == [0, 8, 16] and all(0 <= r["val_top1"] <= 1 for r in val)
    assert (reference_run / "config.yaml").is_file()
    assert "sslsky pretrain --config" in (reference_run / "command.txt").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")  # the same numbers as metrics.jsonl
    assert [e.step for e in scalars] == [r["step"] for r in train]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in train], rel=1e-6)

    state = final_state(reference_run)
    assert state["step"] == TOTAL_STEPS
    # 16 steps x 8 keys enqueued into a queue of 48: the pointer wrapped to 128 % 48.
    assert int(state["model"]["queue_ptr"]) == (TOTAL_STEPS * 8) % 48

    # The export loads strictly (weights_only) into a fresh encoder and equals the query encoder.
    export = torch.load(reference_run / ENCODER_EXPORT, weights_only=True)
    encoder = build_encoder(export["arch"], export["in_channels"], export["stem"])
    encoder.load_state_dict(export["encoder"])
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, state["model"][f"encoder_q.{name}"]), name
    assert export["bands"] == list("ugriz") and export["survey"] == "sdss"


def test_sigkill_mid_epoch_then_restart_is_bit_identical(reference_run, packed_mock, tmp_path):
    run_dir = tmp_path / "run"
    # Slow steps so the kill lands right after the step-5 checkpoint, mid-epoch (12 steps per epoch).
    proc = run_cli(tiny_pretrain_args(packed_mock, run_dir, "debug_step_sleep=0.4"))
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-00000005.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint at step 5 within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    steps_before = {r["step"] for r in metrics(run_dir) if "loss" in r}
    assert max(steps_before) < TOTAL_STEPS, "the run finished before it was killed"

    again = run_cli(tiny_pretrain_args(packed_mock, run_dir))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resumed from step 5" in out

    a, b = final_state(reference_run), final_state(run_dir)
    assert b["step"] == TOTAL_STEPS
    assert_same_tree(a["model"], b["model"], "model")  # both encoders, heads, queue, pointer, BN statistics
    assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tree(a["rng"], b["rng"], "rng")
    last = {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
    assert last[TOTAL_STEPS] == {r["step"]: r["loss"] for r in metrics(reference_run) if "loss" in r}[TOTAL_STEPS]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_train_together(packed_mock, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(run_cli(tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=7"), env=env))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "rank 0/2" in outs[0] and "global batch 16" in outs[0]
    state = final_state(run_dir)
    assert state["step"] == 7
    # Keys of both ranks were enqueued: 7 steps x 16 keys into a queue of 48 (one rank alone: 7 x 8).
    assert int(state["model"]["queue_ptr"]) == (7 * 16) % 48
    assert len(state["rng"]["augment"]) == 2  # each rank's augmentation RNG is saved
    assert not torch.equal(state["rng"]["augment"][0], state["rng"]["augment"][1])


def test_diverging_loss_stops_with_a_message(packed_mock, tmp_path, capsys):
    # T = 1e-39 underflows the logits' scale to infinity: the loss is NaN at the first step.
    rc = main(tiny_pretrain_args(packed_mock, tmp_path / "run", "model.moco.temperature=1e-39"))
    assert rc == 4
    err = capsys.readouterr().err
    assert "loss is not finite" in err and "step 0" in err and "optim.base_lr" in err


@pytest.mark.parametrize(("override", "message"), [
    ("optim.base_lrr=0.1", "did you mean 'base_lr'"),
    ("method=swav", "method='swav'"),
    ("model.n_bands=3", "set model.n_bands=5"),
    ("data.survey=decals", "are 'sdss'"),
])
def test_config_errors_name_the_key(packed_mock, tmp_path, capsys, override, message):
    assert main(tiny_pretrain_args(packed_mock, tmp_path / "run", override)) == 2
    assert message in capsys.readouterr().err


def test_export_and_checkpoint_load_for_evaluation(reference_run, packed_mock):
    from sslsky.augment import AstroAugment
    from sslsky.config import PretrainConfig, load_config
    from sslsky.data.shards import ShardDataset
    from sslsky.models.loading import load_encoder

    export = load_encoder(reference_run / ENCODER_EXPORT)
    ckpt = load_encoder(list_checkpoints(reference_run / "checkpoints")[-1])
    assert (export.source, ckpt.source) == ("sslsky", "sslsky-checkpoint")
    data = ShardDataset(packed_mock, split="val")
    images = torch.stack([data[i]["image"] for i in range(4)])
    # The eval view is the training pipeline's own eval_view (crop 32, asinh with the manifest statistics).
    cfg = load_config(PretrainConfig, reference_run / "config.yaml")
    stats = data.attrs["stats"]
    augment = AstroAugment("sdss", cfg.augment, median=stats["median"], sigma=stats["sigma_mad"])
    torch.testing.assert_close(export.transform(images), augment.eval_view(images), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(export.encoder(export.transform(images)), ckpt.encoder(ckpt.transform(images)))
