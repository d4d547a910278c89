"""Faults around a run directory of `sslsky pretrain`: real processes, real signals, a real full file system.

Probes (issue 11): two concurrent runs on one run_dir; stale locks (a dead pid, a requeued SLURM job, another
host, an empty lock file) and lock files that are no lock (random bytes, other JSON, a folder); a resume with a
changed config refused with the differences, then allowed and recorded; keys that set the weights' shapes
never allowed; data.path spelt otherwise or a copy of the same shards accepted; failed starts that must leave
the run's files as they were (and no folder in a new run_dir); a device that is not here; a truncated or empty
latest checkpoint; Ctrl-C (once: checkpoint, twice: stop at once) and SIGKILL at seeded random points, then a
resume that ends bit-identical to an uninterrupted run; stale temp files of killed checkpoint writes; a full
tmpfs. Two packs, embeds and evaluations on one output: tests/test_locks.py.

The runs are the tiny CPU runs of tests/test_pretrain.py (16 steps, checkpoints of ~140 MB). Concurrency and
signals use ``python -m sslsky pretrain`` subprocesses (each in its own session, so that a signal reaches
its DataLoader workers too, as a terminal's Ctrl-C does); refusals and the full disk run ``main`` in this
process, which is quicker and the same code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_pretrain_args, tmpfs
from test_pretrain import assert_same_tree, free_port

from sslsky.cli import main
from sslsky.locks import slurm_job_state
from sslsky.train.checkpoint import list_checkpoints, load_checkpoint
from sslsky.train.rundir import CHANGES_FILE, LOCK_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOTAL_STEPS = 16  # tiny_pretrain_args


def start(args: list[str], **env: str) -> subprocess.Popen:
    """``python -m sslsky ARGS`` in a new session (its own process group), one thread, output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    wait_until(lambda: max(train_steps(run_dir), default=0) >= step, proc, f"step {step} logged")


