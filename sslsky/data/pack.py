"""``sslsky pack``: cutouts listed in a catalog -> HDF5 shards + ``manifest.json`` (MPI-aware).

    sslsky pack --catalog mock_sdss/catalog.fits --out packed --shard-size 1024
    mpirun -n 8 sslsky pack --catalog mock_sdss/catalog.fits --out packed dtype=float16

Steps:

1. Every rank reads and checks the catalog (:mod:`sslsky.data.catalog`): a
   missing column stops here, before any work (exit status 2). Rows with an
   empty required value or a repeated object_id are listed, not packed.
2. Rank 0 reads the first readable cutout to fix the layout of the pack
   (survey, bands, pixel scale, image shape, photometric or colour) and
   shares it, so every rank checks cutouts against the same layout.
3. The packable rows are split into one contiguous block per rank
   (:func:`sslsky.parallel.split_evenly`); each rank writes its block as
   shards of ``shard_size`` rows with plain h5py, each under a temporary
   name then ``os.replace``'d, so a file named like a shard is always whole.
   HDF5 writes through a Python file object (:func:`sslsky.outputs.new_hdf5`): a full
   disk is a :class:`~sslsky.errors.DiskFullError` naming the disk (exit
   status 2) with the partial file removed, not HDF5's crash; the same holds
   for ``manifest.json``, ``rejected.csv`` and ``config.yaml``. ``--out``
   is checked before any work (a file, a read-only file system: a message),
   and start-up removes the temporary files of packs that died, saying how
   many (:func:`remove_stale_temps`).
   A cutout that cannot be packed (:class:`~sslsky.data.fits_io.CutoutError`)
   is listed and left out; the run goes on.
4. A shard stores in its attributes a key over its catalog rows and the
   config fields that change its content; a re-run skips shards whose key
   matches and whose content verifies (resume after a crash or a SIGKILL):
   the previous manifest's size and sha256 when it lists the shard with the
   same key, every chunk read back (HDF5 checks the Fletcher32 checksums)
   and every image against its checksum
   (:func:`sslsky.data.verify.check_shard`). Any other shard is rewritten,
   a damaged one with a message saying so.
   Every image has a checksum in the ``image_sum32`` column (checked by
   readers on every read: cheap), every per-row column a Fletcher32 filter
   (checked by HDF5 when it is read, once per open), the file's metadata
   HDF5's own checksums, and the manifest records each shard's size and
   sha256 (DESIGN.md, Integrity). Fletcher32 on the images themselves
   (``IMAGE_FLETCHER32``) is off: it costs 40-50% of the rate of reading
   cutouts from the page cache (benchmarks/bench_loader.py).
5. Rank 0 gathers shard lists, rejections, a pixel sample for the per-band
   statistics (the same cutouts for any number of ranks) and the float16
   error, and writes ``manifest.json``, ``rejected.csv`` and ``config.yaml``
   atomically. The statistics come from finite pixels only; a band whose
   median or sigma_mad is not finite, or whose sigma_mad is not > 0, is a
   :class:`~sslsky.errors.DataError` and no manifest is written.

Exit status: 0 when every row was packed, 3 when some were rejected (listed
in ``OUT/rejected.csv``), 2 for a config or catalog error.

Testing hook: the environment variable ``SSLSKY_PACK_SLEEP_PER_CUTOUT``
(seconds, default 0) makes every cutout take that much longer, so a test
can kill a pack half-way. It changes nothing that is written.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import sslsky
from sslsky.config import ConfigError, PackConfig, check_values, config_to_dict, write_config
from sslsky.data.catalog import Catalog, read_catalog
from sslsky.data.fits_io import CutoutError, check_cutout, check_float16, read_cutout, read_legacy_image
from sslsky.data.ids import write_ids
from sslsky.data.resample import noise_factor, pixel_scale_after, resample_flux, resize_rgb
from sslsky.data.schema import (
    BAND_PLACEHOLDER,
    CATALOG_ROW_COLUMN,
    IMAGE_SUM_DATASET,
    IMAGES_DATASET,
    MANIFEST_NAME,
    PACK_KEY_ATTR,
    PACK_REJECTED_ATTR,
    PER_BAND_COLUMNS,
    REJECTED_FIELDS,
    REJECTED_NAME,
    RGB_BANDS,
    SCHEMA_VERSION,
    SHARD_COLUMNS,
    SHARD_GLOB,
    SHARD_PATTERN,
    VOTES_COLUMNS_ATTR,
    VOTES_DATASET,
)
from sslsky.data.verify import check_shard, file_sha256, row_sum32
from sslsky.errors import DataError, DiskFullError, is_no_space
from sslsky.locks import OutputLock, lock_next_to, pid_alive
from sslsky.outputs import new_hdf5, output_dir, temp_path, write_text_atomic
from sslsky.parallel import get_comm, split_evenly
from sslsky.surveys import SURVEYS, get_survey

#: Testing hook (see the module docstring): seconds slept per cutout.
SLEEP_ENV = "SSLSKY_PACK_SLEEP_PER_CUTOUT"
#: Cutouts, spread over the catalog, whose most common layout becomes the pack's layout.
PROBE_SAMPLE = 25
#: Rows tried in order when none of that sample can be read, before giving up with an error.
PROBE_TRIES = 100
#: Pixels per band taken (evenly strided) from each sampled cutout for the statistics.
STATS_PIXELS_PER_BAND = 256
#: Seed of the choice of cutouts for the statistics: a fixed sample, whatever the ranks.
STATS_SEED = 20210401
#: Smallest normal float16; the relative error is reported over |x| >= this.
FLOAT16_TINY = float(np.finfo(np.float16).smallest_normal)
#: Smallest image_size worth training on (the encoders' stems and crops need room).
MIN_IMAGE_SIZE = 16
#: Checksums of a shard, part of the shard key: a per-row image checksum, Fletcher32 on the per-row columns.
CHECKSUM = "image_sum32+fletcher32-columns"
#: Fletcher32 on the image chunks too (HDF5 then checks each read): off, since it costs more than the read from
#: the page cache; benchmarks/bench_loader.py sets it to measure that.
IMAGE_FLETCHER32 = False
#: Oldest HDF5 file format the shards use: 1.8's object headers carry checksums of their own metadata.
SHARD_LIBVER = ("v108", "latest")


@dataclass
class Layout:
    """What every cutout of a pack must look like; fixed by rank 0 from the first readable cutout."""

    kind: str  # "fits" (cube), "bands" (one file per band), "rgb" (PNG/JPEG), "legacy" (ssl-sky-surveys HDF5)
    survey: str  # "" when unknown
    bands: str  # "ugriz", "grz", "RGB", ...
    pixel_scale: float | None  # arcsec / pixel of the stored images
    shape: tuple[int, int, int]  # (C, H, W) stored
    photometric: bool  # False for 8-bit colour images: flux-based augmentations must refuse them
    source_size: int = 0  # H = W of the inputs (resampled to shape when they differ); 0: any (colour, image_size=N)
    dtype: str = "float32"  # stored image dtype (PackConfig.dtype resolved)

    @property
    def resampled(self) -> bool:
        return self.source_size != self.shape[1]

    @property
    def noise_scale(self) -> float:
        """Sky sigma per stored pixel / per input pixel (1 unless fluxes were resampled)."""
        if not self.photometric or not self.source_size or not self.resampled:
            return 1.0
        return noise_factor(self.source_size, self.shape[1])


# ---------------------------------------------------------------------------
# Set-up: config checks and the layout probe.
# ---------------------------------------------------------------------------


def check_config(cfg: PackConfig) -> None:
    """Raise :class:`ConfigError` for a config that cannot work."""
    if not cfg.catalog:
        raise ConfigError("no catalog given; pass --catalog CAT (FITS, CSV, ECSV or ssl-sky-surveys HDF5)")
    if not cfg.out:
        raise ConfigError("no output folder given; pass --out DIR")
    problems = check_values(cfg)  # dtype, shard_size, ...: the ranges of PackConfig, for a config built in code too
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.image_size < 0 or 0 < cfg.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size={cfg.image_size} must be 0 (keep the cutouts' size) or at least "
                          f"{MIN_IMAGE_SIZE}")
    if cfg.survey:
        try:
            get_survey(cfg.survey)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.dtype == "float16" and abs(cfg.fill_value) > np.finfo(np.float16).max:
        raise ConfigError(f"fill_value={cfg.fill_value} does not fit in float16")
    output_dir(cfg.out, "--out", create=False)  # a file, a read-only file system: a message before any work
    foreign = foreign_files(Path(cfg.out))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"--out={cfg.out!r} holds files that are not a pack ({listed}): a pack folder holds the "
                          f"pack and nothing else, and packing there would replace or delete them; choose an empty "
                          f"or new --out (or the folder of an earlier pack)")


#: What a pack folder may hold besides its shards: everything else means --out names someone else's folder.
PACK_FILES = (MANIFEST_NAME, REJECTED_NAME, "config.yaml")


def foreign_files(out: Path) -> list[str]:
    """Names in ``out`` that no pack writes (shards, manifest, rejected.csv, config.yaml, their hidden temporary
    files); [] for a missing or empty folder or an earlier pack."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if not (fnmatch.fnmatch(p.name, SHARD_GLOB) or p.name in PACK_FILES or p.name.startswith(".")))


