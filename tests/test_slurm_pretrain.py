"""`sbatch slurm_scripts/pretrain.sh` on the real local 2-node SLURM cluster: DDP across nodes, USR2 requeue."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_sbatch, tiny_pretrain_args

from sslsky.train.checkpoint import list_checkpoints, load_checkpoint
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE

pytestmark = pytest.mark.slurm

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]


def script_args(packed: Path, run_dir: Path, *overrides: str) -> list[str]:
    """pretrain.sh arguments: the config file, then the overrides (the script adds `pretrain --config`)."""
    args = tiny_pretrain_args(packed, run_dir, *overrides)
    return [args[2], *args[3:]]


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def job_state(env: dict, job: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def test_sbatch_pretrain_runs_two_ranks_on_two_nodes(packed_mock, tmp_path, slurm_env):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    args = script_args(packed_mock, run_dir, "optim.total_steps=6")
    status = run_sbatch(slurm_env, "slurm_scripts/pretrain.sh", args, TWO_NODES, log)
    text = log.read_text()
    assert status == 0, text
    assert "node[1-2]" in text and "2 tasks" in text
    assert "rank 0/2 (local 0) via slurm" in text and "global batch 16" in text
    assert "srun finished with status 0" in text
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert state["step"] == 6
    assert int(state["model"]["queue_ptr"]) == (6 * 16) % 48  # keys of both ranks enqueued
    assert (run_dir / ENCODER_EXPORT).is_file()


def test_usr2_checkpoints_requeues_and_finishes(packed_mock, tmp_path, slurm_env):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    args = script_args(packed_mock, run_dir, "debug_step_sleep=0.5", "checkpoint_every=100")
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--error={log}", *TWO_NODES,
                           "slurm_scripts/pretrain.sh", *args], cwd=REPO, env=slurm_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while not steps_logged(run_dir) or max(steps_logged(run_dir)) < 4:
            assert time.monotonic() < deadline, f"job {job} logged no step 4 in 180 s:\n{log.read_text()}"
            assert job_state(slurm_env, job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()
            time.sleep(0.2)
        # What SLURM sends before the time limit (--signal=USR2@180): to every task of the step.
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True, timeout=30)
        deadline, released = time.monotonic() + 300, False
        while not (job_state(slurm_env, job) == "COMPLETED" and (run_dir / ENCODER_EXPORT).exists()):
            state = job_state(slurm_env, job)
            if state == "PENDING" and not released:
                # SLURM holds a requeued job back for its BeginTime (about 2 minutes); let it start now.
                released = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env,
                                          capture_output=True, timeout=30).returncode == 0
            assert state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING", "COMPLETED"), \
                f"job {job} is {state}:\n{log.read_text() if log.exists() else ''}"
            assert time.monotonic() < deadline, f"job {job} not finished 300 s after USR2:\n{log.read_text()}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    text = log.read_text()
    assert "stop signal" in text and f"requeued SLURM job {job}" in text, text
    stopped_at = int(text.split("checkpoint at step ")[1].split()[0])
    assert 4 <= stopped_at < 16
    assert "restart 1" in text and f"resumed from step {stopped_at}" in text, text
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert state["step"] == 16
    assert steps_logged(run_dir)[-1] == 16
    # One checkpoint at the stop, none other before the end (checkpoint_every=100).
    assert sorted(set(steps_logged(run_dir))) == list(range(2, 17, 2))
