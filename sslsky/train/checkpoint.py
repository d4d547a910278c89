"""Atomic checkpoints that ``torch.load(weights_only=True)`` accepts.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts of
those -- no pickled objects -- written to a temporary name and moved into
place with ``os.replace``, so a checkpoint on disk is always whole, even if
the job is killed while writing.

    save_checkpoint(state, run_dir / "checkpoints" / "step-00001000.pt")
    state = load_latest(run_dir / "checkpoints")   # None when starting fresh

A write that fails (a full disk or quota: ``OSError`` ENOSPC / EDQUOT, or the ``RuntimeError`` torch raises
for a short write, "unexpected pos" / "failed writing") removes its temporary file and raises
:class:`~sslsky.errors.DiskFullError` naming the file and the disk; the older checkpoints are untouched.
An interrupted write (Ctrl-C, an exception) removes it too; only SIGKILL leaves ``.NAME.tmpPID`` behind,
which ``sslsky pretrain`` removes at its next start (:mod:`sslsky.train.rundir`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from sslsky.errors import DataError
from sslsky.outputs import atomic_output

CHECKPOINT_PATTERN = "step-{step:08d}.pt"
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def save_checkpoint(state: dict, path: str | os.PathLike, keep: int = 2) -> Path:
    """Write ``state`` atomically; keep the newest ``keep`` checkpoints in that folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "checkpoint") as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if keep > 0:
        for old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (temporary files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_RE.match(p.name))


class CheckpointDamagedError(DataError):
    """A checkpoint file that cannot be loaded (truncated, empty, not a checkpoint, or refused by
    ``weights_only``); ``path`` and ``reason`` let a caller say more (:mod:`sslsky.train.rundir` names the
    previous checkpoint)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"checkpoint {path} cannot be loaded ({reason}); it is damaged or no sslsky checkpoint: "
                         f"delete or replace it")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; :class:`CheckpointDamagedError` (a DataError: a message,
    exit status 2) names a file that cannot be loaded."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        size = path.stat().st_size if path.is_file() else 0
        text = " ".join(str(err).split()) or "no detail"
        text = text if len(text) <= 200 else f"{text[:197]}..."
        raise CheckpointDamagedError(path, f"{size} bytes; {type(err).__name__}: {text}") from None
    if not isinstance(state, dict):
        raise CheckpointDamagedError(path, f"it holds a {type(state).__name__}, not a dict")
    return state


def load_latest(folder: str | os.PathLike, map_location="cpu") -> dict | None:
    """The newest checkpoint in ``folder``, or None when there is none."""
    found = list_checkpoints(folder)
    return load_checkpoint(found[-1], map_location) if found else None