def _survey_of(bands: str, header_survey: str) -> str:
    """Survey named in the header, else the one whose bands are ``bands`` (in any order), else ""."""
    if header_survey.lower() in SURVEYS:
        return header_survey.lower()
    for name, survey in SURVEYS.items():
        if "".join(survey.bands) == bands:
            return name
    for name, survey in SURVEYS.items():  # the same bands in another order (BANDS='zrg'): reordered when packed
        if sorted(survey.bands) == sorted(bands) and len(set(bands)) == len(bands):
            return name
    return ""


def _stored_dtype(cfg: PackConfig, photometric: bool) -> str | None:
    """The image dtype of the shards, or None when ``cfg.dtype`` cannot hold these images."""
    if cfg.dtype == "auto":
        return "float32" if photometric else "uint8"
    if cfg.dtype == "uint8" and photometric:
        return None
    return cfg.dtype


def _pixel_scale(header_scale: float | None, survey_scale: float | None) -> float | None:
    """The survey's pixel scale unless the file says another (by more than 1%: a rebinned cutout)."""
    if header_scale is None or header_scale <= 0 or not np.isfinite(header_scale):
        return survey_scale
    if survey_scale is not None and abs(header_scale / survey_scale - 1.0) < 0.01:
        return survey_scale
    return round(float(header_scale), 5)  # from a WCS: rounded, so every cutout of a pack gives the same layout