def write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"started": "2026-01-01T00:00:00", "job": None, **holder}))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def reference(packed_mock, tmp_path_factory):
    """An uninterrupted run (a subprocess) and, started while it holds the lock, a second run on the same run_dir."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    first = start(tiny_pretrain_args(packed_mock, run_dir, "debug_step_sleep=0.3"))
    wait_until((run_dir / LOCK_FILE).exists, first, "the lock taken")
    second = start(tiny_pretrain_args(packed_mock, run_dir))
    second_out = finish(second)
    still_running = first.poll() is None
    first_out = finish(first)
    assert first.returncode == 0, first_out
    return {"run_dir": run_dir, "pid": first.pid, "second": (second.returncode, second_out),
            "overlapped": still_running}


def test_a_second_concurrent_run_is_refused_and_nothing_is_doubled(reference):
    run_dir = reference["run_dir"]
    rc, out = reference["second"]
    assert reference["overlapped"], "the first run ended before the second one was refused: no overlap tested"
    assert rc == 2, out
    assert f"run_dir {str(run_dir)!r} is in use by another run: pid {reference['pid']} on host " \
           f"{socket.gethostname()}" in out
    assert "choose another run_dir" in out and "Traceback" not in out
    assert train_steps(run_dir) == list(range(2, TOTAL_STEPS + 1, 2))  # each step once
    assert [r["step"] for r in records(run_dir) if "val_top1" in r] == [0, 8, 16]
    assert len((run_dir / "command.txt").read_text().splitlines()) == 1  # the refused run recorded nothing
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


def test_stale_locks_are_taken_over_and_foreign_ones_refused(packed_mock, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    # model.moco.queue_size=20 is refused after start-up (not a multiple of the batch of 8): the lock is taken
    # over, the start fails, the lock is released all the same.
    failing = tiny_pretrain_args(packed_mock, run_dir, "model.moco.queue_size=20")
    pid = dead_pid()
    write_lock(run_dir, host=socket.gethostname(), pid=pid)
    assert main(failing) == 2
    out, err = capsys.readouterr()
    assert f"took over the stale lock {run_dir / LOCK_FILE}: pid {pid} on host {socket.gethostname()}" in out
    assert "is no longer running" in out and "model.moco.queue_size" in err
    assert not (run_dir / LOCK_FILE).exists()

    # A live process on this host (this test) holds it: refused, and the lock stays the holder's.
    lock = write_lock(run_dir, host=socket.gethostname(), pid=os.getppid())
    assert main(failing) == 2
    assert f"is in use by another run: pid {os.getppid()}" in capsys.readouterr().err
    assert lock.exists()

    # Another host, no SLURM job to ask about: refused with the command that removes the lock.
    write_lock(run_dir, host="elsewhere-node", pid=12345)
    assert main(failing) == 2
    err = capsys.readouterr().err
    assert "locked by pid 12345 on host elsewhere-node" in err and "no job to ask about" in err
    assert f"rm {run_dir / LOCK_FILE}" in err and lock.exists()

    # A requeued SLURM job (same job id, new process, another node) takes over its own lock.
    write_lock(run_dir, host="elsewhere-node", pid=12345, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert main(failing) == 2
    assert "left by an earlier run of this SLURM job" in capsys.readouterr().out
    assert not lock.exists()
    monkeypatch.delenv("SLURM_JOB_ID")

    # Another job: taken over when SLURM says it is gone, refused when SLURM cannot be asked here.
    write_lock(run_dir, host="elsewhere-node", pid=12345, job="987654321")
    assert main(failing) == 2
    out, err = capsys.readouterr()
    if slurm_job_state("987654321") is None:
        assert "SLURM cannot be asked here about job 987654321" in err
    else:
        assert "SLURM job 987654321 is no longer running" in out


def test_under_ddp_a_refusal_of_rank_0_stops_every_rank(packed_mock, tmp_path):
    run_dir = tmp_path / "run"
    write_lock(run_dir, host=socket.gethostname(), pid=os.getppid())  # a live holder
    port = str(free_port())
    procs = [start(tiny_pretrain_args(packed_mock, run_dir), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in range(2)]
    outs = [finish(proc, timeout=120) for proc in procs]  # a rank waiting for rank 0 would time out here
    assert [proc.returncode for proc in procs] == [2, 2], outs
    assert "is in use by another run" in outs[0]
    assert "rank 1: stopping with rank 0 (ConfigError: run_dir" in outs[1] and "Traceback" not in outs[1]


@pytest.fixture
def resumable(reference, tmp_path) -> Path:
    """A copy of the reference run (its last checkpoint, config.yaml, command.txt, metrics) to resume."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    source = reference["run_dir"]
    shutil.copy(list_checkpoints(source / "checkpoints")[-1], run_dir / "checkpoints")
    for name in ("config.yaml", "command.txt", "metrics.jsonl"):
        shutil.copy(source / name, run_dir)
    return run_dir


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_a_changed_config_is_refused_then_allowed_and_recorded(packed_mock, resumable, capsys):
    run_dir = resumable
    before = run_files(run_dir)
    changed = ("optim.base_lr=0.1", "model.moco.temperature=0.1", "augment.geometry.crop_size=24")
    assert main(tiny_pretrain_args(packed_mock, run_dir, *changed)) == 2
    err = capsys.readouterr().err
    assert f"holds a run at step {TOTAL_STEPS} (step-00000016.pt)" in err and "3 setting(s)" in err
    for line in ("optim.base_lr: 0.06 -> 0.1", "model.moco.temperature: 0.2 -> 0.1",
                 "augment.geometry.crop_size: 32 -> 24"):
        assert f"  {line}\n" in err
    assert "'resume.allow_changes=[augment.geometry.crop_size,model.moco.temperature,optim.base_lr]'" in err

    # Training longer changes the schedule: refused, with the override to type.
    longer = tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=18")
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "optim.total_steps: 16 -> 18" in err and "cosine learning-rate schedule" in err
    assert "'resume.allow_changes=[optim.total_steps]'" in err
    assert run_files(run_dir) == before  # the refused starts wrote nothing

    # Allowed (neutral keys changed too: never refused, not recorded).
    assert main([*longer, "resume.allow_changes=[optim.total_steps]", "log_every=1", "checkpoint_every=1"]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 16 with 1 allowed change(s)" in out and "optim.total_steps: 16 -> 18" in out
    [change] = [json.loads(line) for line in (run_dir / CHANGES_FILE).read_text().splitlines()]
    assert (change["step"], change["key"], change["old"], change["new"]) == (16, "optim.total_steps", 16, 18)
    assert "resume.allow_changes=[optim.total_steps]" in change["command"] and change["time"]
    assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]  # how the run started
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert state["step"] == 18 and state["config"]["optim"]["total_steps"] == 18  # the effective config
    assert train_steps(run_dir) == [*range(2, 17, 2), 17, 18]
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize(("override", "message", "fails_fresh"), [
    ("model.arch=resnet34", 'model.arch: "resnet18" -> "resnet34"', False),  # a valid config for a new run
    ("data.batch_size=-1", "data.batch_size", True),
    ("data.path=", 'data.path: "', True),
    ("model.moco.queue_size=20", "model.moco.queue_size", True),  # not a multiple of the batch: found before training
])
def test_a_failed_start_leaves_the_run_files_as_they_were(packed_mock, resumable, tmp_path, capsys, override,
                                                          message, fails_fresh):
    before = run_files(resumable)
    assert main(tiny_pretrain_args(packed_mock, resumable, override)) == 2
    assert message in capsys.readouterr().err
    assert run_files(resumable) == before
    if fails_fresh:  # in a new run_dir nothing at all is written
        fresh = tmp_path / "fresh"
        assert main(tiny_pretrain_args(packed_mock, fresh, override)) == 2
        assert not fresh.exists()


