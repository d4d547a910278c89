"""One run at a time per output: the lock file of ``sslsky pretrain``, ``pack``, ``embed`` and the evaluations.

A bottom layer (the standard library and :mod:`sslsky.errors` only; no torch), so that data, eval and train
all use the same lock:

    with OutputLock(Path(out) / "pack.lock", "pack", key="out", target=out):   # or acquire() / release()
        ...

- **Taking it.** The lock is a file holding one JSON line ``{host, pid, job, started, proc_start, token,
  command}``. It is written whole under a temporary name and hard-linked to its name (``link`` fails when
  the name exists, atomically, on NFS too), so a lock is never seen half-written; where the file system has
  no hard links it is created with ``O_CREAT | O_EXCL`` and written at once. Only the process that took it
  removes it (its token), on every exit path of the command.
- **A second run** on the same output is refused (:class:`~sslsky.errors.ConfigError`, exit status 2) with
  the holder: pid, host, SLURM job, command, start time, and what to do.
- **A stale lock** is taken over with a message: same host and the pid no longer runs (or now belongs to
  another process), or a SLURM job that is no longer running (``squeue``; a requeued job takes over the lock
  of its own earlier incarnation), or a lock file that is empty or holds only the start of a lock (a run
  killed while creating it with ``O_EXCL``; waited for 2 s first). A lock from another host with nothing to
  ask (no SLURM job, or no SLURM here) is refused with the command that removes it, for the user to run if
  they are sure.
- **Not a lock** (a folder, a link, random bytes, JSON that is no lock of sslsky) is never removed: refused
  with what was found and the command that clears it.
- **A failed start leaves no folder behind**: the folders that did not exist when the lock object was made
  (the output folder and its missing parents) are removed at :meth:`OutputLock.release` if they are empty and
  this run held the lock.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sslsky.errors import ConfigError, DiskFullError, is_no_space
from sslsky.outputs import refuse_other_runs

#: SLURM job states after which a job no longer runs (anything else, PENDING included, holds the lock).
FINISHED_JOB_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                 "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})

#: How long a lock file that is empty or holds only the start of a lock is waited for before it is judged.
PARTIAL_WAIT_S = 2.0

#: The lock of an evaluation (``sslsky eval-morph``, ``eval-specz``) in its out folder, and what it prevents.
EVAL_LOCK = "eval.lock"
EVAL_HARM = "Two evaluations in one out folder would write over each other's metrics and predictions"

#: errno values of a ``link`` the file system does not offer (then ``O_EXCL`` is used).
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), to tell a reused pid; None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
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
    command = f" (sslsky {holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}{command}, started {holder.get('started', '?')}"


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def lock_next_to(output: str | os.PathLike) -> Path:
    """The lock of an output file or folder kept beside it, ``.NAME.lock`` in its folder: the lock of ``sslsky
    embed --out`` (a file) and ``sslsky pack --out`` (a folder that holds the pack and nothing else)."""
    path = Path(os.path.realpath(output))  # a link and its target share one lock
    return path.parent / f".{path.name}.lock"


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; a folder with anything in it stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _is_our_start(raw: bytes) -> bool:
    """Whether ``raw`` is empty or only the beginning of a lock this module writes (a creation cut short): not
    whole JSON."""
    if not raw.strip():
        return True
    if not raw.lstrip().startswith(b'{"host": '):
        return False
    try:
        json.loads(raw.decode())
    except ValueError:
        return True
    return False


class OutputLock:
    """The lock file ``path`` of one output; see the module docstring.

    ``command``: the sslsky command taking it (stored in the lock, named in messages); ``key`` / ``target``: the
    config key and value of the output, as messages name it (``run_dir '/x/run'``); ``output``: the output
    folder, removed at release when this run created it and left it empty (default: the lock's folder);
    ``harm``: what two runs at once would do; ``stop_note``: said after the command that stops the holder;
    ``say``: where take-overs are reported (default: print, prefixed ``sslsky COMMAND:``).
    """

    def __init__(self, path: str | os.PathLike, command: str, *, key: str = "out", target: str | None = None,
                 output: str | os.PathLike | None = None, harm: str = "", stop_note: str = "",
                 say: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.command = command
        self.key = key
        self.target = str(target if target is not None else self.path.parent)
        self.harm = harm or f"Two runs writing one {key} would write over each other's files"
        self.stop_note = stop_note
        self.say = say or (lambda text: print(f"sslsky {command}: {text}", flush=True))
        # The output folder (default: the lock's) and its parents missing now: removed at release if still empty.
        self.created = missing_folders(output if output is not None else self.path.parent)
        self.token: str | None = None  # ours while we hold it
        self._held = False  # this run took the lock: only then are the folders it created its own to remove

    @property
    def subject(self) -> str:
        return f"{self.key} {self.target!r}"

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> OutputLock:
        """Take the lock, taking over a stale one (with a message); ConfigError naming a live holder."""
        for _ in range(5):
            try:
                created = self._create()
            except DiskFullError:
                raise
            except (PermissionError, OSError) as err:
                if not isinstance(err, PermissionError) and err.errno not in (errno.EROFS, errno.EACCES):
                    raise
                raise ConfigError(f"{self.subject}: cannot create the lock file {self.path} ({err.strerror}), "
                                  f"which keeps a second run from writing there at the same time: make "
                                  f"{self.path.parent} writable, or choose another {self.key}") from None
            if created:
                self._held = True
                self._remove_own_leftovers()
                return self
            raw, holder = self._read()
            reason = self.stale_reason(raw, holder)  # raises while the holder may still run
            if self._remove_if_unchanged(raw):
                self.say(f"took over the stale lock {self.path}: {reason}")
            # create it again (or judge the one that replaced it)
        raise ConfigError(f"{self.subject}: another run keeps taking the lock {self.path} at the same time as this "
                          f"one; start one run per {self.key}")

    def _remove_own_leftovers(self) -> None:
        """Temp files of this lock's own creation or take-over (``.NAME.new-*``, ``.NAME.stale-*``) that a run
        killed in those microseconds left: removed once a minute old (a live one lasts microseconds)."""
        name = glob.escape(self.path.name)
        for path in [*self.path.parent.glob(f".{name}.new-*"), *self.path.parent.glob(f".{name}.stale-*")]:
            try:
                if stat.S_ISREG(os.lstat(path).st_mode) and time.time() - os.lstat(path).st_mtime > 60:
                    path.unlink()
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock taken over by another run is left to it), then the folders
        this run created if nothing was written in them (not those of a refused run: the holder may have just
        made the same folder)."""
        if self.token is not None:
            _, holder = self._read(wait=False)
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.token = None
        if self._held:
            remove_empty_folders(self.created)
            self._held = False

    def _info(self) -> bytes:
        self.token = secrets.token_hex(8)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID") or None,
                "started": now(), "proc_start": process_start(os.getpid()), "token": self.token,
                "command": self.command}
        return (json.dumps(info) + "\n").encode()

    def _create(self) -> bool:
        """Create the lock (True), or False when a lock file is there."""
        data = self._info()
        tmp = self.path.with_name(f".{self.path.name}.new-{os.getpid()}-{self.token}")
        try:
            for attempt in range(3):
                try:
                    self._write_new(tmp, data)
                    break
                except FileNotFoundError:  # the folder is gone (removed by a run that failed meanwhile)
                    if attempt == 2:
                        raise
                    self.path.parent.mkdir(parents=True, exist_ok=True)
            failure: OSError | None = None
            try:
                os.link(tmp, self.path)
            except OSError as err:
                failure = err
            try:
                linked = os.stat(tmp).st_nlink >= 2  # NFS: a lost reply can report a link that was made
            except OSError:
                linked = False
            if linked:
                return True
            if isinstance(failure, FileExistsError):
                self.token = None
                return False
            if failure is not None and failure.errno in _NO_LINK_ERRNOS:
                return self._create_exclusive(data)
            self.token = None
            if failure is not None:
                raise failure
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _write_new(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            self.token = None
            if is_no_space(err):
                raise DiskFullError(self.path, "lock file") from None
            raise
        os.close(fd)

    def _create_exclusive(self, data: bytes) -> bool:
        """``O_CREAT | O_EXCL`` where the file system has no hard links."""
        try:
            self._write_new(self.path, data)
        except FileExistsError:
            self.token = None
            return False
        return True

    def _read(self, wait: bool = True) -> tuple[bytes | None, dict | None]:
        """The lock's bytes (None when gone) and its JSON holder (None when it is not a lock of ours). A lock file
        that is empty or holds only the start of a lock is waited for (:data:`PARTIAL_WAIT_S`)."""
        deadline = time.monotonic() + (PARTIAL_WAIT_S if wait else 0.0)
        while True:
            try:
                mode = os.lstat(self.path).st_mode
            except FileNotFoundError:
                return None, None
            if not stat.S_ISREG(mode):
                return b"", None  # judged by stale_reason (never read: a FIFO would block)
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None, None
            except OSError:
                raw = b""
            try:
                holder = json.loads(raw.decode())
                if isinstance(holder, dict) and "pid" in holder and "host" in holder:
                    return raw, holder
            except ValueError:  # UnicodeDecodeError included
                pass
            if not _is_our_start(raw) or time.monotonic() >= deadline:
                return raw, None
            time.sleep(0.1)

    def _remove_if_unchanged(self, raw: bytes | None) -> bool:
        """Remove the lock if it still holds ``raw`` (the stale holder judged); False if it changed meanwhile."""
        if raw is None:  # gone already
            return False
        aside = self.path.with_name(f".{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            try:
                same = stat.S_ISREG(os.lstat(aside).st_mode) and aside.read_bytes() == raw
            except OSError:
                same = False
            if same:
                return True
            # A run took the lock between our look and the rename: give it back unless a third one took it.
            try:
                os.link(aside, self.path)
            except OSError:
                if not os.path.lexists(self.path):
                    os.rename(aside, self.path)
            return False
        finally:
            if os.path.lexists(aside) and stat.S_ISREG(os.lstat(aside).st_mode):
                aside.unlink(missing_ok=True)

    # -- is the holder still there? -------------------------------------------------------------

    def _not_a_lock(self, found: str) -> ConfigError:
        quoted = shlex.quote(str(self.path))
        remove = f"rm -r {quoted}" if self.path.is_dir() and not self.path.is_symlink() else f"rm {quoted}"
        return ConfigError(f"{self.subject}: the lock file {self.path} {found}, not a lock of sslsky (which is one "
                           f"JSON line with the host, pid and SLURM job of the run holding it). If no sslsky run is "
                           f"writing {self.key} {self.target}, remove it ({remove}) and start again")

    def stale_reason(self, raw: bytes | None, holder: dict | None) -> str:
        """Why the lock's holder is gone; ConfigError (with what to do) while it runs, cannot be checked, or the
        file is no lock of ours."""
        if raw is None:
            return "it was removed meanwhile"
        if holder is None:
            try:
                mode = os.lstat(self.path).st_mode
            except FileNotFoundError:
                return "it was removed meanwhile"
            if stat.S_ISDIR(mode):
                raise self._not_a_lock("is a folder")
            if stat.S_ISLNK(mode):
                raise self._not_a_lock(f"is a symbolic link (to {os.readlink(self.path)})")
            if not stat.S_ISREG(mode):
                raise self._not_a_lock("is not a regular file (a FIFO, socket or device)")
            if not raw.strip():
                return "the lock file was empty (a run killed while creating it)"
            if _is_our_start(raw):
                return f"the lock file held only the start of a lock ({len(raw)} bytes: a run killed while writing it)"
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise self._not_a_lock(f"holds {len(raw)} bytes that are not text") from None
            snippet = " ".join(text.split())
            snippet = snippet if len(snippet) <= 60 else f"{snippet[:57]}..."
            raise self._not_a_lock(f"holds {snippet!r}")
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
                raise ConfigError(f"{self.subject} is in use by another run: {desc} (lock file {self.path}). "
                                  f"{self.harm}: wait for it to finish, stop it ({stop}{self.stop_note}), or choose "
                                  f"another {self.key}")
            return f"{desc} is no longer running"
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return f"left by an earlier run of this SLURM job ({desc}; the job was requeued)"
        if job:
            state = slurm_job_state(str(job))
            if state == "" or state in FINISHED_JOB_STATES:
                return f"SLURM job {job} is no longer running ({state or 'unknown to SLURM'}; {desc})"
            if state is not None:
                raise ConfigError(f"{self.subject} is in use by SLURM job {job} ({state}; {desc}; lock file "
                                  f"{self.path}). {self.harm}: wait for the job, cancel it (scancel {job}), or "
                                  f"choose another {self.key}")
            why = f"SLURM cannot be asked here about job {job}"
        else:
            why = "it ran without SLURM, so there is no job to ask about"
        raise ConfigError(f"{self.subject} is locked by {desc} (lock file {self.path}), and this host ({me}) cannot "
                          f"tell whether that run still goes: {why}. If you are sure it has stopped, remove the lock "
                          f"(rm {shlex.quote(str(self.path))}) and start again; otherwise choose another {self.key}")


def run_evaluation_locked(command: str, function, cfg):
    """``function(cfg, lock)`` with the lock of the evaluation's out folder (``OUT/eval.lock``), released after,
    whatever happens (a folder the evaluation created and left empty is removed too); ``function`` acquires it
    once it has checked the folder."""
    refuse_other_runs(cfg.out or ".", "evaluation", "out")
    lock = OutputLock(Path(cfg.out or ".") / EVAL_LOCK, command, key="out", target=cfg.out, harm=EVAL_HARM)
    try:
        return function(cfg, lock)
    finally:
        lock.release()