def _layout_of(cutout, path: str, cfg: PackConfig) -> Layout | str:
    """The layout one cutout implies (with the config's survey and image size), or why it cannot say."""
    survey = get_survey(cfg.survey) if cfg.survey else None
    height, width = cutout.data.shape[1:]
    kind = "bands" if BAND_PLACEHOLDER in path else "rgb" if cutout.bands == RGB_BANDS else "fits"
    if kind == "rgb":
        # Colour renderings of any square size are resampled (Lanczos) to image_size; their scale is their own.
        # Without image_size every image must have the size of the pack (others are rejected, as the probe says).
        side = cfg.image_size or height
        return Layout(kind, survey.name if survey else "", RGB_BANDS, None, (3, side, side), False,
                      0 if cfg.image_size else height, _stored_dtype(cfg, False))
    name = survey.name if survey else _survey_of(cutout.bands, cutout.survey)
    known = SURVEYS.get(name)
    bands = "".join(known.bands) if known else cutout.bands
    if not bands:
        return f"cutout {path} has no BANDS keyword and no survey is configured; set survey=sdss or survey=decals"
    dtype = _stored_dtype(cfg, True)
    if dtype is None:
        return f"dtype=uint8 is for 8-bit colour images; {path} holds fluxes: use dtype=float32 or float16"
    # The input size: the survey's cutout size when image_size is not given, else what the files hold.
    source = height if cfg.image_size else (known.cutout_size if known else height)
    side = cfg.image_size or source
    scale = _pixel_scale(cutout.pixel_scale, known.pixel_scale if known else None)
    return Layout(kind, name, bands, pixel_scale_after(scale, source, side), (len(bands), side, side), True,
                  source, dtype)


def probe_layout(cat: Catalog, cfg: PackConfig) -> Layout | str:
    """The layout of the pack, or an error message when no cutout of those tried can be read.

    Reads up to PROBE_SAMPLE cutouts spread evenly over the catalog and keeps the most common
    layout (the earliest on a tie), so one odd cutout at the top cannot decide it; when none of
    them is readable, tries the first PROBE_TRIES rows in order.
    """
    survey = get_survey(cfg.survey) if cfg.survey else None
    if cat.legacy is not None:
        survey = survey or SURVEYS["sdss"]  # the original ssl-sky-surveys files are SDSS ugriz
        source = cat.legacy.shape[0]
        size = cfg.image_size or source
        dtype = _stored_dtype(cfg, True)
        if dtype is None:
            return "dtype=uint8 is for 8-bit colour images; an ssl-sky-surveys file holds fluxes"
        return Layout("legacy", survey.name, "".join(survey.bands), pixel_scale_after(survey.pixel_scale, source, size),
                      (cat.legacy.n_bands, size, size), True, source, dtype)
    template_bands = "".join((survey or SURVEYS["sdss"]).bands)  # SDSS is the one-file-per-band survey
    rows = cat.valid_rows
    spread = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), PROBE_SAMPLE)).astype(np.int64))
    layouts: dict[str, list] = {}  # layout as JSON -> [layout, count, first path, first size]
    failures: dict[int, str] = {}  # row -> problem
    for candidates in (rows[spread], rows[:PROBE_TRIES]):
        for row in candidates:
            path = cat.cutout_path(int(row))
            if int(row) in failures:
                continue
            try:
                cutout = read_cutout(path, template_bands)
            except CutoutError as err:
                failures[int(row)] = f"row {int(row)}: {err}"
                continue
            layout = _layout_of(cutout, path, cfg)
            if isinstance(layout, str):
                return layout
            entry = layouts.setdefault(json.dumps(asdict(layout)), [layout, 0, path, cutout.data.shape[1:]])
            entry[1] += 1
        if layouts:
            break
    if not layouts:
        listing = "\n  ".join(failures[row] for row in sorted(failures)[:5])
        return (f"none of the first {len(failures)} cutouts of {cat.path} could be read; paths in `file` are "
                f"relative to the catalog's folder ({cat.folder}). First problems:\n  {listing}")
    ranked = sorted(layouts.values(), key=lambda entry: -entry[1])  # stable: earliest first on a tie
    layout, count, path, (height, width) = ranked[0]
    if len(ranked) > 1:
        others = "; ".join(f"{e[1]} like {e[2]} ({e[0].bands}, {e[3][0]}x{e[3][1]})" for e in ranked[1:])
        print(f"sslsky pack: warning: sampled cutouts differ; packing the layout of {count} of them "
              f"({layout.bands}, {layout.shape[1]}x{layout.shape[2]}); others are rejected: {others}",
              file=sys.stderr)
    if layout.source_size and (height, width) != (layout.source_size, layout.source_size):
        print(f"sslsky pack: warning: sampled cutouts such as {path} are {height}x{width} but the pack "
              f"expects {layout.source_size}x{layout.source_size}; cutouts of another size are rejected. "
              f"Set image_size= (e.g. image_size={height}) to pack them at the size they have, or image_size=N "
              "to resample them to N x N.", file=sys.stderr)
    return layout