def test_keys_that_set_the_weights_shapes_cannot_change_on_a_resume(packed_mock, resumable, capsys):
    before = run_files(resumable)
    for key, value in (("model.arch", "resnet34"), ("model.moco.queue_size", "96")):
        assert main(tiny_pretrain_args(packed_mock, resumable, f"{key}={value}", f"resume.allow_changes=[{key}]")) == 2
        err = capsys.readouterr().err
        assert f"resume.allow_changes=['{key}']: {key} cannot change on a resume: it changes the shapes of the " \
               f"model's weights" in err and "Traceback" not in err and "state_dict" not in err
    # Not allowed: listed with the others, never suggested in the override (only the key that can change is).
    assert main(tiny_pretrain_args(packed_mock, resumable, "model.arch=resnet34", "optim.base_lr=0.1")) == 2
    err = capsys.readouterr().err
    assert 'model.arch: "resnet18" -> "resnet34"' in err and "optim.base_lr: 0.06 -> 0.1" in err
    assert "model.arch cannot change on a resume" in err
    assert "'resume.allow_changes=[optim.base_lr]'" in err and "allow_changes=[model.arch" not in err
    assert main(tiny_pretrain_args(packed_mock, resumable, "resume.allow_changes=[optim.total_step]")) == 2
    assert "did you mean 'optim.total_steps'" in capsys.readouterr().err
    assert run_files(resumable) == before


@pytest.mark.parametrize("override", ["model.arch=resnet19", "data.path=/no/such/packed", "method=bogus",
                                      "data.batch_size=200", "device=tpu"])
def test_a_failed_start_in_a_new_run_dir_leaves_no_folder(packed_mock, tmp_path, capsys, override):
    fresh = tmp_path / "new" / "run"
    assert main(tiny_pretrain_args(packed_mock, fresh, override)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("config error" in err or "data error" in err), err
    assert not (tmp_path / "new").exists()  # nor the parent it created


def test_a_device_that_is_not_here_is_a_config_error(packed_mock, tmp_path, capsys):
    assert main(tiny_pretrain_args(packed_mock, tmp_path / "run", "device=tpu")) == 2
    assert "config error: device='tpu': choose auto, cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(tiny_pretrain_args(packed_mock, tmp_path / "run", "device=cuda")) == 2
        assert "config error: device=cuda but no CUDA GPU is visible here; use device=cpu or auto" in \
               capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("content", "found"), [
    (bytes(range(256)), "holds 256 bytes that are not text"),
    (b'{"host": "vm"}', "holds '{\"host\": \"vm\"}'"),
    (b"[1, 2]", "holds '[1, 2]'"),
    (None, "is a folder"),
])
def test_a_lock_file_that_is_no_lock_is_a_message(packed_mock, tmp_path, capsys, content, found):
    run_dir = tmp_path / "run"
    lock = run_dir / LOCK_FILE
    run_dir.mkdir()
    if content is None:
        lock.mkdir()
    else:
        lock.write_bytes(content)
    assert main(tiny_pretrain_args(packed_mock, run_dir)) == 2
    err = capsys.readouterr().err
    assert f"config error: run_dir {str(run_dir)!r}: the lock file {lock} {found}, not a lock of sslsky" in err, err
    assert f"remove it (rm {'-r ' if content is None else ''}{lock}) and start again" in err
    assert "Traceback" not in err and "being created" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # kept as it was, nothing left beside it


