"""One run at a time per output (:mod:`sslsky.locks`): lock files that are no lock, and two real runs of
``sslsky pack``, ``embed`` and ``eval-morph`` on one output.

Concurrency uses ``python -m sslsky`` subprocesses: the first is stopped (SIGSTOP) as soon as its lock file
is there, so that the second surely starts while it holds the lock; the second must be refused (exit 2,
naming the first), then the first is let go and its result must equal that of a run alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, make_survey, pack_args, untrained_encoder

from sslsky import locks
from sslsky.cli import main
from sslsky.data.schema import MANIFEST_NAME
from sslsky.eval.embed import stale_files
from sslsky.locks import EVAL_LOCK, OutputLock, lock_next_to

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 30  # galaxies


# ---------------------------------------------------------------------------
# Lock files that are no lock (in process: quick).
# ---------------------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    """Files of the lock's own making besides the lock: take-over and creation temp files."""
    return sorted(p.name for p in folder.iterdir() if ".stale-" in p.name or ".new-" in p.name)


@pytest.mark.parametrize(("content", "found"), [
    (bytes(range(256)) * 4, "holds 1024 bytes that are not text"),
    (b'{"host": "vm"}', "holds '{\"host\": \"vm\"}'"),
    (b"[1, 2]", "holds '[1, 2]'"),
    (b"hello\n", "holds 'hello'"),
])
def test_a_lock_file_that_is_no_lock_is_refused_and_kept(tmp_path, content, found):
    path = tmp_path / "out" / "x.lock"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(locks.ConfigError) as err:
        OutputLock(path, "pack", key="out", target="out").acquire()
    text = str(err.value)
    assert f"the lock file {path} {found}, not a lock of sslsky" in text, text
    assert f"remove it (rm {path}) and start again" in text
    assert path.read_bytes() == content and leftovers(path.parent) == []


def test_a_lock_that_is_a_folder_is_refused_and_kept(tmp_path):
    path = tmp_path / "x.lock"
    (path / "inside").mkdir(parents=True)
    with pytest.raises(locks.ConfigError) as err:
        OutputLock(path, "embed").acquire()
    assert f"the lock file {path} is a folder, not a lock of sslsky" in str(err.value)
    assert f"(rm -r {path})" in str(err.value)
    assert (path / "inside").is_dir() and leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b'{"host": "node1", "pi'])
def test_an_empty_or_cut_short_lock_is_taken_over_at_once(tmp_path, monkeypatch, capsys, content):
    monkeypatch.setattr(locks, "PARTIAL_WAIT_S", 0.3)  # the wait for a lock being written, shortened
    path = tmp_path / "x.lock"
    path.write_bytes(content)  # just now: no 30 s wait, nothing "being created right now"
    lock = OutputLock(path, "pack").acquire()
    out = capsys.readouterr().out
    assert f"sslsky pack: took over the stale lock {path}: the lock file " in out
    assert "a run killed while" in out
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "pack" and holder["host"] == socket.gethostname()
    lock.release()
    assert not path.exists() and leftovers(tmp_path) == []


def test_a_live_holder_is_named_and_a_failed_start_leaves_no_folder(tmp_path):
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "job": None, "started": "2026-01-01T00:00:00",
              "command": "eval-morph"}  # a live process of this host
    (out / EVAL_LOCK).write_text(json.dumps(holder))
    second = OutputLock(out / EVAL_LOCK, "eval-specz", key="out", target=str(out))
    with pytest.raises(locks.ConfigError) as err:
        second.acquire()
    assert f"out {str(out)!r} is in use by another run: pid {os.getppid()} on host {socket.gethostname()} " \
           f"(sslsky eval-morph), started 2026-01-01T00:00:00" in str(err.value)
    second.release()  # it holds nothing: the lock stays the holder's
    assert json.loads((out / EVAL_LOCK).read_text()) == holder

    late = tmp_path / "late"  # made by the holder after the refused run looked: not the refused run's to remove
    refused = OutputLock(lock_next_to(late), "pack", key="--out", target=str(late), output=late)
    late.mkdir()
    lock_next_to(late).write_text(json.dumps(holder))
    with pytest.raises(locks.ConfigError):
        refused.acquire()
    refused.release()
    assert late.is_dir()

    fresh = tmp_path / "c" / "d"
    lock = OutputLock(fresh / EVAL_LOCK, "eval-morph").acquire()
    lock.release()  # the folders it created, left empty, go too
    assert not (tmp_path / "c").exists()
    lock = OutputLock(fresh / EVAL_LOCK, "eval-morph").acquire()
    (fresh / "metrics.json").write_text("{}")
    lock.release()  # a folder with a result stays
    assert sorted(p.name for p in fresh.iterdir()) == ["metrics.json"]


