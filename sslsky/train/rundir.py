"""The run directory of ``sslsky pretrain``: one run at a time, resumed with the settings it started with.

A run directory holds ``checkpoints/``, ``metrics.jsonl``, ``config.yaml`` (the config the run started
with), ``command.txt`` (every command that started or resumed it), ``changes.jsonl`` (the config changes a
resume was explicitly allowed to make) and, while a run is going, the lock file ``pretrain.lock``.

- **Lock.** Rank 0 creates ``pretrain.lock`` atomically (``O_CREAT | O_EXCL``, which NFS honours too) with
  the host, pid, SLURM job id and start time of the run, and removes it on every exit path. A second run on
  the same folder is refused with the holder's name. A lock whose holder is gone is taken over with a
  message: same host and the pid no longer runs (or now belongs to another process), or a SLURM job that is
  no longer running (``squeue``; a requeued job takes over the lock of its own earlier incarnation). A lock
  from another host with nothing to ask (no SLURM job, or no SLURM here) is refused with the command that
  removes it, for the user to run if they are sure.
- **Consistent resume.** When there are checkpoints, the new resolved config is compared with the one
  stored in the latest checkpoint (the config the run is effectively using). A difference in a key that
  can alter the result is refused with the list of differences and the exact override that allows them,
  ``resume.allow_changes=[key,...]``; keys in :data:`NEUTRAL_KEYS` never are. Allowed changes are appended
  to ``changes.jsonl`` with the step they apply from; the checkpoints then store the new config, while
  ``config.yaml`` keeps describing how the run started.
- **A failed start writes nothing.** :meth:`RunDirectory.record_start` (``config.yaml`` on a fresh start,
  ``command.txt``, ``changes.jsonl``, metrics after the resumed step dropped) is called only after the
  trainer has checked and built everything.
- **Stale temporary files** of writes killed half-way (``checkpoints/.step-*.pt.tmp*``, 26 MB and more
  each) are removed at start-up: safe, because the lock says no one else writes here.

    run = RunDirectory(cfg.run_dir)
    state, changes = run.open(cfg)  # rank 0: lock, stale temp files, latest checkpoint (or None), resume checked
    ...                             # build everything
    run.record_start(cfg, state, changes, command)
    ...
    run.close()                            # in a finally: the lock is released
"""

from __future__ import annotations

import difflib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sslsky.config import PretrainConfig, config_to_dict
from sslsky.errors import ConfigError, DiskFullError, is_no_space
from sslsky.outputs import output_dir
from sslsky.train import dist
from sslsky.train.checkpoint import list_checkpoints, load_checkpoint

LOCK_FILE = "pretrain.lock"
CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
CHANGES_FILE = "changes.jsonl"
METRICS_FILE = "metrics.jsonl"

#: Config keys (and whole sections) that cannot change what a run computes, so a resume may change them
#: freely: never refused, not recorded. Every other key alters the result and must be named in
#: ``resume.allow_changes`` to change on a resume. ``optim.total_steps`` is *not* here: it sets the cosine
#: learning-rate (and BYOL momentum) schedule, so training longer changes every later step.
NEUTRAL_KEYS = (
    "run_dir",  # where the run lives: a copied or moved run directory resumes
    "progress", "tensorboard", "log_every",  # what is reported
    "checkpoint_every", "keep_checkpoints",  # when checkpoints are written and how many are kept
    "val_every", "data.val_batches",  # held-out checks: eval mode, own RNG, nothing of the training changes
    "data.num_workers",  # loader processes: the same batches in the same order
    "debug_step_sleep",  # a pause after each step (tests)
    "device", "compile", "channels_last",  # the same computation on other hardware or kernels (other rounding)
    "resume",  # this section itself
)

#: SLURM job states after which a job no longer runs (anything else, PENDING included, holds the lock).
FINISHED_JOB_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})

#: Temporary files of atomic writes (``.NAME.tmpPID``) that a killed process leaves behind.
TEMP_PATTERNS = ("checkpoints/.step-*.pt.tmp*", ".encoder.pt.tmp*", ".config.yaml.tmp*", f".{METRICS_FILE}.tmp*")


