"""``sslsky verify DATA``: check a packed folder fully, shard by shard.

    problems = verify_pack("packed")      # [(file, what is wrong)], empty when all is whole
    status = run_verify("packed")         # prints one line per damaged file and a summary; 0 whole, 2 damaged

What is checked (the readers in :mod:`sslsky.data.shards` check the cheap part
of this on every open and read; this checks all of it):

- ``manifest.json`` parses and lists shards; its per-band statistics are
  there, finite, with sigma_mad > 0, one per band; its ``counts`` are there
  and ``counts.packed`` equals the rows of the listed shards;
- no file named like a shard is on disk without being listed (stray: a
  removed entry would otherwise drop its rows without a word);
- every shard is present, its manifest entry has a sha256 and a row count,
  its size and full-file sha256 match the manifest, it opens as HDF5, has the
  pack key attribute, and its row count matches;
- every chunk of every dataset reads (HDF5 verifies each chunk's Fletcher32
  checksum on the way, where the shard has them), every image matches its
  per-row checksum (``image_sum32``), and the per-row columns have one value
  per image.

Something the manifest lacks is damage too: what is not recorded cannot be
checked, and the summary of a whole pack says what was (sha256 of 4/4 shards,
...). Readers make the manifest checks (:func:`check_manifest`) on every open.

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

from sslsky.data.schema import IMAGE_SUM_DATASET, IMAGES_DATASET, MANIFEST_NAME, PACK_KEY_ATTR, SHARD_GLOB
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
    if "filter returned failure" in why:  # HDF5's own words for a chunk failing its Fletcher32 checksum
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a whole file, read in 4 MiB blocks (a shard's identity in the manifest, a checkpoint's in an
    evaluation's metrics.json: the same path may hold a retrained encoder)."""
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


def check_shard(path: Path, entry: dict | None = None, checked: dict | None = None) -> list[str]:
    """What is wrong with one shard (empty when whole): against its manifest ``entry`` (``size_bytes``, ``sha256``,
    ``rows``) when given, then every chunk of every dataset. ``checked``: counts of the checks made
    (``size``, ``sha256``, ``image_sum32``), incremented."""
    path = Path(path)
    entry = entry or {}
    checked = {} if checked is None else checked
    if not path.is_file():
        return ["missing"]
    problems = []
    size = os.path.getsize(path)
    if entry.get("size_bytes") is not None:
        checked["size"] = checked.get("size", 0) + 1
        if size != int(entry["size_bytes"]):
            problems.append(f"size {size} bytes, the manifest says {int(entry['size_bytes'])} "
                            f"(truncated or overwritten)")
    if entry.get("sha256"):
        checked["sha256"] = checked.get("sha256", 0) + 1
        if file_sha256(path) != entry["sha256"]:
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
            if sums is not None:
                checked["image_sum32"] = checked.get("image_sum32", 0) + 1
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


