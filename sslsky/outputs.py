"""Where a command writes: checked before any work starts, so a bad ``--out`` is a message, not a traceback
after an hour of computing.

    out = output_dir(cfg.out, "out")            # a folder that exists (made if needed) and is writable
    path = output_file(cfg.out, "out")           # a file path whose folder is writable; not an existing folder
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from sslsky.errors import ConfigError


def _why(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return err.strerror or str(err)


def output_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a writable folder (created with its parents); ConfigError naming ``key`` otherwise."""
    if not str(path):
        raise ConfigError(f"{key} is empty: name an output folder")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a file, not a folder: choose another {key} or move the file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r}: cannot write there ({_why(err)}); choose another {key}") from None
    return folder


def output_file(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a file to (over)write: not a folder, and its folder writable (created if needed)."""
    if not str(path):
        raise ConfigError(f"{key} is empty: name an output file")
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a folder: give a file name, e.g. {target / 'embeddings.h5'}")
    output_dir(target.parent if str(target.parent) else ".", f"the folder of {key}")
    return target
