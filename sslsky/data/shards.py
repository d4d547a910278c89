"""Reading packed shards: a map-style ``torch.utils.data.Dataset``.

    ds = ShardDataset("packed/", split="train")
    item = ds[0]   # {"image": (C, H, W) float32 tensor, "object_id", "z", "ebv", "morph_class", "index"}
                   # + "votes": (A,) int32 counts when the shards have them (ds.vote_columns names them)

Small per-row columns are read once into memory when the dataset is built;
image files are opened lazily, once per worker process, so the dataset can
be handed to a ``DataLoader`` with workers and to a ``DistributedSampler``.
A global index maps to (shard, row) through the cumulative row counts.

Reads are made for random access from the page cache: each worker keeps its
open image datasets and reads one row with a single low-level HDF5 hyperslab
read (HDF5 converts float16 shards to float32 on the way), and a
``DataLoader`` batch goes through ``__getitems__``, which reads its rows in
file order. Batches of uint8 shards (8-bit colour images) stay uint8 until the
training device turns them into floats; single items are always float32.
Object ids are int64 or text (:mod:`sslsky.data.ids`): a batch carries text
ids as a list of str.

The same class reads one HDF5 file in the layout of the original
ssl-sky-surveys data (``images``, ``specz_redshift``, ``e_bv``, ``ObjID``).

Every read is checked, cheaply and always (DESIGN.md, Integrity): at open,
the manifest's row total must equal its ``counts.packed`` (a removed shard
entry would silently drop rows) and its per-band statistics must be there,
finite, with sigma_mad > 0 (:func:`~sslsky.data.verify.check_manifest`);
each shard's size and row count must match ``manifest.json``, and HDF5
verifies the Fletcher32 checksums of the per-row columns as it reads them;
each image read is checked against its row's checksum in ``image_sum32``
(:func:`~sslsky.data.verify.row_sum32`, a few microseconds). A missing,
truncated or damaged shard or manifest is a
:class:`~sslsky.errors.DataError` naming the file (and the row) and the fix:
``sslsky pack`` again with the same catalog and ``--out``, which rewrites
exactly the damaged shards; ``sslsky verify DATA`` checks everything fully
(:mod:`sslsky.data.verify`). Shards packed before checksums existed are read
as before (their manifest's sha256 still lets ``sslsky verify`` check them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from sslsky.data.ids import is_string_ids, read_ids
from sslsky.data.schema import (
    IMAGE_SUM_DATASET,
    LEGACY_LAYOUT,
    OPTIONAL_COLUMNS,
    PACK_KEY_ATTR,
    PER_BAND_COLUMNS,
    VOTES_COLUMNS_ATTR,
    VOTES_DATASET,
)
from sslsky.data.splits import DEFAULT_FRACTIONS, label_subset, split_mask
from sslsky.data.verify import (
    MissingDataError,
    check_manifest,
    load_manifest,
    manifest_entries,
    open_shard,
    read_error,
    repack_hint,
    row_sum32,
)
from sslsky.errors import DataError

#: Per-row columns a dataset item carries besides the image.
ITEM_COLUMNS = ("object_id", "z", "ebv", "morph_class")
#: Which rows count as labelled for a task (used with ``label_fraction``).
LABELS = {
    "z": lambda cols: np.isfinite(cols["z"]),
    "morph_class": lambda cols: cols["morph_class"] >= 0,
}
#: ``label=VOTES_LABEL``: rows with at least one volunteer vote in the dataset's ``vote_columns``.
VOTES_LABEL = "votes"


def _check_entry(path: Path, entry: dict, n_rows: int | None, folder) -> None:
    """DataError unless the shard's size (and row count, when known) are what its manifest entry says."""
    size = entry.get("size_bytes")
    if size is not None and path.stat().st_size != int(size):
        raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {int(size)} (truncated or "
                        f"overwritten); {repack_hint(folder)}")
    rows = entry.get("rows")
    if n_rows is not None and rows is not None and int(rows) != n_rows:
        raise DataError(f"shard {path} holds {n_rows} rows, the manifest says {int(rows)}; {repack_hint(folder)}")


