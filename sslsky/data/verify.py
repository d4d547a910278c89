"""``sslsky verify DATA``: check a packed folder fully, shard by shard.

    problems = verify_pack("packed")      # [(file, what is wrong)], empty when all is whole
    status = run_verify("packed")         # prints one line per damaged file and a summary; 0 whole, 2 damaged

What is checked (the readers in :mod:`sslsky.data.shards` check the cheap part
of this on every open and read; this checks all of it):

- ``manifest.json`` parses and lists shards; its per-band statistics are
  finite with sigma_mad > 0;
- every shard is present, its size and full-file sha256 match the manifest,
  it opens as HDF5, has the pack key attribute, and its row count matches;
- every chunk of every dataset reads (HDF5 verifies each chunk's Fletcher32
  checksum on the way, where the shard has them), every image matches its
  per-row checksum (``image_sum32``), and the per-row columns have one value
  per image.

``sslsky pack`` uses :func:`check_shard` before it adopts a shard a previous
run finished, so a re-run rewrites exactly the damaged shards. The helpers
the readers share (:func:`load_manifest`, :func:`open_shard`,
:func:`read_error`, ...) live here too, without torch, so that ``sslsky
pack`` and ``sslsky verify`` start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np

from sslsky.data.schema import IMAGE_SUM_DATASET, IMAGES_DATASET, MANIFEST_NAME, PACK_KEY_ATTR
from sslsky.errors import DataError


class MissingDataError(DataError, FileNotFoundError):
    """A manifest or shard that is not there (also a ``FileNotFoundError``, as callers have caught before)."""


def repack_hint(folder: str | os.PathLike | None = None) -> str:
    """The fix for a damaged pack, as every message says it."""
    where = f" {folder}" if folder else " DATA"
    return (f"run `sslsky pack` again with the same --catalog and --out (it rewrites exactly the damaged shards); "
            f"`sslsky verify{where}` lists every damaged shard")


def load_manifest(folder: str | os.PathLike) -> dict:
    """``folder/manifest.json`` as a dict with a ``shards`` list; DataError naming the file when it is missing,
    truncated or not JSON."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise MissingDataError(f"{folder}: no {MANIFEST_NAME}; pack cutouts first with "
                               f"`sslsky pack --catalog CAT --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} cannot be read as JSON ({err}): truncated or damaged; run `sslsky pack` again "
                        f"with the same --catalog and --out to write it again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{path} is not an sslsky manifest (no list of shards); run `sslsky pack` again with the "
                        f"same --catalog and --out to write it again")
    return manifest


def open_shard(path: Path, folder: str | os.PathLike | None = None) -> h5py.File:
    """``h5py.File(path, "r")``; DataError naming the file when it is missing or not a readable HDF5 file."""
    if not path.is_file():
        raise MissingDataError(f"shard {path} in the manifest is missing; {repack_hint(folder)}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"shard {path} is not a readable HDF5 file (truncated or damaged: {err}); "
                        f"{repack_hint(folder)}") from None


def read_error(path: Path, row: int | None, err: BaseException | str, folder=None) -> DataError:
    """The DataError for a failed read of ``path`` (at ``row``): names the file, the row and the fix."""
    where = f"shard {path}" + (f", row {row}" if row is not None else "")
    why = str(err)
    if "filter returned failure" in why or "checksum" in why.lower():
        why = f"Fletcher32 checksum mismatch: {why}"
    return DataError(f"{where}: cannot be read, the file is damaged ({why}); {repack_hint(folder)}")


def row_sum32(image: np.ndarray) -> int:
    """Checksum of one stored image: the wrapping (mod 2**32) sum of its bytes read as little-endian uint32 words,
    the last word zero-padded.

    About 5-7 microseconds for a 5x107x107 float32 image: 12-21% of the rate of the bare read loops of
    benchmarks/bench_loader.py (page cache, no augmentation), where HDF5's Fletcher32 on the images costs
    40-50% (it takes longer than the read itself). It catches what damages a
    stored chunk: random bytes or zeros over it (missed with odds 2**-32), any single changed bit. A moved block
    inside one chunk it does not catch; ``sslsky verify`` does (sha256).
    """
    data = np.ascontiguousarray(image).reshape(-1).view(np.uint8)
    whole = len(data) // 4 * 4
    total = int(np.add.reduce(data[:whole].view("<u4"), dtype=np.uint32)) if whole else 0
    if whole < len(data):
        total += int.from_bytes(data[whole:].tobytes(), "little")
    return total & 0xFFFFFFFF


def manifest_entries(root: Path, manifest: dict) -> list[tuple[Path, dict]]:
    """(path, manifest entry) of each shard; a bare name (older manifests) gets an empty entry."""
    out = []
    for entry in manifest["shards"]:
        if isinstance(entry, str):
            out.append((root / entry, {}))
            continue
        name = entry.get("path") or entry.get("file") or entry.get("name") if isinstance(entry, dict) else None
        if not name:
            raise DataError(f"{root / MANIFEST_NAME}: a shard entry without a path ({entry!r}); "
                            f"{repack_hint(root)}")
        out.append((root / name, entry))
    return out


#: Images read per block while verifying (a failing block is re-read row by row to name the rows).
BLOCK_ROWS = 64
#: Problems named per shard before the rest are counted.
MAX_LISTED = 4


