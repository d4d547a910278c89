"""The run directory of ``sslsky pretrain``: one run at a time, resumed with the settings it started with.

A run directory holds ``checkpoints/``, ``metrics.jsonl``, ``config.yaml`` (the config the run started
with), ``command.txt`` (every command that started or resumed it), ``changes.jsonl`` (the config changes a
resume was explicitly allowed to make) and, while a run is going, the lock file ``pretrain.lock``.

- **Lock.** Rank 0 takes ``pretrain.lock`` (:class:`sslsky.locks.OutputLock`, the lock of every output: host,
  pid, SLURM job, start time; stale locks of dead runs taken over, a live holder named in the refusal) and
  removes it on every exit path; a failed start in a new run_dir leaves no folder behind.
- **Consistent resume.** When there are checkpoints, the new resolved config is compared with the one
  stored in the latest checkpoint (the config the run is effectively using). A difference in a key that
  can alter the result is refused with the list of differences and the exact override that allows them,
  ``resume.allow_changes=[key,...]``; keys in :data:`NEUTRAL_KEYS` never are. Allowed changes are appended
  to ``changes.jsonl`` with the step they apply from; the checkpoints then store the new config, while
  ``config.yaml`` keeps describing how the run started. ``data.path`` is compared as a folder (relative or
  absolute, a trailing slash, a link: the same), and a copy of the same shards elsewhere (the same sha256
  list in ``manifest.json``) is the same data, said so. Keys that set the shapes of the weights
  (:func:`shape_keys`: ``model.arch``, ``model.moco.dim``, ``model.moco.queue_size`` ...) can never change on a resume.
- **A damaged latest checkpoint** is a message naming it and the previous one (:meth:`RunDirectory.load`).
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
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sslsky import dist
from sslsky.config import PretrainConfig, config_to_dict, migrate_config
from sslsky.data.schema import MANIFEST_NAME
from sslsky.errors import ConfigError, DataError, DiskFullError, is_no_space
from sslsky.locks import OutputLock
from sslsky.methods import METHODS, foreign_sections
from sslsky.outputs import output_dir, refuse_other_runs, write_text_atomic
from sslsky.train.checkpoint import CheckpointDamagedError, list_checkpoints, load_checkpoint

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


#: Keys that set the shapes of the weights whatever the method: a checkpoint cannot be loaded into a model
#: built with other values, so a resume can never change them, whatever ``resume.allow_changes`` says. The
#: encoders' option sections (``model.vit``, ``model.fusion``) are here whole; ``model.stem`` is not (both stems
#: have the same weights: it changes the stride, not the shapes). A method adds its own
#: (:attr:`sslsky.methods.base.Method.shape_keys`).
SHAPE_KEYS = ("method", "model.arch", "model.n_bands", "model.vit", "model.fusion")


def shape_keys(method: str) -> tuple[str, ...]:
    """The keys (or sections) that cannot change on a resume of a run of ``method``."""
    cls = METHODS.get(method)
    return (*SHAPE_KEYS, *(cls.shape_keys if cls is not None else ()))


def shard_digests(path: str | os.PathLike) -> list[str] | None:
    """The sha256 of each shard in ``path/manifest.json``, in order; None where there is no such list to read
    (no manifest, a single HDF5 file, an older manifest without digests)."""
    try:
        shards = json.loads((Path(path) / MANIFEST_NAME).read_text())["shards"]
        digests = [entry["sha256"] for entry in shards]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digests if digests and all(isinstance(d, str) and d for d in digests) else None


def data_identity(path: str | os.PathLike) -> dict:
    """What a checkpoint records of ``data.path``: the resolved folder and its shards' sha256 list."""
    return {"path": os.path.realpath(path) if str(path) else "", "shard_sha256": shard_digests(path)}