@dataclass
class ShardIndex:
    """Where the rows live: shard paths, their row counts, and the in-memory columns."""

    paths: list[Path]
    rows: np.ndarray  # (S,) rows per shard
    columns: dict[str, np.ndarray]  # name -> (N,) over all shards, in order
    image_key: str = "images"
    channels_last: bool = False  # legacy files store (N, H, W, C)
    attrs: dict = field(default_factory=dict)
    vote_columns: list[str] = field(default_factory=list)  # names of the columns of columns["votes"] (N, A)
    folder: Path | None = None  # the packed folder (None: one file), named in messages

    @property
    def offsets(self) -> np.ndarray:
        """(S + 1,) first global index of each shard, then the total."""
        return np.concatenate([[0], np.cumsum(self.rows)])


def _read_columns(handle: h5py.File, names: dict[str, str], n: int, where: str) -> dict[str, np.ndarray]:
    out = {}
    for stored, name in names.items():
        if stored in handle and name == "object_id":
            out[name] = read_ids(handle[stored])
        elif stored in handle:
            out[name] = handle[stored][()]
        elif name in OPTIONAL_COLUMNS:
            out[name] = np.full(n, OPTIONAL_COLUMNS[name])
        else:
            raise DataError(f"{where}: dataset {stored!r} is missing; re-pack with `sslsky pack`")
        if len(out[name]) != n:
            raise DataError(f"{where}: dataset {stored!r} has {len(out[name])} rows, the images {n}; "
                            f"{repack_hint()}")
    return out


def _is_legacy(handle: h5py.File) -> bool:
    return "ObjID" in handle or "specz_redshift" in handle


def _index_legacy(path: Path) -> ShardIndex:
    with open_shard(path) as handle:
        try:
            images = handle["images"]
            n = images.shape[0]
            # (N, H, W, C) in the original files; accept (N, C, H, W) too.
            channels_last = images.shape[-1] < images.shape[1]
            names = {stored: name for stored, name in LEGACY_LAYOUT.items() if stored != "images"}
            columns = _read_columns(handle, names, n, str(path))
        except (OSError, KeyError) as err:
            raise read_error(path, None, err) from None
        attrs = {"bands": "", "photometric": True, "legacy": True}
    columns.setdefault("morph_class", np.full(n, -1))
    return ShardIndex([path], np.array([n]), columns, channels_last=channels_last, attrs=attrs)


def index_shards(source: str | os.PathLike) -> ShardIndex:
    """Index a packed folder (via its manifest) or a single legacy/shard HDF5 file.

    Each shard's size and row count are checked against the manifest, and every column read is checked by its
    Fletcher32 checksum (when the shard has them): a mismatch, a missing or unreadable file is a DataError naming
    it and the fix.
    """
    source = Path(source)
    folder = None
    if source.is_file():
        with open_shard(source) as handle:
            legacy = _is_legacy(handle)
        if legacy:
            return _index_legacy(source)
        entries, attrs = [(source, {})], {}
    else:
        if not source.exists():
            raise MissingDataError(f"{source} does not exist; pack cutouts first with "
                                   f"`sslsky pack --catalog CAT --out {source}`")
        folder = source
        manifest = load_manifest(source)
        entries = manifest_entries(source, manifest)
        if not entries:
            raise DataError(f"{source}: the manifest lists no shards (was every cutout rejected? see rejected.csv)")
        check_manifest(source, manifest)  # statistics usable, counts there (compared once the shards are open)
        attrs = {k: v for k, v in manifest.items() if k not in ("shards", "config")}
    paths = [path for path, _ in entries]
    rows, parts = [], {name: [] for name in ITEM_COLUMNS + PER_BAND_COLUMNS}
    vote_parts: list[tuple[list[str], np.ndarray, Path]] = []
    for path, entry in entries:
        if not path.is_file():
            raise MissingDataError(f"shard {path} in the manifest is missing; {repack_hint(folder)}")
        _check_entry(path, entry, None, folder)
        with open_shard(path, folder) as handle:
            try:
                n = handle["images"].shape[0]
                _check_entry(path, entry, n, folder)
                key = handle.attrs.get(PACK_KEY_ATTR)
                key = key.decode() if isinstance(key, bytes) else key
                if entry.get("pack_key") and key is not None and key != entry["pack_key"]:  # swapped or replaced
                    raise DataError(f"shard {path} is not the shard its manifest entry describes (another pack key: "
                                    f"renamed, swapped or copied in from another pack); {repack_hint(folder)}")
                for name, values in _read_columns(handle, {c: c for c in ITEM_COLUMNS}, n, str(path)).items():
                    parts[name].append(values)
                for name in PER_BAND_COLUMNS:  # the image's own PSF and noise, (N, C), when the shards carry them
                    if name in handle:
                        parts[name].append(handle[name][()].astype(np.float32))
                if VOTES_DATASET in handle:  # (N, A) counts with their catalog column names
                    names = [c.decode() if isinstance(c, bytes) else str(c)
                             for c in handle[VOTES_DATASET].attrs.get(VOTES_COLUMNS_ATTR, [])]
                    vote_parts.append((names, handle[VOTES_DATASET][()].astype(np.int32), path))
                if not attrs:
                    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
            except (OSError, KeyError) as err:  # a checksum mismatch, a truncated file, a missing dataset
                raise read_error(path, None, err, folder) from None
        rows.append(n)
    if folder is not None:  # the rows of the listed shards against counts.packed: a removed entry drops rows
        check_manifest(folder, manifest, rows)
    columns = {name: np.concatenate(values) for name, values in parts.items() if len(values) == len(paths)}
    vote_columns: list[str] = []
    if vote_parts and len(vote_parts) == len(paths):  # every shard has votes: the first shard's column order
        vote_columns = vote_parts[0][0]
        matrices = []
        for names, votes, path in vote_parts:
            if sorted(names) != sorted(vote_columns) or len(names) != votes.shape[1]:
                raise DataError(f"shard {path} has vote columns {names}, the first shard {vote_columns}; "
                                f"re-pack all shards from one catalog")
            matrices.append(votes[:, [names.index(c) for c in vote_columns]])
        columns["votes"] = np.concatenate(matrices)
    return ShardIndex(paths, np.asarray(rows, dtype=np.int64), columns, attrs=attrs, vote_columns=vote_columns,
                      folder=folder)