# ---------------------------------------------------------------------------
# One rank's work.
# ---------------------------------------------------------------------------


def stats_rows(valid_rows: np.ndarray, n_sample: int) -> np.ndarray:
    """(K,) sorted catalog rows sampled for the per-band statistics: the same for any number of ranks."""
    if n_sample >= len(valid_rows):
        return np.asarray(valid_rows, dtype=np.int64)
    rng = np.random.default_rng(STATS_SEED)
    return np.sort(rng.choice(np.asarray(valid_rows, dtype=np.int64), size=n_sample, replace=False))


def pixel_sample(image: np.ndarray) -> np.ndarray:
    """(C, P) float32: evenly strided pixels of a stored (C, H, W) image, for the statistics."""
    flat = np.asarray(image, dtype=np.float32).reshape(image.shape[0], -1)
    step = max(1, flat.shape[1] // STATS_PIXELS_PER_BAND)
    return flat[:, ::step]


def float16_errors(data: np.ndarray, stored: np.ndarray) -> tuple[float, float]:
    """(largest relative error over |x| >= float16 normal minimum, largest absolute error)."""
    exact = data.astype(np.float64)
    error = np.abs(stored.astype(np.float64) - exact)
    normal = np.abs(exact) >= FLOAT16_TINY
    relative = float((error[normal] / np.abs(exact[normal])).max()) if normal.any() else 0.0
    return relative, float(error.max()) if error.size else 0.0


def shard_key(cat: Catalog, rows: np.ndarray, layout: Layout, cfg: PackConfig) -> str:
    """Identity of a shard's work: its catalog rows and what they hold, the layout, the content config."""
    content = {
        "schema_version": SCHEMA_VERSION,
        "catalog_rows": cat.row_digest(rows),
        "layout": asdict(layout),
        "fill_value": cfg.fill_value,
        "max_bad_fraction": cfg.max_bad_fraction,
        "checksum": CHECKSUM + ("+fletcher32-images" if IMAGE_FLETCHER32 else ""),  # older shards are rewritten
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class CutoutSource:
    """Reads the cutout of a catalog row as (C, H, W) float32, per the layout."""

    def __init__(self, cat: Catalog, layout: Layout):
        self.cat, self.layout = cat, layout
        self._legacy = None
        if cat.legacy is not None:
            import h5py

            self._legacy = h5py.File(cat.legacy.path, "r")

    def read(self, row: int) -> tuple[np.ndarray, str]:
        """(data, bands the file declares or "") as the file holds it."""
        if self._legacy is not None:
            where = f"{self.cat.legacy.path}[{row}]"
            return read_legacy_image(self._legacy[IMAGES_DATASET], row, self.cat.legacy.channels_last, where), ""
        cutout = read_cutout(self.cat.cutout_path(row), self.layout.bands)
        return cutout.data, cutout.bands

    def source_shape(self) -> tuple[int, int] | None:
        """The (H, W) every input must have; None: any square size (colour images)."""
        side = self.layout.source_size
        return (side, side) if side else None

    def to_stored(self, data: np.ndarray) -> np.ndarray:
        """A checked input cutout resampled to the pack's size: Lanczos for colour images, flux-conserving else."""
        side = self.layout.shape[1]
        if data.shape[1:] == (side, side):
            return data
        return resize_rgb(data, side) if data.dtype == np.uint8 else resample_flux(data, side)

    def close(self) -> None:
        if self._legacy is not None:
            self._legacy.close()


@dataclass
class ShardResult:
    """What a rank reports about one shard."""

    entry: dict  # manifest entry: path, rows, sha256, rank, catalog_rows
    rejected: list  # [(row, object_id, file, reason)]
    samples: dict  # catalog row -> (C, P) float32 pixel sample
    float16_error: tuple[float, float]  # (relative, absolute)
    read: int  # cutouts read in this run (0 when the shard was skipped)
    skipped: bool


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shard_entry(path: Path, rows: int, key: str, rank: int, first_last: list[int]) -> dict:
    """The manifest entry of a finished shard: its rows, size, sha256 and key."""
    return {"path": path.name, "rows": int(rows), "size_bytes": path.stat().st_size, "sha256": file_sha256(path),
            "pack_key": key, "rank": rank, "catalog_rows": first_last}


def previous_entries(out: Path) -> dict[str, dict]:
    """Shard name -> entry of the manifest a previous pack left in ``out`` ({} when there is none or it is
    damaged: the shards are then checked by their checksums alone)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        return {entry["path"]: entry for entry in manifest["shards"] if isinstance(entry, dict) and "path" in entry}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _finished_shard(path: Path, key: str, rank: int, first_last: list[int], samples_wanted: set,
                    previous: dict | None = None) -> ShardResult | None:
    """The result of a shard a previous run finished with the same key and whose content verifies, else None
    (it is rewritten). ``previous``: the shard's entry in the previous manifest, checked (size, sha256, rows)
    when it was written with the same key."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            found = _attr_str(handle.attrs.get(PACK_KEY_ATTR, ""))
    except OSError as err:
        print(f"sslsky pack: rank {rank}: rewriting {path.name}: it is damaged (not a readable HDF5 file: {err})",
              file=sys.stderr)
        return None
    if found != key:
        print(f"sslsky pack: rank {rank}: rewriting {path.name}: it was made from other rows or config",
              file=sys.stderr)
        return None
    expected = previous if previous and previous.get("pack_key") == key else None
    problems = check_shard(path, expected)
    if problems:
        print(f"sslsky pack: rank {rank}: rewriting {path.name}: it is damaged ({'; '.join(problems)})",
              file=sys.stderr)
        return None
    try:
        with h5py.File(path, "r") as handle:
            rows = handle[CATALOG_ROW_COLUMN][()]
            images = handle[IMAGES_DATASET]
            samples = {int(r): pixel_sample(images[i]) for i, r in enumerate(rows) if int(r) in samples_wanted}
            rejected = [tuple(item) for item in json.loads(_attr_str(handle.attrs[PACK_REJECTED_ATTR]))]
            errors = (float(handle.attrs["float16_max_relative_error"]),
                      float(handle.attrs["float16_max_absolute_error"]))
            n = images.shape[0]
    except (OSError, KeyError, ValueError) as err:
        print(f"sslsky pack: rank {rank}: rewriting {path.name}: cannot read it back ({err})", file=sys.stderr)
        return None
    return ShardResult(_shard_entry(path, n, key, rank, first_last), rejected, samples, errors, 0, True)


def _write_shard(path: Path, rows: np.ndarray, key: str, cat: Catalog, layout: Layout, cfg: PackConfig,
                 source: CutoutSource, rank: int, samples_wanted: set, progress, sleep: float) -> ShardResult:
    import h5py

    channels, height, width = layout.shape
    dtype = np.dtype(layout.dtype)
    kept, filled, sums, rejected, samples = [], [], [], [], {}
    worst = (0.0, 0.0)
    tmp = temp_path(path)
    with new_hdf5(tmp, path, "shard", libver=SHARD_LIBVER) as (handle, sink):
        images = handle.create_dataset(IMAGES_DATASET, shape=(len(rows), channels, height, width),
                                       maxshape=(None, channels, height, width), chunks=(1, channels, height, width),
                                       dtype=dtype, fletcher32=IMAGE_FLETCHER32, track_times=False)
        memory_space = h5py.h5s.create_simple((channels, height, width))
        file_space = images.id.get_space()
        for row in rows:
            row = int(row)
            try:
                data, bands = source.read(row)
                data, n_filled = check_cutout(data, cat.cutout_path(row), layout.bands, bands, source.source_shape(),
                                              cfg.max_bad_fraction, cfg.fill_value, layout.dtype)
                data = source.to_stored(data)
                if dtype == np.float16 and layout.resampled:  # resampling sums fluxes: check the range again
                    check_float16(data, cat.cutout_path(row), f" after resampling to {height}x{width}")
                stored = np.ascontiguousarray(data, dtype=dtype)
            except CutoutError as err:
                rejected.append((row, cat.columns["object_id"][row].item(), str(cat.columns["file"][row]),
                                 err.reason))
            else:
                if dtype == np.float16:
                    errors = float16_errors(data, stored)
                    worst = (max(worst[0], errors[0]), max(worst[1], errors[1]))
                file_space.select_hyperslab((len(kept), 0, 0, 0), (1, channels, height, width))
                images.id.write(memory_space, file_space, stored)  # through the filters (Fletcher32 when on)
                sink.check()  # the disk is full: stop now, not after the whole shard
                sums.append(row_sum32(stored))
                if row in samples_wanted:
                    samples[row] = pixel_sample(stored)
                kept.append(row)
                filled.append(n_filled)
            if sleep:
                time.sleep(sleep)
            if progress is not None:
                progress.update(1)
        images.resize(len(kept), axis=0)
        kept_rows = np.asarray(kept, dtype=np.int64)
        for name, column_dtype in SHARD_COLUMNS.items():
            if name == CATALOG_ROW_COLUMN:
                values = kept_rows
            elif name == "filled_pixels":
                values = np.asarray(filled)
            elif name == "object_id":  # int64, or UTF-8 text for a catalog keyed by names
                write_ids(handle, name, cat.columns[name][kept_rows], track_times=False)
                continue
            else:
                values = cat.columns[name][kept_rows]
            handle.create_dataset(name, data=np.asarray(values, dtype=column_dtype), **_column_options(len(kept)))
        handle.create_dataset(IMAGE_SUM_DATASET, data=np.asarray(sums, dtype=np.uint32), **_column_options(len(kept)))
        if cat.votes is not None:
            votes = handle.create_dataset(VOTES_DATASET, data=cat.votes[kept_rows], **_column_options(len(kept)))
            votes.attrs[VOTES_COLUMNS_ATTR] = cat.votes_columns
        for name in PER_BAND_COLUMNS:
            matrix = cat.per_band_matrix(name, layout.bands)
            if matrix is not None:
                values = matrix[kept_rows] * (layout.noise_scale if name == "sky_sigma" else 1.0)  # per stored pixel
                handle.create_dataset(name, data=values.astype(np.float32), **_column_options(len(kept)))
        attrs = handle.attrs
        attrs["survey"] = layout.survey
        attrs["bands"] = layout.bands
        attrs["pixel_scale"] = float("nan") if layout.pixel_scale is None else float(layout.pixel_scale)
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["photometric"] = bool(layout.photometric)
        attrs["dtype"] = layout.dtype
        attrs["first_catalog_row"] = int(rows[0])
        attrs["last_catalog_row"] = int(rows[-1])
        attrs["float16_max_relative_error"] = worst[0]
        attrs["float16_max_absolute_error"] = worst[1]
        attrs[PACK_REJECTED_ATTR] = json.dumps(rejected)
        attrs[PACK_KEY_ATTR] = key  # written last: a shard with a key is complete
    os.replace(tmp, path)
    entry = _shard_entry(path, len(kept), key, rank, [int(rows[0]), int(rows[-1])])
    return ShardResult(entry, rejected, samples, worst, len(rows), False)


def _column_options(n: int) -> dict:
    """create_dataset options of a per-row column: one chunk, checksummed (an empty column cannot be chunked)."""
    return {"track_times": False, "fletcher32": True, "chunks": True} if n else {"track_times": False}


def pack_rank(cat: Catalog, layout: Layout, cfg: PackConfig, out: Path, rank: int, size: int) -> dict:
    """Write this rank's shards; return what rank 0 needs for the manifest."""
    start = time.perf_counter()
    mine = cat.valid_rows[split_evenly(len(cat.valid_rows), size, rank)]
    groups = [mine[i:i + cfg.shard_size] for i in range(0, len(mine), cfg.shard_size)]
    samples_wanted = set(stats_rows(cat.valid_rows, cfg.stats_sample).tolist())
    previous = previous_entries(out)
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    progress = None
    if rank == 0 and cfg.progress:
        from sslsky.progress import progress as progress_report

        progress = progress_report(len(mine), f"pack (rank 0 of {size})", "cutout", stream=sys.stderr)
    source = CutoutSource(cat, layout)
    results = []
    try:
        for index, rows in enumerate(groups):
            path = out / SHARD_PATTERN.format(rank=rank, index=index)
            key = shard_key(cat, rows, layout, cfg)
            result = _finished_shard(path, key, rank, [int(rows[0]), int(rows[-1])], samples_wanted,
                                     previous.get(path.name))
            if result is None:
                result = _write_shard(path, rows, key, cat, layout, cfg, source, rank, samples_wanted,
                                      progress, sleep)
            elif progress is not None:
                progress.update(len(rows))
            results.append(result)
    finally:
        source.close()
        if progress is not None:
            progress.close()
    return {
        "rank": rank,
        "shards": [r.entry for r in results],
        "rejected": [item for r in results for item in r.rejected],
        "samples": {row: pixels for r in results for row, pixels in r.samples.items()},
        "float16_error": (max([r.float16_error[0] for r in results], default=0.0),
                          max([r.float16_error[1] for r in results], default=0.0)),
        "read": sum(r.read for r in results),
        "skipped": sum(r.skipped for r in results),
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------
# Rank 0: manifest, rejected.csv, summary.
# ---------------------------------------------------------------------------


def band_statistics(samples: dict, bands: str) -> dict | None:
    """Per-band median, sigma from the MAD, 1st and 99th percentiles of the sampled pixels (finite ones only).

    DataError when a band's median or sigma is not finite or its sigma is not > 0: such statistics would make
    training divide by zero or by NaN, so they are never written to the manifest.
    """
    if not samples:
        return None
    pixels = np.concatenate([samples[row] for row in sorted(samples)], axis=1).astype(np.float64)  # (C, P)
    finite = np.isfinite(pixels)
    if not finite.all():
        print(f"sslsky pack: warning: {int((~finite).sum())} non-finite sampled pixel(s) left out of the per-band "
              f"statistics", file=sys.stderr)
    median, mad, p01, p99 = (np.full(len(pixels), np.nan) for _ in range(4))
    for b, (values, ok) in enumerate(zip(pixels, finite)):
        values = values[ok]
        if values.size:
            median[b] = np.median(values)
            mad[b] = np.median(np.abs(values - median[b]))
            p01[b], p99[b] = np.percentile(values, [1, 99])
    sigma = 1.4826 * mad
    bad = [f"{bands[b] if b < len(bands) else b}: median {median[b]:.6g}, sigma_mad {sigma[b]:.6g}"
           for b in range(len(pixels)) if not (np.isfinite(median[b]) and np.isfinite(sigma[b]) and sigma[b] > 0)]
    if bad:
        raise DataError(f"the per-band statistics of {len(samples)} sampled cutouts are unusable ({'; '.join(bad)}): "
                        f"sigma_mad must be finite and > 0 (it is 0 when more than half of a band's sampled pixels "
                        f"have one value, e.g. a flat black background). Check the cutouts, or sample more with "
                        f"stats_sample=; no manifest was written (the shards are kept and reused by the next run)")
    return {
        "bands": list(bands),
        "median": median.tolist(),
        "sigma_mad": sigma.tolist(),
        "p01": p01.tolist(),
        "p99": p99.tolist(),
        "n_cutouts": len(samples),
        "pixels_per_band": int(pixels.shape[1]),
    }


#: Temporary files a pack writes in its output folder: shards, manifest, rejected.csv, config, each at
#: :func:`sslsky.outputs.temp_path` (``.NAME.tmpPID``) before it is renamed into place.
TEMP_FILE = re.compile(r"^\.(shard-.*\.h5|" + "|".join(re.escape(name) for name in PACK_FILES) + r")\.tmp(\d+)$")


def remove_stale_temps(out: Path) -> list[str]:
    """Remove the temporary files of packs that died (killed, crashed) in ``out``; the names removed.

    A temp file of a process still running on this host is left alone (the output lock keeps two packs out of one
    folder; this is for a pid that is alive for another reason), and so are those of this process.
    """
    removed = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        match = TEMP_FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    return removed


def write_rejected(path: Path, rejected: list) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REJECTED_FIELDS)
    writer.writerows(sorted(rejected, key=lambda item: item[0]))
    write_text_atomic(path, buffer.getvalue(), "the list of rejected rows")


def shard_glob() -> str:
    """Glob matching every name SHARD_PATTERN can make."""
    return SHARD_GLOB


def finish(cat: Catalog, layout: Layout, cfg: PackConfig, out: Path, reports: list[dict], size: int,
           start: float) -> int:
    reports = sorted(reports, key=lambda r: r["rank"])  # rank blocks are in catalog order
    shards = [entry for r in reports for entry in r["shards"]]
    rejected = sorted(list(cat.rejected) + [tuple(item) for r in reports for item in r["rejected"]],
                      key=lambda item: item[0])
    samples = {row: pixels for r in reports for row, pixels in r["samples"].items()}
    packed = sum(entry["rows"] for entry in shards)
    if packed and not samples:  # readers refuse a manifest without statistics: say so now
        raise DataError(f"none of the {cfg.stats_sample} cutout(s) sampled for the per-band statistics could be "
                        f"packed (all rejected); sample more with stats_sample= (default 2000); no manifest was "
                        f"written (the shards are kept and reused by the next run)")
    f16 = None
    if layout.dtype == "float16":
        f16 = {
            "max_relative_error": max(r["float16_error"][0] for r in reports),
            "relative_over": f"|x| >= {FLOAT16_TINY:.6g} (float16 normal minimum)",
            "max_absolute_error": max(r["float16_error"][1] for r in reports),
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sslsky_version": sslsky.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "catalog": str(cat.path.resolve()),
        "survey": layout.survey,
        "bands": layout.bands,
        "pixel_scale": layout.pixel_scale,
        "photometric": layout.photometric,
        "image_shape": list(layout.shape),
        "source_size": layout.source_size,  # input H = W (0: colour images of any size, image_size=N), resampled
        "noise_scale": layout.noise_scale,  # per-pixel sky sigma of the stored images / of the inputs
        "dtype": layout.dtype,
        "id_column": cat.id_column,
        "label_column": cat.label_column,
        "label_names": {str(k): name for k, name in cat.label_names.items()},  # morph_class -> name
        "counts": {"input_rows": cat.n_rows, "packed": packed, "rejected": len(rejected)},
        "stats": band_statistics(samples, layout.bands),
        "float16_error": f16,
        "votes_columns": cat.votes_columns,
        "per_band_columns": [name for name in PER_BAND_COLUMNS if cat.per_band_matrix(name, layout.bands) is not None],
        "ranks": size,
        "shards": shards,
        "config": config_to_dict(cfg),
    }
    listed = {entry["path"] for entry in shards}
    stale = [path for path in sorted(out.glob(shard_glob())) if path.name not in listed]
    for path in stale:  # left by an earlier pack with other ranks or shard size
        path.unlink()
    write_rejected(out / REJECTED_NAME, rejected)
    try:
        write_config(cfg, out / "config.yaml")
    except OSError as err:
        temp_path(out / "config.yaml").unlink(missing_ok=True)
        if is_no_space(err):
            raise DiskFullError(out / "config.yaml", "the pack's config") from None
        raise
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n", "manifest")

    seconds = time.perf_counter() - start
    read = sum(r["read"] for r in reports)
    skipped = sum(r["skipped"] for r in reports)
    rate = read / seconds / size if seconds > 0 else 0.0
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} finished shard(s)")
    if stale:
        notes.append(f"removed {len(stale)} stale shard(s)")
    extra = f" ({', '.join(notes)})" if notes else ""
    print(f"sslsky pack: packed {packed} of {cat.n_rows} rows into {len(shards)} shard(s) in {out}{extra}; "
          f"rejected {len(rejected)}" + (f" (see {out / REJECTED_NAME})" if rejected else "")
          + f"; {seconds:.2f} s, {rate:.1f} cutouts/s per rank on {size} rank(s)", flush=True)
    return 3 if rejected else 0


def run_pack(cfg: PackConfig) -> int:
    """Pack the catalog's cutouts into shards; the exit status (0 all packed, 3 some rejected). One pack at a time
    per --out: rank 0 holds the lock ``.OUT.lock`` next to the folder (:func:`sslsky.locks.lock_next_to`; not in
    it, which holds the pack only) from before it touches the folder to the end; a second pack is refused
    (ConfigError naming the holder) on every rank."""
    lock = OutputLock(lock_next_to(cfg.out or "."), "pack", key="--out", target=cfg.out, output=cfg.out or ".",
                      harm="Two packs into one --out would replace each other's shards and manifest")
    try:
        return _run_pack(cfg, lock)
    finally:
        lock.release()  # rank 0; a folder this pack created and left empty is removed too


def _lock_refusal(lock: OutputLock) -> str | None:
    """Take ``lock``: None, or why not (shared with every rank like a layout error, so that none waits)."""
    try:
        lock.acquire()
    except (ConfigError, OSError) as err:  # OSError: a full disk (DiskFullError) or another failure to write
        return str(err)
    return None


def _run_pack(cfg: PackConfig, lock: OutputLock) -> int:
    comm = get_comm()  # MPI_Init, like interpreter start-up, is not counted in the reported time
    start = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    check_config(cfg)
    n_bands_hint = get_survey(cfg.survey).n_bands if cfg.survey else SURVEYS["sdss"].n_bands
    # every rank: a bad catalog stops all of them alike
    cat = read_catalog(cfg.catalog, n_bands_hint, id_column=cfg.id_column, label_column=cfg.label_column)
    out = Path(cfg.out)
    layout = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        layout = _lock_refusal(lock)  # another pack writing out: every rank raises it below
    if rank == 0 and layout is None:
        stale = remove_stale_temps(out)  # temp files of a killed pack (safe: the lock says no one writes here)
        if stale:
            print(f"sslsky pack: removed {len(stale)} temporary file(s) left in {out} by an earlier pack that "
                  f"was killed or crashed ({', '.join(stale[:4])}{', ...' if len(stale) > 4 else ''})",
                  file=sys.stderr, flush=True)
        layout = probe_layout(cat, cfg) if len(cat.valid_rows) else Layout("fits", cfg.survey, "", None, (0, 0, 0),
                                                                           True)
    layout = comm.bcast(layout, root=0)
    if isinstance(layout, str):
        raise ConfigError(layout)
    try:
        report = pack_rank(cat, layout, cfg, out, rank, size)
        reports = comm.gather(report, root=0)
        status = finish(cat, layout, cfg, out, reports, size, start) if rank == 0 else None
    except Exception:
        if size == 1:
            raise
        traceback.print_exc()
        print(f"sslsky pack: rank {rank} failed; aborting all ranks", file=sys.stderr, flush=True)
        comm.Abort(1)
        raise
    return int(comm.bcast(status, root=0))
