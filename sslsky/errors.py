"""The errors a user can fix, shared by every layer; the command line turns each into a message and exit status 2.

- :class:`ConfigError`: a config file, override or command-line value (``sslsky.config`` re-exports it).
- :class:`DataError`: input data that is missing, damaged or inconsistent (a shard, a manifest, a catalog).
- :class:`DiskFullError`: a write ran out of space; the partial file is already removed.

Each message names the file, row or key and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override the user can fix; the message says how."""


class DataError(Exception):
    """Input data (a shard, a manifest, a catalog) that is missing or damaged; the message names it and the fix.

    Not a ``ValueError``, so that code catching those for bad values never swallows it. When raised in a
    ``DataLoader`` worker, torch re-raises it in the main process with the worker's traceback as the message;
    :func:`user_message` recovers the original text.
    """


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC / EDQUOT); the partial file has been removed."""

    def __init__(self, path: str | os.PathLike, what: str = "file"):
        self.path = Path(path)
        super().__init__(errno.ENOSPC, disk_full_message(self.path, what))

    def __str__(self) -> str:
        return self.strerror


#: errno values that mean "no room left" (disk full, quota exceeded).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(err: BaseException) -> bool:
    """True for an ``OSError`` that is ENOSPC/EDQUOT, or the RuntimeError torch raises for a short write."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "failed writing" in text
                                              or "No space left" in text)


def disk_full_message(path: Path, what: str = "file") -> str:
    folder = path.parent if not path.is_dir() else path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
        room = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        room = "free space unknown"
    return (f"no space left on the disk holding {folder} ({room}) while writing {what} {path}; the partial file was "
            f"removed. Free space there (or point the output elsewhere) and run the command again")


def user_message(err: BaseException) -> str:
    """The text to show for ``err``: for a ``DataError`` re-raised from a DataLoader worker, its original message,
    not the worker's traceback."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[-1].strip()
    return text