class _ImageReader:
    """One shard's image dataset, open in this process; reads one row as (C, H, W) float32.

    Skips h5py's high-level slicing (which costs more than the read itself for
    one 5x107x107 image from the page cache): the file and memory dataspaces
    are made once and each read moves the hyperslab of one row. The read goes
    through HDF5's filter pipeline, which checks the chunk's Fletcher32
    checksum when the shard has them; a failed read is a DataError naming the
    shard and the row, and so is an image that differs from its checksum
    (``image_sum32``, when the shard has one). The image is read as stored
    (float16, uint8) for that check, then converted to the output's dtype.
    """

    def __init__(self, path: Path, key: str, channels_last: bool, folder: Path | None = None):
        self.path, self.folder = path, folder
        self.file = open_shard(path, folder)
        try:
            self.images = self.file[key]  # (N, C, H, W), or (N, H, W, C) when channels_last
            self.sums = self.file[IMAGE_SUM_DATASET][()] if IMAGE_SUM_DATASET in self.file else None  # (N,) uint32
        except (OSError, KeyError) as err:
            self.file.close()
            raise read_error(path, None, err, folder) from None
        self.channels_last = channels_last
        self.raw_dtype = np.dtype(np.uint8) if self.images.dtype == np.uint8 else np.dtype(np.float32)
        self.stored_dtype = np.dtype(self.images.dtype)
        self.row_shape = tuple(self.images.shape[1:])
        self.count = (1, *self.row_shape)
        self.file_space = self.images.id.get_space()
        self.memory_space = h5py.h5s.create_simple(self.row_shape)

    def read(self, row: int, out: np.ndarray | None = None) -> np.ndarray:
        """(C, H, W) float32: a fresh array the caller owns, or written into ``out`` (C-contiguous; float32, or
        uint8 when the shard holds uint8: HDF5 converts to the buffer's type)."""
        if self.channels_last:
            buffer = np.empty(self.row_shape, dtype=np.float32)
        else:
            buffer = np.empty(self.row_shape, dtype=np.float32) if out is None else out
        # Read the bytes as stored, for the checksum, and convert after (exact: float16, uint8 -> float32; numpy
        # converts uint8 about 2x faster than HDF5 does, benchmarks/bench_loader.py).
        stored = buffer if buffer.dtype == self.stored_dtype else np.empty(self.row_shape, dtype=self.stored_dtype)
        try:
            self.file_space.select_hyperslab((row,) + (0,) * len(self.row_shape), self.count)
            self.images.id.read(self.memory_space, self.file_space, stored)
        except (OSError, ValueError) as err:  # ValueError: a row past the end of a shorter (damaged) dataset
            raise read_error(self.path, row, err, self.folder) from None
        if self.sums is not None and (row >= len(self.sums) or row_sum32(stored) != int(self.sums[row])):
            raise read_error(self.path, row, f"the image differs from its checksum in {IMAGE_SUM_DATASET}",
                             self.folder)
        if stored is not buffer:
            buffer[...] = stored
        if self.channels_last:
            image = np.moveaxis(buffer, -1, 0)
            if out is None:
                return np.ascontiguousarray(image)
            out[...] = image
            return out
        return buffer

    def close(self) -> None:
        self.file.close()