def test_an_empty_lock_is_taken_over(packed_mock, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_bytes(b"")  # just now: not "being created by another run right now"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "model.moco.queue_size=20")) == 2  # refused after the lock
    out, err = capsys.readouterr()
    assert "took over the stale lock" in out and "the lock file was empty" in out and "model.moco.queue_size" in err
    assert sorted(p.name for p in run_dir.iterdir()) == []


@pytest.mark.parametrize("size", [1_000_000, 0])
def test_a_damaged_latest_checkpoint_is_a_message_naming_the_previous_one(reference, packed_mock, tmp_path, capsys,
                                                                          size):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    previous, latest = list_checkpoints(reference["run_dir"] / "checkpoints")[-2:]
    for path in (previous, latest):
        shutil.copy(path, run_dir / "checkpoints")
    damaged = run_dir / "checkpoints" / latest.name
    os.truncate(damaged, size)
    assert main(tiny_pretrain_args(packed_mock, run_dir)) == 2
    err = capsys.readouterr().err
    assert f"data error: the latest checkpoint {damaged} cannot be loaded ({size} bytes; " in err, err
    assert f"Delete it (rm {damaged}) and run the same command again: the run then resumes from the previous " \
           f"one, {run_dir / 'checkpoints' / previous.name}" in err
    assert "Traceback" not in err and err.count("\n") == 1  # one message
    assert not (run_dir / LOCK_FILE).exists() and damaged.stat().st_size == size


def test_the_same_data_spelt_otherwise_or_copied_is_no_change(packed_mock, resumable, tmp_path, capsys, monkeypatch):
    def resume(data_path: str) -> str:
        args = [a for a in tiny_pretrain_args(packed_mock, resumable) if not a.startswith("data.path=")]
        assert main([*args, f"data.path={data_path}"]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    monkeypatch.chdir(packed_mock.parent)
    for spelling in (f"{packed_mock}/", packed_mock.name, f"./{packed_mock.name}//"):
        assert "resumed from step 16" in resume(spelling)
    copy = tmp_path / "copy" / "elsewhere"
    shutil.copytree(packed_mock, copy)
    out = resume(str(copy))
    assert f"-> '{copy}': accepted as the same data, the shards in {copy} are those the run trained on" in out
    # Other data (one shard changed) is refused as before.
    other = tmp_path / "other"
    shutil.copytree(packed_mock, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    args = [a for a in tiny_pretrain_args(packed_mock, resumable) if not a.startswith("data.path=")]
    assert main([*args, f"data.path={other}"]) == 2
    assert "data.path: " in capsys.readouterr().err


def test_the_same_folder_packed_again_is_other_data(packed_mock, tmp_path, capsys):
    """data.path unchanged, but the folder was packed again since the checkpoint (here: its shard digests
    changed): the resume is refused like any change of the data, unless resume.allow_changes names it."""
    data, run_dir = tmp_path / "packed", tmp_path / "run"
    shutil.copytree(packed_mock, data)
    short = ("optim.total_steps=4", "checkpoint_every=2", "val_every=0")
    assert main(tiny_pretrain_args(data, run_dir, *short)) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "f" * 64  # what another pack into the same folder leaves
    (data / "manifest.json").write_text(json.dumps(manifest))
    longer = ("optim.total_steps=6", "resume.allow_changes=[optim.total_steps]")
    assert main(tiny_pretrain_args(data, run_dir, *short, *longer)) == 2
    err = capsys.readouterr().err
    assert "packed again since: other shards" in err and "data.path" in err
    assert main(tiny_pretrain_args(data, run_dir, *short, "optim.total_steps=6",
                                   "resume.allow_changes=[optim.total_steps,data.path]")) == 0
    assert "data.path" in (run_dir / "changes.jsonl").read_text()


def test_ctrl_c_and_kills_then_resume_end_bit_identical(reference, packed_mock, tmp_path):
    """Ctrl-C once (checkpoint), SIGKILL, Ctrl-C twice (stop at once), SIGKILL, then a resume to the end.

    Every restart also changes keys that cannot alter the result (workers, log / checkpoint / validation
    frequency): the final weights must still equal the uninterrupted run's, bit for bit.
    """
    run_dir = tmp_path / "run"
    rng = random.Random(8)
    targets = sorted(rng.sample(range(2, 11), 4))  # interrupt each run once it has logged this step (or later)
    slow = ("debug_step_sleep=0.2", "log_every=1")

    def target(i: int) -> int:  # past what the previous (killed) run logged, so that this run's own step counts
        return max(targets[i], max(train_steps(run_dir), default=0) + 1)

    # 1. Ctrl-C (to the whole process group, DataLoader worker included): checkpoint at the step reached.
    proc = start(tiny_pretrain_args(packed_mock, run_dir, *slow, "data.num_workers=1", "checkpoint_every=100"))
    wait_for_step(run_dir, target(0), proc)
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 130, out
    reached = int(re.search(r"Ctrl-C: checkpointing at step (\d+); press Ctrl-C again to stop at once", out)[1])
    assert f"Ctrl-C -> checkpoint at step {reached}; run the same command again to continue" in out
    assert reached > targets[0] and "Traceback" not in out
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [f"step-{reached:08d}.pt"]
    assert not (run_dir / LOCK_FILE).exists()

    # 2. SIGKILL at a random moment after a later step (maybe in a checkpoint write): the lock stays behind.
    proc = start(tiny_pretrain_args(packed_mock, run_dir, *slow, "checkpoint_every=3", "val_every=3"))
    wait_for_step(run_dir, target(1), proc)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    out = finish(proc)
    assert f"resumed from step {reached}" in out
    assert (run_dir / LOCK_FILE).exists()

    # 3. Ctrl-C twice: the second stops at once, without a traceback or a partial checkpoint.
    proc = start(tiny_pretrain_args(packed_mock, run_dir, *slow, "checkpoint_every=3"))
    wait_for_step(run_dir, target(2), proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 130, out
    assert "took over the stale lock" in out and "is no longer running" in out
    assert "stopped at once by Ctrl-C" in out and "Traceback" not in out
    assert not list((run_dir / "checkpoints").glob(".step-*.tmp*"))

    # 4. SIGKILL again.
    proc = start(tiny_pretrain_args(packed_mock, run_dir, *slow, "checkpoint_every=4", "data.num_workers=1"))
    wait_for_step(run_dir, target(3), proc)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)

    # 5. A stale temp file of a killed checkpoint write (2 MB), then the resume to the end.
    (run_dir / "checkpoints" / ".step-00000099.pt.tmp4321").write_bytes(b"\0" * 2_000_000)
    proc = start(tiny_pretrain_args(packed_mock, run_dir, "log_every=1"))
    out = finish(proc)
    assert proc.returncode == 0, out
    removed = re.search(r"removed (\d+) stale temp file\(s\) of interrupted writes \((\d+\.\d) MB\)", out)
    assert removed and float(removed[2]) >= 2.0, out
    assert not list((run_dir / "checkpoints").glob(".step-*.tmp*"))

    a = load_checkpoint(list_checkpoints(reference["run_dir"] / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert b["step"] == TOTAL_STEPS
    for part in ("model", "optimizer", "rng"):
        assert_same_tree(a[part], b[part], part)
    # metrics.jsonl describes one run: each step once, the losses of the uninterrupted run.
    losses = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    assert train_steps(run_dir) == list(range(1, TOTAL_STEPS + 1))
    assert all(losses[r["step"]] == r["loss"] for r in records(reference["run_dir"]) if "loss" in r)


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MiB tmpfs: room for one tiny-run checkpoint (~140 MB), not two."""
    with tmpfs(tmp_path / "disk", "size=200m") as mount:
        yield mount


def test_a_full_disk_is_a_message_and_keeps_the_older_checkpoint(packed_mock, small_disk, capsys):
    run_dir = small_disk / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "checkpoint_every=2", "val_every=0")) == 2
    err = capsys.readouterr().err
    folder = run_dir / "checkpoints"
    assert f"no space left on the disk holding {folder} (" in err and "MiB free of 200.0 MiB" in err
    assert f"while writing checkpoint {folder / 'step-00000004.pt'}; the partial file was removed" in err
    assert f"a restart resumes from {folder / 'step-00000002.pt'}" in err
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.pt"]  # no partial temp file
    assert load_checkpoint(folder / "step-00000002.pt")["step"] == 2
    assert not (run_dir / LOCK_FILE).exists()
    assert shutil.disk_usage(small_disk).free > 50e6  # the room the failed write took is given back
