"""Where a command writes, and how: checked before any work starts, so a bad ``--out`` is a message, not a
traceback after an hour of computing; and written atomically, so a file under its own name is always whole.

    out = output_dir(cfg.out, "out")            # a folder that exists (made if needed) and is writable
    path = output_file(cfg.out, "out")           # a file path whose folder is writable; not an existing folder
    with atomic_output(out / "metrics.json", "metrics") as tmp:   # write tmp; renamed into place on success
        tmp.write_text(text)
    write_text_atomic(out / "config.yaml", text, "config")

A write that fails removes its temporary file; one that runs out of space ends in
:class:`~sslsky.errors.DiskFullError` naming the disk (exit status 2 on the command line).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sslsky.errors import ConfigError, DiskFullError, is_no_space


def _why(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return err.strerror or str(err)


def _unusable(folder: Path) -> str:
    """Why ``folder`` cannot hold our outputs ('' when it can); it is created with its parents if missing."""
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"cannot write there: {_why(err)}"
    return ""


def output_dir(path: str | os.PathLike, key: str, create: bool = True) -> Path:
    """``path`` as a writable folder (created with its parents); ConfigError naming ``key`` otherwise.

    ``create=False``: a missing folder is not made (nothing is written yet); the write is tried in its nearest
    existing parent instead.
    """
    if not str(path):
        raise ConfigError(f"{key} is empty: name an output folder")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a file, not a folder; choose another {key}")
    parent = folder
    while not create and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != folder and not parent.is_dir():
        raise ConfigError(f"{key}={str(path)!r} cannot be made: {parent} is a file, not a folder; choose another {key}")
    why = _unusable(parent)
    if why:
        where = f" in {parent}" if parent != folder else ""
        raise ConfigError(f"{key}={str(path)!r}{' cannot be made' + where if where else ''}: {why}; "
                          f"choose another {key}")
    return folder


def output_file(path: str | os.PathLike, key: str, example: str = "") -> Path:
    """``path`` as a file to (over)write: not a folder, and its folder writable (created if needed).
    ``example``: a file name to suggest when ``path`` is a folder."""
    if not str(path):
        raise ConfigError(f"{key} is empty: name an output file")
    target = Path(path)
    if target.is_dir():
        hint = f", e.g. {target / example}" if example else ""
        raise ConfigError(f"{key}={str(path)!r} is a folder: give a file name{hint}")
    why = _unusable(target.parent)
    if why:
        raise ConfigError(f"{key}={str(path)!r}: its folder {target.parent} is unusable ({why}); choose another {key}")
    return target


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` goes to first: hidden, in the same folder (same file system, so the
    rename is atomic), marked with the writer's pid so that a later start can tell its own leftovers."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield the temporary path to write ``path`` through; on success it is renamed to ``path``. On any failure
    the temporary file is removed; a failure for lack of space is a :class:`DiskFullError` naming the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(path, what) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path, what) as tmp:
        tmp.write_text(text)
    return Path(path)


class SpaceSafeFile:
    """The binary file under an ``h5py.File`` being written: a failed write is recorded, not passed to HDF5.

    HDF5 whose write failed (a full disk) cannot close the file any more and crashes the interpreter (a
    segmentation fault after "Driver write request failed ... errno = 28"); this file answers every write as done
    once one failed, so the file still closes cleanly, and keeps the first error in ``error``:
    :func:`new_hdf5` then removes the file and raises. About 5 % slower than HDF5's own writer (200 MB: 1.12 s
    against 1.07 s).
    """

    def __init__(self, path: Path):
        self.raw = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed by close())
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # an unbuffered write may be short
                    done += self.raw.write(view[done:])
            except OSError as err:
                self.error = err
        return len(view)

    def truncate(self, size: int | None = None) -> int | None:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as err:
                self.error = err
        return size

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        pass  # unbuffered

    def check(self) -> None:
        """Raise the recorded write error, if any (between batches: stop computing once the disk is full)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.raw.close()


@contextlib.contextmanager
def new_hdf5(tmp: Path, final: Path, what: str, **options):
    """``(handle, sink)``: a new HDF5 file written at the temporary ``tmp`` on its way to ``final`` (the caller
    renames it); ``options`` go to ``h5py.File`` (e.g. ``libver``).

    On any error (or Ctrl-C) ``tmp`` is removed; a full disk ends in :class:`DiskFullError` naming the disk and
    ``final``. ``sink.check()`` raises a write error as soon as HDF5 has met it.
    """
    import h5py

    sink = SpaceSafeFile(tmp)
    try:
        try:
            with h5py.File(sink, "w", **options) as handle:
                yield handle, sink
        finally:
            sink.close()
        sink.check()  # a failure in the last writes, at close
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failed = sink.error if sink.error is not None else err
        if isinstance(failed, OSError) and is_no_space(failed):
            raise DiskFullError(Path(final).absolute(), what) from None
        raise


#: Files that mark a folder as the output of one kind of run (pretraining's run directory, an evaluation's out).
RUN_MARKERS = {
    "pretraining": ("checkpoints", "metrics.jsonl", "pretrain.lock", "encoder.pt"),
    "evaluation": ("metrics.json", "predictions.h5", "eval.lock", "metrics.prior_only.json"),
}


def refuse_other_runs(folder: str | os.PathLike, kind: str, key: str) -> None:
    """ConfigError when ``folder`` holds the output of another kind of run than ``kind`` (:data:`RUN_MARKERS`):
    an evaluation writing its config.yaml into a pretraining run directory (or the reverse) would mix two runs."""
    folder = Path(folder)
    for other, markers in RUN_MARKERS.items():
        found = [name for name in markers if other != kind and (folder / name).exists()]
        if found:
            article = "an" if other[0] in "aeiou" else "a"
            raise ConfigError(f"{key}={str(folder)!r} holds {article} {other} run ({', '.join(found)}): writing {kind} "
                              f"outputs there would overwrite its config.yaml and mix the two; choose another {key}")