def say(text: str) -> None:
    print(f"pretrain: {text}", flush=True)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _write_atomic(path: Path, text: str, what: str) -> None:
    """``text`` to ``path`` through a temporary name; a full disk removes the partial file (DiskFullError)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err):
            raise DiskFullError(path, what) from None
        raise


def append_text(path: Path, text: str, what: str) -> None:
    """Append ``text`` to ``path``; a full disk is a DiskFullError naming it."""
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as err:
        if is_no_space(err):
            raise DiskFullError(path, what) from None
        raise


# ---------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), to tell a reused pid; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs on this host and (when ``started`` is known) is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    current = process_start(pid)
    return not (started and current and current != started)


def slurm_job_state(job: str) -> str | None:
    """SLURM's state of ``job`` (``RUNNING``, ``PENDING``, ...); ``""`` when SLURM no longer knows it, None when
    SLURM cannot be asked (no ``squeue`` / ``scontrol``, no controller)."""
    if shutil.which("squeue"):
        command = ["squeue", "-h", f"--jobs={job}", "-o", "%T"]
    elif shutil.which("scontrol"):
        command = ["scontrol", "show", "job", job]
    else:
        return None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return "" if "invalid job id" in (proc.stdout + proc.stderr).lower() else None
    if command[0] == "squeue":
        states = proc.stdout.split()
        return states[0] if states else ""
    match = re.search(r"JobState=(\S+)", proc.stdout)
    return match.group(1) if match else ""


def describe_holder(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started', '?')}"


class RunLock:
    """``run_dir/pretrain.lock``: JSON ``{host, pid, job, started, proc_start, token}`` of the run that holds it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.token: str | None = None  # ours while we hold it

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (with a message); ConfigError naming a live holder."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text, holder = self._read()
                reason = self.stale_reason(holder)  # raises while the holder may still run
                if self._remove_if_unchanged(text):
                    say(f"took over the stale lock {self.path}: {reason}")
                continue  # create it again (or judge the one that replaced it)
            self._write(fd)
            return
        raise ConfigError(f"run_dir {str(self.path.parent)!r}: another run keeps taking the lock {self.path} at the "
                          f"same time as this one; start one run per run_dir")

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock taken over by another run is left to it)."""
        if self.token is None:
            return
        _, holder = self._read(wait=False)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def _write(self, fd: int) -> None:
        self.token = secrets.token_hex(8)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID") or None,
                "started": now(), "proc_start": process_start(os.getpid()), "token": self.token}
        try:
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
        except OSError as err:
            self.token = None
            self.path.unlink(missing_ok=True)
            if is_no_space(err):
                raise DiskFullError(self.path, "lock file") from None
            raise
        finally:
            os.close(fd)

    def _read(self, wait: bool = True) -> tuple[str | None, dict | None]:
        """The lock's text and its JSON (None when unreadable); a lock being written is waited for (2 s)."""
        deadline = time.monotonic() + (2.0 if wait else 0.0)
        while True:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None, {"gone": True}
            except OSError:
                text = ""
            try:
                holder = json.loads(text)
                if isinstance(holder, dict) and "pid" in holder:
                    return text, holder
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return text, None
            time.sleep(0.1)

    def _remove_if_unchanged(self, text: str | None) -> bool:
        """Remove the lock if it still holds ``text`` (the stale holder judged); False if it changed meanwhile."""
        if text is None:  # gone already
            return False
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_text() == text:
                return True
            # A run took the lock between our look and the rename: give it back unless a third one took it.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            aside.unlink(missing_ok=True)

    # -- is the holder still there? -------------------------------------------------------------

    def stale_reason(self, holder: dict | None) -> str:
        """Why the lock's holder is gone; ConfigError (with what to do) while it runs or cannot be checked."""
        run_dir = str(self.path.parent)
        if holder is None:
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 1e9
            if age < 30:
                raise ConfigError(f"run_dir {run_dir!r}: the lock {self.path} is being created by another run "
                                  f"right now; start one run per run_dir")
            return "the lock file is empty or unreadable (a run killed while creating it)"
        if holder.get("gone"):
            return "it was removed meanwhile"
        desc = describe_holder(holder)
        host, me, job = holder.get("host"), socket.gethostname(), holder.get("job")
        try:
            pid = int(holder["pid"])
        except (TypeError, ValueError):
            pid = -1
        if host == me:
            if pid == os.getpid():
                return f"left by this process ({desc})"
            if pid > 0 and pid_alive(pid, holder.get("proc_start")):
                stop = f"scancel {job}" if job else f"kill {pid}"
                raise ConfigError(f"run_dir {run_dir!r} is in use by another run: {desc} (lock file {self.path}). "
                                  f"Two runs in one run_dir would mix their checkpoints and logs: wait for it to "
                                  f"finish, stop it ({stop}; it checkpoints first), or choose another run_dir")
            return f"{desc} is no longer running"
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return f"left by an earlier run of this SLURM job ({desc}; the job was requeued)"
        if job:
            state = slurm_job_state(str(job))
            if state == "" or state in FINISHED_JOB_STATES:
                return f"SLURM job {job} is no longer running ({state or 'unknown to SLURM'}; {desc})"
            if state is not None:
                raise ConfigError(f"run_dir {run_dir!r} is in use by SLURM job {job} ({state}; {desc}; lock file "
                                  f"{self.path}). Two runs in one run_dir would mix their checkpoints and logs: "
                                  f"wait for the job, cancel it (scancel {job}), or choose another run_dir")
            why = f"SLURM cannot be asked here about job {job}"
        else:
            why = "it ran without SLURM, so there is no job to ask about"
        raise ConfigError(f"run_dir {run_dir!r} is locked by {desc} (lock file {self.path}), and this host ({me}) "
                          f"cannot tell whether that run still goes: {why}. If you are sure it has stopped, remove "
                          f"the lock (rm {shlex.quote(str(self.path))}) and start again; otherwise choose another "
                          f"run_dir")