def stats_problems(stats, bands=None) -> list[str]:
    """What is wrong with a manifest's per-band ``stats`` (empty when usable): missing, not finite, sigma_mad not
    > 0, or another number of bands than the pack has."""
    if not isinstance(stats, dict):
        return ["has no per-band statistics (stats)" if stats is None else f"stats is not a table ({stats!r})"]
    problems = []
    sizes = {}
    for key in ("median", "sigma_mad"):
        raw = stats.get(key)
        try:
            values = np.asarray(raw if raw is not None else [], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            values = np.full(1, np.nan)
        sizes[key] = values.size
        if values.size == 0:
            problems.append(f"stats.{key} is missing")
        elif not np.isfinite(values).all():
            problems.append(f"stats.{key} is not finite ({raw})")
        elif key == "sigma_mad" and not (values > 0).all():
            problems.append(f"stats.sigma_mad must be > 0 in every band, got {values.tolist()}")
    n_bands = len(bands) if isinstance(bands, (str, list)) and bands else None
    for key, size in sizes.items():
        if size and n_bands is not None and size != n_bands:
            problems.append(f"stats.{key} has {size} values for the {n_bands} bands {''.join(map(str, bands))}")
    return problems


def counts_problems(manifest: dict, rows: list | None = None) -> list[str]:
    """What is wrong with a manifest's ``counts`` (empty when all is well): missing, or, given the ``rows`` of each
    listed shard, a total other than ``counts.packed`` (a shard entry removed or added). A None among ``rows``
    (bare names of older manifests) leaves the total uncompared."""
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not isinstance(counts.get("packed"), int):
        return [f"has no row count (counts.packed; counts = {counts!r})"]
    problems = []
    rows = rows if rows is not None else [None]
    if all(isinstance(n, (int, np.integer)) for n in rows) and sum(rows) != counts["packed"]:
        problems.append(f"its {len(rows)} listed shard(s) hold {sum(rows)} rows but counts.packed says "
                        f"{counts['packed']} (a shard entry was removed or added)")
    total, rejected = counts.get("input_rows"), counts.get("rejected")
    if isinstance(total, int) and isinstance(rejected, int) and counts["packed"] + rejected != total:
        problems.append(f"counts.packed {counts['packed']} + counts.rejected {rejected} != counts.input_rows {total}")
    return problems


def check_manifest(folder: str | os.PathLike, manifest: dict, rows: list | None = None) -> None:
    """The cheap checks every reader makes when it opens a packed folder: the per-band statistics are usable and
    the counts are there (and, given the ``rows`` of each listed shard, agree with them). DataError naming
    ``manifest.json`` and the fix otherwise."""
    problems = stats_problems(manifest.get("stats"), manifest.get("bands")) + counts_problems(manifest, rows)
    if problems:
        raise DataError(f"{Path(folder) / MANIFEST_NAME} is damaged: {'; '.join(problems)}; {repack_hint(folder)}")


def stray_shards(folder: Path, entries: list[tuple[Path, dict]]) -> list[Path]:
    """Files named like shards in ``folder`` that the manifest does not list."""
    listed = {path.name for path, _ in entries}
    return [path for path in sorted(folder.glob(SHARD_GLOB)) if path.name not in listed]


def verify_pack(source: str | os.PathLike, checked: dict | None = None) -> list[tuple[Path, str]]:
    """Every problem of a packed folder (or of one shard file), as (file, what is wrong); empty when all is whole.

    Besides each shard's own checks (:func:`check_shard`), a folder is damaged when its manifest lacks what the
    checks need (a shard entry's ``sha256`` or ``rows``, ``counts``, ``stats``), when its counts disagree with its
    shard list, and when a file named like a shard is on disk but not in the manifest (stray). ``checked``, when
    given, is filled with how many shards had each check: ``shards``, ``size``, ``sha256``, ``image_sum32``.
    """
    source = Path(source)
    tally = {"shards": 0, "size": 0, "sha256": 0, "image_sum32": 0} if checked is None else checked
    for key in ("shards", "size", "sha256", "image_sum32"):
        tally.setdefault(key, 0)
    if source.is_file():
        tally["shards"] += 1
        return [(source, what) for what in check_shard(source, checked=tally)]
    if not source.is_dir():
        return [(source, "does not exist")]
    try:
        manifest = load_manifest(source)
        entries = manifest_entries(source, manifest)
    except DataError as err:
        return [(source / MANIFEST_NAME, str(err))]
    where = source / MANIFEST_NAME
    problems = [(where, what) for what in stats_problems(manifest.get("stats"), manifest.get("bands"))]
    problems += [(where, what) for what in counts_problems(manifest, [entry.get("rows") for _, entry in entries])]
    if not entries:
        problems.append((where, "lists no shards"))
    for path in stray_shards(source, entries):
        problems.append((path, f"on disk but not listed in {MANIFEST_NAME} (stray: its entry was removed, or "
                               f"another pack left it); its rows are not read"))
    for path, entry in entries:
        tally["shards"] += 1
        found = check_shard(path, entry, checked=tally)
        missing = [key for key in ("sha256", "rows") if not entry.get(key)]
        if missing and found != ["missing"]:
            found = [f"its manifest entry has no {' and no '.join(missing)}, so its content cannot be checked "
                     f"against what `sslsky pack` wrote"] + found
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
    if source.is_dir() and not (source / MANIFEST_NAME).exists() and not any(source.glob(SHARD_GLOB)):
        print(f"sslsky verify: {source} is not a pack (no {MANIFEST_NAME}, no shards); make one with `sslsky pack "
              f"--catalog CAT --out {source}`", file=sys.stderr, flush=True)
        return 2
    checked: dict = {}
    problems = verify_pack(source, checked)
    for path, what in problems:
        print(f"sslsky verify: DAMAGED {path}: {what}", file=sys.stderr, flush=True)
    if problems:
        damaged = len({path for path, _ in problems})
        folder = source.parent if source.is_file() else source
        print(f"sslsky verify: {damaged} damaged file(s) in {source}. Fix: run `sslsky pack` again with the same "
              f"--catalog and --out {folder} (and the same options); it rewrites exactly the damaged shards and the "
              f"manifest", file=sys.stderr, flush=True)
        return 2
    if source.is_file():
        print(f"sslsky verify: {source}: whole (every chunk read)", file=stream, flush=True)
        return 0
    manifest = load_manifest(source)
    rows = sum(int(entry.get("rows", 0)) for _, entry in manifest_entries(source, manifest))
    n = checked["shards"]
    done = [f"sha256 of {checked['sha256']}/{n}", f"sizes of {checked['size']}/{n}",
            f"per-image checksums of {checked['image_sum32']}/{n}", "every chunk", "row counts against counts",
            "no stray shards", "statistics"]
    print(f"sslsky verify: {source}: {len(manifest['shards'])} shard(s), {rows} rows, all whole "
          f"(checked: {', '.join(done)})", file=stream, flush=True)
    return 0