def file_sha256(path: Path) -> str:
    """Hex sha256 of a whole file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_problems(images: h5py.Dataset, sums: np.ndarray | None) -> list[str]:
    """Rows of the image dataset that cannot be read (Fletcher32 mismatch) or differ from their checksum."""
    problems = []
    n = images.shape[0]
    if sums is not None and len(sums) != n:
        return [f"{IMAGE_SUM_DATASET!r} has {len(sums)} rows, the images {n}"]
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        try:
            block = images[start:stop]
        except OSError:
            block = None
        for row in range(start, stop):
            if block is None:
                try:
                    image = images[row]
                except OSError as err:
                    problems.append(f"row {row} cannot be read ({_why(err)})")
                    continue
            else:
                image = block[row - start]
            if sums is not None and row_sum32(image) != int(sums[row]):
                problems.append(f"row {row} differs from its checksum ({IMAGE_SUM_DATASET})")
    return problems


def _why(err: BaseException) -> str:
    text = str(err)
    return f"Fletcher32 checksum mismatch: {text}" if "filter returned failure" in text else text


def check_shard(path: Path, entry: dict | None = None) -> list[str]:
    """What is wrong with one shard (empty when whole): against its manifest ``entry`` (``size_bytes``, ``sha256``,
    ``rows``) when given, then every chunk of every dataset."""
    path = Path(path)
    entry = entry or {}
    if not path.is_file():
        return ["missing"]
    problems = []
    size = os.path.getsize(path)
    if entry.get("size_bytes") is not None and size != int(entry["size_bytes"]):
        problems.append(f"size {size} bytes, the manifest says {int(entry['size_bytes'])} (truncated or overwritten)")
    if entry.get("sha256") and file_sha256(path) != entry["sha256"]:
        problems.append("sha256 differs from the manifest (the content changed)")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        return problems + [f"not a readable HDF5 file ({err})"]
    with handle:
        try:
            if PACK_KEY_ATTR not in handle.attrs:
                problems.append(f"no {PACK_KEY_ATTR!r} attribute (not a shard finished by `sslsky pack`)")
            if IMAGES_DATASET not in handle:
                return problems + [f"no {IMAGES_DATASET!r} dataset"]
            images = handle[IMAGES_DATASET]
            n = images.shape[0]
            if entry.get("rows") is not None and int(entry["rows"]) != n:
                problems.append(f"{n} rows, the manifest says {int(entry['rows'])}")
            sums = handle[IMAGE_SUM_DATASET][()] if IMAGE_SUM_DATASET in handle else None
            problems += _image_problems(images, sums)
            for name, dataset in handle.items():
                if name == IMAGES_DATASET or not isinstance(dataset, h5py.Dataset):
                    continue
                try:
                    values = dataset[()]
                except OSError as err:
                    problems.append(f"dataset {name!r} cannot be read ({_why(err)})")
                    continue
                if np.ndim(values) and len(values) != n:
                    problems.append(f"dataset {name!r} has {len(values)} rows, the images {n}")
        except (OSError, KeyError, RuntimeError) as err:  # damaged metadata
            problems.append(f"cannot be read ({_why(err)})")
    if len(problems) > MAX_LISTED:
        problems = problems[:MAX_LISTED] + [f"and {len(problems) - MAX_LISTED} more problem(s)"]
    return problems


def _stats_problems(stats) -> list[str]:
    if stats is None:
        return []
    problems = []
    for key in ("median", "sigma_mad"):
        values = np.asarray(stats.get(key) or [], dtype=np.float64) if isinstance(stats, dict) else np.zeros(0)
        if values.size == 0 or not np.isfinite(values).all():
            problems.append(f"stats.{key} is not finite ({stats.get(key) if isinstance(stats, dict) else stats})")
        elif key == "sigma_mad" and not (values > 0).all():
            problems.append(f"stats.sigma_mad must be > 0 in every band, got {values.tolist()}")
    return problems


def verify_pack(source: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every problem of a packed folder (or of one shard file), as (file, what is wrong); empty when all is whole."""
    source = Path(source)
    if source.is_file():
        return [(source, what) for what in check_shard(source)]
    if not source.is_dir():
        return [(source, "does not exist")]
    try:
        manifest = load_manifest(source)
        entries = manifest_entries(source, manifest)
    except DataError as err:
        return [(source / MANIFEST_NAME, str(err))]
    problems = [(source / MANIFEST_NAME, what) for what in _stats_problems(manifest.get("stats"))]
    if not entries:
        problems.append((source / MANIFEST_NAME, "lists no shards"))
    for path, entry in entries:
        found = check_shard(path, entry)
        if found:
            problems.append((path, "; ".join(found)))
    return problems


def run_verify(source: str | os.PathLike, stream=None) -> int:
    """Check ``source`` fully and print the result: one line per damaged file, then a summary. 0 whole, 2 damaged."""
    stream = stream or sys.stdout
    source = Path(source)
    if not source.exists():
        print(f"sslsky verify: {source} does not exist; give a folder written by `sslsky pack` (with "
              f"{MANIFEST_NAME}) or one shard file", file=sys.stderr, flush=True)
        return 2
    problems = verify_pack(source)
    for path, what in problems:
        print(f"sslsky verify: DAMAGED {path}: {what}", file=sys.stderr, flush=True)
    if problems:
        damaged = len({path for path, _ in problems})
        print(f"sslsky verify: {damaged} damaged file(s) in {source}. Fix: run `sslsky pack` again with the same "
              f"--catalog and --out {source} (and the same options); it rewrites exactly the damaged shards and the "
              f"manifest", file=sys.stderr, flush=True)
        return 2
    if source.is_file():
        print(f"sslsky verify: {source}: whole (every chunk read)", file=stream, flush=True)
        return 0
    manifest = load_manifest(source)
    rows = sum(int(entry.get("rows", 0)) for _, entry in manifest_entries(source, manifest))
    print(f"sslsky verify: {source}: {len(manifest['shards'])} shard(s), {rows} rows, all whole "
          f"(sizes, sha256, every chunk, statistics checked)", file=stream, flush=True)
    return 0