# ---------------------------------------------------------------------------
# Comparing a resume's config with the run's.
# ---------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _covers(names: list[str] | tuple[str, ...], key: str) -> bool:
    """Whether ``key`` is one of ``names`` or inside a section named there."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def is_neutral(key: str) -> bool:
    """Whether ``key`` is in :data:`NEUTRAL_KEYS` (cannot alter the result)."""
    return _covers(NEUTRAL_KEYS, key)


def config_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each result-altering key that differs. A key the old config lacks (added to the
    schema since) counts as its default; a key the schema no longer has is ignored."""
    defaults = flatten(config_to_dict(PretrainConfig()))
    before, after = flatten(old), flatten(new)
    diffs = []
    for key, value in after.items():
        if is_neutral(key):
            continue
        previous = before.get(key, defaults.get(key))
        if previous != value:
            diffs.append((key, previous, value))
    return diffs


def show(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else f"{text[:width - 3]}..."


def check_allow_names(names: list[str]) -> None:
    """ConfigError for a name in ``resume.allow_changes`` that is no config key or section."""
    keys = set(flatten(config_to_dict(PretrainConfig())))
    known = keys | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"resume.allow_changes: {name!r} is not a pretrain config key{hint}")


# ---------------------------------------------------------------------------
# The run directory.
# ---------------------------------------------------------------------------