class ShardDataset(Dataset):
    """Images and metadata from packed shards, optionally one split and a labelled subset.

    Args:
        source: packed folder (with ``manifest.json``) or one HDF5 file (shard or legacy layout).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` for all rows (stable hash of object_id).
        split_fractions: train/val/test fractions.
        label: ``"z"``, ``"morph_class"`` or ``"votes"`` (at least one vote in ``vote_columns``): keep only rows
            with that label.
        label_fraction: with ``label``, keep a seeded random fraction of the labelled rows.
        seed: seed of the label subset.
        transform: optional callable applied to the (C, H, W) image tensor.
        vote_columns: the vote-count columns items carry as ``votes`` (A,), in this order (ValueError
            naming the missing ones); None: every vote column of the shards, if they have any.
    """

    def __init__(self, source, split: str | None = None, split_fractions=DEFAULT_FRACTIONS,
                 label: str | None = None, label_fraction: float | None = None, seed: int = 0,
                 transform=None, vote_columns=None):
        self.source = Path(source)
        self.index = index_shards(source)
        self.offsets = self.index.offsets
        cols = self.index.columns
        keep = np.ones(len(cols["object_id"]), dtype=bool)
        if split is not None:
            keep &= split_mask(cols["object_id"], split, split_fractions)
        self.vote_columns: list[str] = list(self.index.vote_columns if vote_columns is None else vote_columns)
        self.vote_counts: np.ndarray | None = None  # (N, A) int32 over all rows, columns as vote_columns
        if vote_columns is not None:
            missing = [c for c in self.vote_columns if c not in self.index.vote_columns]
            if missing:
                have = f"has {len(self.index.vote_columns)} other vote columns" if self.index.vote_columns else \
                    "has no vote counts"
                raise ValueError(f"{self.source} {have}; missing {missing[:4]}{'...' if len(missing) > 4 else ''} "
                                 f"({len(missing)} of {len(self.vote_columns)}): pack a catalog with these "
                                 f"votes_* columns, or declare the campaigns' trees to match the catalog")
        if self.vote_columns:
            order = [self.index.vote_columns.index(c) for c in self.vote_columns]
            self.vote_counts = np.ascontiguousarray(cols["votes"][:, order])
        if label == VOTES_LABEL:
            if self.vote_counts is None:
                raise ValueError(f"{self.source} has no vote counts (votes_* catalog columns) for label='votes'")
            keep &= self.vote_counts.sum(axis=1) > 0
        elif label is not None:
            if label not in LABELS:
                raise ValueError(f"unknown label {label!r}; choose one of {', '.join([*LABELS, VOTES_LABEL])}")
            keep &= LABELS[label](cols)
        elif label_fraction is not None:
            raise ValueError("label_fraction needs label= ('z', 'morph_class' or 'votes') to know which rows are "
                             "labelled")
        self.indices = np.flatnonzero(keep)  # (M,) global row of each item
        if label_fraction is not None and label_fraction < 1.0:
            self.indices = label_subset(self.indices, fraction=label_fraction, seed=seed)
        self.transform = transform
        self._readers: dict[int, _ImageReader] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def attrs(self) -> dict:
        """Survey, bands, pixel scale, statistics... from the manifest (or the file's attrs)."""
        return self.index.attrs

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard number, row in shard) of a global row index."""
        shard = int(np.searchsorted(self.offsets, global_index, side="right") - 1)
        return shard, int(global_index - self.offsets[shard])

    def _reader(self, shard: int) -> _ImageReader:
        if self._pid != os.getpid():  # a fresh worker: never share handles across fork
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = _ImageReader(self.index.paths[shard], self.index.image_key,
                                                         self.index.channels_last, self.index.folder)
        return reader

    def read_image(self, global_index: int) -> np.ndarray:
        """(C, H, W) float32 image of a global row."""
        shard, row = self.locate(global_index)
        return self._reader(shard).read(row)

    def _item(self, g: int, image: np.ndarray) -> dict:
        image = torch.from_numpy(image)
        if self.transform is not None:
            image = self.transform(image)
        cols = self.index.columns
        item = {
            "image": image,
            "object_id": cols["object_id"][g].item(),
            "z": float(cols["z"][g]),
            "ebv": float(cols["ebv"][g]),
            "morph_class": int(cols["morph_class"][g]),
            "index": g,
        }
        for name in PER_BAND_COLUMNS:
            if name in cols:
                item[name] = torch.from_numpy(cols[name][g])  # (C,)
        if self.vote_counts is not None:
            item["votes"] = torch.from_numpy(self.vote_counts[g])  # (A,)
        return item

    def __getitem__(self, i) -> dict:
        """Item ``i`` as a dict; a list of indices gives the whole batch at once (see :meth:`read_batch`)."""
        if isinstance(i, (list, tuple, np.ndarray)):
            return self.read_batch(i)
        g = int(self.indices[i])
        return self._item(g, self.read_image(g))

    def read_batch(self, indices) -> dict:
        """A collated batch, read straight into one ``(B, C, H, W)`` float32 array (uint8 for uint8 shards).

        Equal to ``default_collate([self[i] for i in indices])`` (the same keys, dtypes and values)
        without one array per image and the copy of stacking them: with
        ``DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, B, drop_last))`` each
        batch is one call of this (:func:`batch_loader` builds that loader).
        """
        if self.transform is not None:
            from torch.utils.data import default_collate

            return default_collate(self.__getitems__(indices))
        rows = self.indices[np.asarray(indices, dtype=np.int64)]  # (B,) global rows
        shards = np.searchsorted(self.offsets, rows, side="right") - 1
        first = self._reader(int(shards[0])) if len(rows) else None
        shape = first.row_shape if first is not None else (0, 0, 0)
        if self.index.channels_last and len(rows):
            shape = (shape[-1], *shape[:-1])
        raw = first is not None and not self.index.channels_last and first.raw_dtype == np.uint8
        images = np.empty((len(rows), *shape), dtype=np.uint8 if raw else np.float32)
        for k in np.argsort(rows, kind="stable"):  # file order
            shard = int(shards[k])
            self._reader(shard).read(int(rows[k] - self.offsets[shard]), out=images[k])
        cols = self.index.columns
        ids = cols["object_id"][rows]
        batch = {
            "image": torch.from_numpy(images),
            "object_id": ids.tolist() if is_string_ids(ids) else torch.from_numpy(ids.astype(np.int64)),
            "z": torch.from_numpy(cols["z"][rows].astype(np.float64)),
            "ebv": torch.from_numpy(cols["ebv"][rows].astype(np.float64)),
            "morph_class": torch.from_numpy(cols["morph_class"][rows].astype(np.int64)),
            "index": torch.from_numpy(rows.astype(np.int64)),
        }
        for name in PER_BAND_COLUMNS:
            if name in cols:
                batch[name] = torch.from_numpy(np.ascontiguousarray(cols[name][rows]))
        if self.vote_counts is not None:
            batch["votes"] = torch.from_numpy(self.vote_counts[rows])  # (B, A) int32
        return batch

    def __getitems__(self, indices) -> list[dict]:
        """``[self[i] for i in indices]``, reading the rows in file order (a DataLoader calls this per batch)."""
        rows = self.indices[np.asarray(indices, dtype=np.int64)]  # (B,) global rows
        shards = np.searchsorted(self.offsets, rows, side="right") - 1
        images: list[np.ndarray | None] = [None] * len(rows)
        for k in np.argsort(rows, kind="stable"):  # shards follow global rows, so this is file order
            shard = int(shards[k])
            images[k] = self._reader(shard).read(int(rows[k] - self.offsets[shard]))
        return [self._item(int(g), image) for g, image in zip(rows, images)]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"], state["_pid"] = {}, None
        return state


def batch_loader(dataset: ShardDataset, sampler, batch_size: int, drop_last: bool = True, **kwargs) -> DataLoader:
    """A DataLoader whose batches are single :meth:`ShardDataset.read_batch` calls.

    ``sampler`` yields dataset indices (e.g. a ``DistributedSampler``); ``kwargs`` go to the DataLoader
    (``num_workers``, ``pin_memory``, ``persistent_workers``, ``generator``...). The batches equal
    those of ``DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last)``.
    """
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last), **kwargs)