# ---------------------------------------------------------------------------
# Two real runs on one output.
# ---------------------------------------------------------------------------


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def second_refused_while_first_holds(args: list[str], lock: Path) -> tuple[subprocess.Popen, str]:
    """Start ``args`` twice: the first stopped once it holds ``lock``, the second run to its end (returned with
    its output) while it does; then the first is let go (the caller waits for it)."""
    first = start(args)
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        second = start(args)
        out = second.communicate(timeout=120)[0]
        assert second.returncode == 2, out
    finally:
        first.send_signal(signal.SIGCONT)
    assert "is in use by another run: pid " f"{first.pid} on host {socket.gethostname()}" in out, out
    assert "Traceback" not in out
    return first, out


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A 30-galaxy survey packed alone (the reference) and an untrained encoder for it."""
    root = tmp_path_factory.mktemp("locks")
    catalog = make_survey(root / "survey", n=N)
    assert main(pack_args(catalog, root / "solo", "--shard-size", "16")) == 0
    ckpt = untrained_encoder(root / "encoder.pt")
    return {"root": root, "catalog": catalog, "solo": root / "solo", "ckpt": ckpt}


def packed_content(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest.pop("created", None)
    manifest.pop("config", None)  # names --out
    return {"manifest": manifest, "files": sorted(p.name for p in folder.iterdir()),
            **{p.name: p.read_bytes() for p in folder.glob("shard-*.h5")}}


def test_a_second_pack_into_one_out_is_refused_and_the_first_is_whole(work):
    out = work["root"] / "packed"
    args = pack_args(work["catalog"], out, "--shard-size", "16")
    first, refused = second_refused_while_first_holds(args, lock_next_to(out))
    assert f"sslsky pack: config error: --out {str(out)!r} is in use" in refused
    assert "(sslsky pack)" in refused and "replace each other's shards" in refused
    finish(first)
    assert packed_content(out) == packed_content(work["solo"])
    assert not lock_next_to(out).exists()


def read_all(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in handle} | {"attrs": dict(handle.attrs)}


def assert_same_file(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if name == "attrs":
            assert got[name] == value
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)  # NaN z equal to NaN z


def test_a_second_embed_to_one_out_is_refused_and_the_first_is_whole(work, capsys):
    out = work["root"] / "emb" / "e.h5"
    args = ["embed", "--ckpt", str(work["ckpt"]), "--data", str(work["solo"]), "--out", str(out), "num_workers=0",
            "progress=false", "batch_size=4"]
    assert main(args) == 0
    solo = read_all(out)
    out.unlink()
    # A part file of a dead run (tagged HOST-PID) and one of a live run: only the dead one is removed.
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = out.with_name(f".e.h5.part-{host}-{dead.pid}-00000-of-00001.h5")
    live = out.with_name(f".e.h5.part-{host}-{os.getppid()}-00000-of-00001.h5")  # a live pid: our parent
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    first, refused = second_refused_while_first_holds(args, lock_next_to(out))
    assert f"sslsky embed: config error: out {str(out)!r} is in use" in refused and "(sslsky embed)" in refused
    text = finish(first)
    assert "removed 1 stale temporary file(s)" in text and f"kept {live.name} (its embed, pid" in text, text
    assert_same_file(read_all(out), solo)  # the first run's file, whole, as a run alone writes it
    assert stale_files(out) == [live] and not lock_next_to(out).exists()
    live.unlink()


def test_a_second_evaluation_in_one_out_is_refused_and_the_first_is_whole(work):
    def args(out: Path) -> list[str]:
        return ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={work['solo']}",
                f"out={out}", f"ckpt={work['ckpt']}", "protocol=knn", "data.batch_size=8", "data.num_workers=0",
                "device=cpu", "progress=false", "plots=false"]

    solo = work["root"] / "morph_solo"
    assert main(args(solo)) == 0
    out = work["root"] / "morph"
    first, refused = second_refused_while_first_holds(args(out), out / EVAL_LOCK)
    assert f"sslsky eval-morph: config error: out {str(out)!r} is in use" in refused
    assert "(sslsky eval-morph)" in refused and "metrics and predictions" in refused
    finish(first)
    a, b = (json.loads((folder / "metrics.json").read_text()) for folder in (solo, out))
    for metrics in (a, b):
        metrics.pop("config")
        metrics.pop("train_time_s", None)
    assert a == b
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in solo.iterdir())  # no lock left


def test_temp_files_of_a_lock_creation_killed_half_way_go_once_old(tmp_path):
    path = tmp_path / "x.lock"
    old, young = tmp_path / ".x.lock.new-99999-00aa", tmp_path / ".x.lock.stale-99999-00bb"
    for leftover in (old, young):
        leftover.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    lock = OutputLock(path, "pack").acquire()
    assert not old.exists() and young.exists()  # a young one may be a live creation's
    lock.release()


def test_a_link_and_its_target_share_one_lock(tmp_path):
    target = tmp_path / "packed"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert lock_next_to(link) == lock_next_to(target) == tmp_path / ".packed.lock"


def test_sigterm_releases_the_lock_and_temporary_files(work):
    """SIGTERM (scancel, a time limit, the `kill PID` a refusal suggests) of a pack: exit 143 with a message, no
    lock and no temporary file left, the finished shards kept; the same command then completes the pack."""
    out = work["root"] / "terminated"
    args = pack_args(work["catalog"], out, "--shard-size", "8")
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLSKY_PACK_SLEEP_PER_CUTOUT="0.05")
    proc = subprocess.Popen([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("shard-*.h5")):  # one shard finished, the next being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143 and "stopped by SIGTERM" in text and "Traceback" not in text, text
    assert not lock_next_to(out).exists() and not [p for p in out.iterdir() if ".tmp" in p.name]
    assert main(args) == 0 and not lock_next_to(out).exists()


def test_an_evaluation_and_a_pretraining_never_share_a_folder(work, tmp_path, capsys):
    """eval-morph with out= a pretraining run directory (or the reverse) would overwrite its config.yaml."""
    from sslsky.outputs import refuse_other_runs

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("the run's\n")
    args = ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={work['solo']}",
            f"out={run_dir}", f"ckpt={work['ckpt']}", "protocol=knn", "device=cpu", "progress=false"]
    assert main(args) == 2
    assert "holds a pretraining run (checkpoints)" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "the run's\n" and not (run_dir / "eval.lock").exists()
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")
    with pytest.raises(locks.ConfigError, match="holds an evaluation run"):
        refuse_other_runs(evaluation, "pretraining", "run_dir")


def test_a_pack_into_a_folder_of_other_files_is_refused(work, capsys):
    """pack --out pointing at the mock survey's own folder: its catalog, cutouts and config.yaml stay as they were."""
    survey = work["catalog"].parent
    before = sorted(p.name for p in survey.iterdir())
    assert main(pack_args(work["catalog"], survey)) == 2
    err = capsys.readouterr().err
    assert "holds files that are not a pack (catalog.fits" in err and "Traceback" not in err
    assert sorted(p.name for p in survey.iterdir()) == before