def same_data(old: str, new: str, data_info: dict | None) -> str | None:
    """Whether ``data.path`` ``old`` (the run's) and ``new`` name the same data: '' for the same folder (spelt
    another way: relative or absolute, a trailing slash, a link) holding the same shards, a sentence for a copy
    of the same shards elsewhere (same sha256 list in manifest.json), None for other data -- also in the same
    folder, packed again (another dtype, another catalog) since the checkpoint. ``data_info``: the checkpoint's
    record of the run's data (:func:`data_identity`; older checkpoints have none: ``old`` is then resolved
    here and only the folder can be compared)."""
    recorded = (data_info or {}).get("path") or ""
    resolved_old = recorded or (os.path.realpath(old) if old else "")
    resolved_new = os.path.realpath(new) if new else ""
    trained_on = (data_info or {}).get("shard_sha256")
    after = shard_digests(new) if new else None
    if resolved_new and resolved_new == resolved_old:
        return "" if not trained_on or trained_on == after else None
    before = trained_on or (shard_digests(resolved_old) if resolved_old else None)
    if before and after and before == after:
        return (f"data.path {old!r} -> {new!r}: accepted as the same data, the shards in {new} are those the run "
                f"trained on ({len(after)} shard(s), the same sha256 of each in its manifest.json)")
    return None


def show(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else f"{text[:width - 3]}..."


def change_line(key: str, old: Any, new: Any) -> str:
    """``key: old -> new``; for lists (of mappings), the first entry and field that differ, so that two long values
    with the same beginning still show what changed (``model.align.stages[1].image_text: 1.0 -> 2.0``)."""
    while isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
        if i is None:
            break
        key, old, new = f"{key}[{i}]", old[i], new[i]
        if isinstance(old, dict) and isinstance(new, dict):
            field = next((f for f in {**old, **new} if old.get(f) != new.get(f)), None)
            key, old, new = f"{key}.{field}", old.get(field), new.get(field)
    return f"  {key}: {show(old)} -> {show(new)}"


def fixed_message(keys: list[str]) -> str:
    """Why ``keys`` (shape keys) cannot change on a resume."""
    names = ", ".join(keys)
    verb = "changes" if len(keys) == 1 else "change"
    return (f"{names} cannot change on a resume: {'it' if len(keys) == 1 else 'they'} {verb} the shapes of the "
            f"model's weights, which the checkpoint could then not be loaded into; resume with the run's "
            f"value{'s' if len(keys) > 1 else ''}, or start a new run in another run_dir")


def check_allow_names(names: list[str], method: str) -> None:
    """ConfigError for a name in ``resume.allow_changes`` that is no config key or section, or a key that cannot
    change on a resume of a ``method`` run (:func:`shape_keys`)."""
    keys = set(flatten(config_to_dict(PretrainConfig())))
    known = keys | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"resume.allow_changes: {name!r} is not a pretrain config key{hint}")
    fixed = [name for name in names if _covers(shape_keys(method), name)]
    if fixed:
        raise ConfigError(f"resume.allow_changes={names}: {fixed_message(fixed)}")


# ---------------------------------------------------------------------------
# The run directory.
# ---------------------------------------------------------------------------