class RunDirectory:
    """Bookkeeping of one ``sslsky pretrain`` run directory (rank 0 only); see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.given = str(path)  # as configured: an empty run_dir is refused, not read as "."
        self.path = Path(path)
        self.lock = RunLock(self.path / LOCK_FILE)
        self.checkpoint: Path | None = None  # the latest checkpoint found by open()

    def open(self, cfg: PretrainConfig) -> tuple[dict | None, list[dict]]:
        """Check the folder is writable, take the lock, remove stale temp files, check a resume: the latest
        checkpoint (None on a fresh start) and the allowed config changes (:meth:`check_resume`)."""
        output_dir(self.given, "run_dir")
        self.lock.acquire()
        self.remove_stale_temp_files()
        found = list_checkpoints(self.path / "checkpoints")
        self.checkpoint = found[-1] if found else None
        state = load_checkpoint(self.checkpoint) if found else None
        return state, self.check_resume(cfg, state)

    def close(self) -> None:
        self.lock.release()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of killed writes (:data:`TEMP_PATTERNS`), with a message."""
        stale = sorted(p for pattern in TEMP_PATTERNS for p in self.path.glob(pattern) if p.is_file())
        size = 0
        for path in stale:
            size += path.stat().st_size
            path.unlink(missing_ok=True)
        if stale:
            names = ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
            say(f"removed {len(stale)} stale temp file(s) of interrupted writes ({size / 1e6:.1f} MB) in "
                f"{self.path}: {names}")
        return stale

    def check_resume(self, cfg: PretrainConfig, state: dict | None) -> list[dict]:
        """The allowed changes ``{key, old, new}`` of a resume; ConfigError listing the changes not allowed.

        ``state``: the latest checkpoint (None on a fresh start: nothing to compare).
        """
        check_allow_names(cfg.resume.allow_changes)
        if state is None:
            return []
        step = int(state["step"])
        if "config" not in state:
            say(f"{self.checkpoint} stores no config; the resume cannot be checked against the run's settings")
            return []
        diffs = config_differences(state["config"], config_to_dict(cfg))
        refused = [d for d in diffs if not _covers(cfg.resume.allow_changes, d[0])]
        if refused:
            lines = "\n".join(f"  {key}: {show(old)} -> {show(new)}" for key, old, new in refused)
            allow = sorted({*cfg.resume.allow_changes, *(key for key, _, _ in refused)})
            longer = ""
            if any(key == "optim.total_steps" for key, _, _ in refused):
                longer = (f"\noptim.total_steps sets the cosine learning-rate schedule, so changing it changes every "
                          f"step after {step}: to train longer (or shorter), allow it as below.")
            raise ConfigError(
                f"run_dir {str(self.path)!r} holds a run at step {step} ({self.checkpoint.name}) whose config "
                f"differs from this one in {len(refused)} setting(s) that change the result:\n{lines}{longer}\n"
                f"Resume with the run's values (the checkpoint's config: {CONFIG_FILE} plus {CHANGES_FILE}), start "
                f"a new run in another run_dir, or allow the change(s), which are then recorded in "
                f"{self.path / CHANGES_FILE}, by adding the override\n"
                f"  'resume.allow_changes=[{','.join(allow)}]'")
        if cfg.optim.total_steps < step:
            raise ConfigError(f"optim.total_steps={cfg.optim.total_steps} is below the step of the run in "
                              f"{str(self.path)!r} ({step}, {self.checkpoint.name}); give at least {step}, or "
                              f"start a new run in another run_dir")
        return [{"key": key, "old": old, "new": new} for key, old, new in diffs]

    def record_start(self, cfg: PretrainConfig, state: dict | None, changes: list[dict],
                     command: list[str] | None = None) -> None:
        """After every check passed: ``config.yaml`` (fresh start only), ``command.txt``, ``changes.jsonl``,
        metrics of steps after the resumed one dropped (they are logged again)."""
        step = int(state["step"]) if state is not None else 0
        text = shlex.join(command or sys.argv)
        if state is None:
            _write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
        append_text(self.path / COMMAND_FILE, f"{now()} git {git_sha()} job {os.environ.get('SLURM_JOB_ID', '-')}: "
                                          f"{text}\n", "command log")
        if changes:
            records = "".join(json.dumps({"step": step, **change, "time": now(), "command": text}) + "\n"
                              for change in changes)
            append_text(self.path / CHANGES_FILE, records, "change log")
            listed = "; ".join(f"{c['key']}: {show(c['old'])} -> {show(c['new'])}" for c in changes)
            say(f"resuming at step {step} with {len(changes)} allowed change(s), recorded in "
                f"{self.path / CHANGES_FILE}: {listed}")
        self.trim_metrics(step if state is not None else -1)

    def trim_metrics(self, step: int) -> int:
        """Drop ``metrics.jsonl`` records after ``step`` (-1: all), written after the checkpoint the run restarts
        from, and any partial line; returns how many were dropped."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            _write_atomic(path, "".join(kept), "metrics")
            when = f"after step {step}" if step >= 0 else "of a start that left no checkpoint"
            say(f"dropped {dropped} record(s) {when} from {path} (they are logged again)")
        return dropped


# ---------------------------------------------------------------------------
# Rank 0 decides, every rank learns.
# ---------------------------------------------------------------------------


class MainRankFailedError(Exception):
    """Raised on the other ranks when rank 0 stopped (it prints the message); the command exits with status 2."""


def on_main_rank(fn, main: bool):
    """``fn()`` on rank 0 (its result there, None elsewhere). If it raises, rank 0 re-raises and every other rank
    raises :class:`MainRankFailedError`, so that no rank waits in a collective for one that has stopped."""
    result, error = None, None
    if main:
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 (every rank learns of it below, then it is raised)
            error = err
    summary = None if error is None else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    failed = dist.all_gather_object(summary)[0]
    if error is not None:
        raise error
    if failed:
        raise MainRankFailedError(failed)
    return result