class RunDirectory:
    """Bookkeeping of one ``sslsky pretrain`` run directory (rank 0 only); see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.given = str(path)  # as configured: an empty run_dir is refused, not read as "."
        self.path = Path(path)
        self.lock = OutputLock(self.path / LOCK_FILE, "pretrain", key="run_dir", target=str(self.path), say=say,
                               harm="Two runs in one run_dir would mix their checkpoints and logs",
                               stop_note="; it checkpoints first")
        self.checkpoint: Path | None = None  # the latest checkpoint found by open()

    def open(self, cfg: PretrainConfig) -> tuple[dict | None, list[dict]]:
        """Check the folder is writable, take the lock, remove stale temp files, check a resume: the latest
        checkpoint (None on a fresh start) and the allowed config changes (:meth:`check_resume`)."""
        output_dir(self.given, "run_dir")
        refuse_other_runs(self.given, "pretraining", "run_dir")
        self.lock.acquire()
        self.remove_stale_temp_files()
        found = list_checkpoints(self.path / "checkpoints")
        self.checkpoint = found[-1] if found else None
        state = self.load(found) if found else None
        return state, self.check_resume(cfg, state)

    def load(self, found: list[Path]) -> dict:
        """The latest of ``found`` (oldest first); a DataError when it cannot be loaded.

        Not a fall-back to the previous checkpoint: checkpoints are written whole (a temporary name, then a
        rename), so a damaged latest one is no interrupted write of ours but a disk fault or a bad copy, which
        the user should see before the run goes on; resuming from an older one silently redoes steps (and
        under DDP every rank would have to agree on it). Deleting the file, as the message says, does it.
        """
        try:
            return load_checkpoint(found[-1])
        except CheckpointDamagedError as err:
            path = found[-1]
            if len(found) > 1:
                older = f" (older ones there too: {', '.join(p.name for p in found[:-2])})" if len(found) > 2 else ""
                then = f"the run then resumes from the previous one, {found[-2]}{older}"
            else:
                then = "there is no earlier checkpoint, so the run then starts again from step 0"
            raise DataError(f"the latest checkpoint {path} cannot be loaded ({err.reason}): it is truncated, empty or "
                            f"damaged. sslsky writes checkpoints whole (a temporary name, then a rename), so this is "
                            f"a disk fault or a bad copy, not an interrupted write. Delete it "
                            f"(rm {'-r ' if path.is_dir() else ''}{shlex.quote(str(path))}) and run the same command "
                            f"again: {then}") from None

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
        run_config = migrate_config(state["config"]) if state is not None and state.get("config") else None
        method = str((run_config or {}).get("method") or cfg.method)
        check_allow_names(cfg.resume.allow_changes, method)
        if state is None:
            return []
        step = int(state["step"])
        if run_config is None:
            say(f"{self.checkpoint} stores no config; the resume cannot be checked against the run's settings")
            return []
        unread = list(foreign_sections(cfg))  # other methods' and encoders' sections: they alter nothing here
        diffs = [d for d in config_differences(run_config, config_to_dict(cfg)) if not _covers(unread, d[0])]
        for diff in [d for d in diffs if d[0] == "data.path"]:
            same = same_data(str(diff[1] or ""), str(diff[2] or ""), state.get("data_info"))
            if same is not None:  # the same folder spelt another way, or a copy of the same shards
                diffs.remove(diff)
                if same:
                    say(same)
        if not any(d[0] == "data.path" for d in diffs) and cfg.data.path and \
                same_data(cfg.data.path, cfg.data.path, state.get("data_info")) is None:
            # the same folder, packed again since (another dtype, catalog or config): other data under one name
            diffs.append(("data.path", "the shards the run trained on", "packed again since: other shards"))
        for key, old, new in diffs:
            if key == "method":  # another method is another model: nothing else about the resume matters
                raise ConfigError(f"run_dir {str(self.path)!r} holds a method={old} run at step {step}; this config "
                                  f"is method={new}, which cannot resume it: give method={old}, or start the "
                                  f"method={new} run in another run_dir")
        fixed = [key for key, _, _ in diffs if _covers(shape_keys(method), key)]
        refused = [d for d in diffs if d[0] in fixed or not _covers(cfg.resume.allow_changes, d[0])]
        if refused:
            lines = "\n".join(change_line(key, old, new) for key, old, new in refused)
            allowable = [key for key, _, _ in refused if key not in fixed]
            allow = sorted({*cfg.resume.allow_changes, *allowable})
            longer = ""
            if "optim.total_steps" in allowable:
                longer = (f"\noptim.total_steps sets the cosine learning-rate schedule, so changing it changes every "
                          f"step after {step}: to train longer (or shorter), allow it as below.")
            if fixed:
                longer += f"\n{fixed_message(fixed)}."
            where = (f"Resume with the run's values (the checkpoint's config: {CONFIG_FILE} plus {CHANGES_FILE}), "
                     f"start a new run in another run_dir")
            if allowable:
                where += (f", or allow the {'other ' if fixed else ''}change(s), which are then recorded in "
                          f"{self.path / CHANGES_FILE}, by adding the override\n"
                          f"  'resume.allow_changes=[{','.join(allow)}]'")
            raise ConfigError(
                f"run_dir {str(self.path)!r} holds a run at step {step} ({self.checkpoint.name}) whose config "
                f"differs from this one in {len(refused)} setting(s) that change the result:\n{lines}{longer}\n"
                f"{where}")
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
            write_text_atomic(self.path / CONFIG_FILE, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config")
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
            write_text_atomic(path, "".join(kept), "metrics")
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
