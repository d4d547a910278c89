"""Reading packed shards: a map-style ``torch.utils.data.Dataset``.

    ds = ShardDataset("packed/", split="train")
    item = ds[0]   # {"image": (C, H, W) float32 tensor, "object_id", "z", "ebv", "morph_class", "index"}

Small per-row columns are read once into memory when the dataset is built;
image files are opened lazily, once per worker process, so the dataset can
be handed to a ``DataLoader`` with workers and to a ``DistributedSampler``.
A global index maps to (shard, row) through the cumulative row counts.

The same class reads one HDF5 file in the layout of the original
ssl-sky-surveys data (``images``, ``specz_redshift``, ``e_bv``, ``ObjID``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from sslsky.data.schema import LEGACY_LAYOUT, MANIFEST_NAME, OPTIONAL_COLUMNS, PER_BAND_COLUMNS
from sslsky.data.splits import DEFAULT_FRACTIONS, label_subset, split_mask

#: Per-row columns a dataset item carries besides the image.
ITEM_COLUMNS = ("object_id", "z", "ebv", "morph_class")
#: Which rows count as labelled for a task (used with ``label_fraction``).
LABELS = {
    "z": lambda cols: np.isfinite(cols["z"]),
    "morph_class": lambda cols: cols["morph_class"] >= 0,
}


@dataclass
class ShardIndex:
    """Where the rows live: shard paths, their row counts, and the in-memory columns."""

    paths: list[Path]
    rows: np.ndarray  # (S,) rows per shard
    columns: dict[str, np.ndarray]  # name -> (N,) over all shards, in order
    image_key: str = "images"
    channels_last: bool = False  # legacy files store (N, H, W, C)
    attrs: dict = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        """(S + 1,) first global index of each shard, then the total."""
        return np.concatenate([[0], np.cumsum(self.rows)])


def _read_columns(handle: h5py.File, names: dict[str, str], n: int, where: str) -> dict[str, np.ndarray]:
    out = {}
    for stored, name in names.items():
        if stored in handle:
            out[name] = handle[stored][()]
        elif name in OPTIONAL_COLUMNS:
            out[name] = np.full(n, OPTIONAL_COLUMNS[name])
        else:
            raise KeyError(f"{where}: dataset {stored!r} is missing; re-pack with `sslsky pack`")
    return out


def _is_legacy(handle: h5py.File) -> bool:
    return "ObjID" in handle or "specz_redshift" in handle


def _index_legacy(path: Path) -> ShardIndex:
    with h5py.File(path, "r") as handle:
        images = handle["images"]
        n = images.shape[0]
        # (N, H, W, C) in the original files; accept (N, C, H, W) too.
        channels_last = images.shape[-1] < images.shape[1]
        names = {stored: name for stored, name in LEGACY_LAYOUT.items() if stored != "images"}
        columns = _read_columns(handle, names, n, str(path))
        attrs = {"bands": "", "photometric": True, "legacy": True}
    columns["object_id"] = columns["object_id"].astype(np.int64)
    columns.setdefault("morph_class", np.full(n, -1))
    return ShardIndex([path], np.array([n]), columns, channels_last=channels_last, attrs=attrs)


def _manifest_shard_paths(root: Path, manifest: dict) -> list[Path]:
    paths = []
    for entry in manifest["shards"]:
        name = entry if isinstance(entry, str) else entry.get("path") or entry.get("file") or entry.get("name")
        paths.append(root / name)
    return paths


def index_shards(source: str | os.PathLike) -> ShardIndex:
    """Index a packed folder (via its manifest) or a single legacy/shard HDF5 file."""
    source = Path(source)
    if source.is_file():
        with h5py.File(source, "r") as handle:
            legacy = _is_legacy(handle)
        if legacy:
            return _index_legacy(source)
        paths, attrs = [source], {}
    else:
        manifest_path = source / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{source}: no {MANIFEST_NAME}; pack cutouts first with `sslsky pack --catalog CAT --out {source}`"
            )
        manifest = json.loads(manifest_path.read_text())
        paths = _manifest_shard_paths(source, manifest)
        if not paths:
            raise ValueError(f"{source}: the manifest lists no shards (was every cutout rejected? see rejected.csv)")
        attrs = {k: v for k, v in manifest.items() if k not in ("shards", "config")}
    rows, parts = [], {name: [] for name in ITEM_COLUMNS + PER_BAND_COLUMNS}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} in the manifest is missing; re-run `sslsky pack` to rebuild it")
        with h5py.File(path, "r") as handle:
            n = handle["images"].shape[0]
            for name, values in _read_columns(handle, {c: c for c in ITEM_COLUMNS}, n, str(path)).items():
                parts[name].append(values)
            for name in PER_BAND_COLUMNS:  # the image's own PSF and noise, (N, C), when the shards carry them
                if name in handle:
                    parts[name].append(handle[name][()].astype(np.float32))
            if not attrs:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
        rows.append(n)
    columns = {name: np.concatenate(values) for name, values in parts.items() if len(values) == len(paths)}
    return ShardIndex(paths, np.asarray(rows, dtype=np.int64), columns, attrs=attrs)


class ShardDataset(Dataset):
    """Images and metadata from packed shards, optionally one split and a labelled subset.

    Args:
        source: packed folder (with ``manifest.json``) or one HDF5 file (shard or legacy layout).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` for all rows (stable hash of object_id).
        split_fractions: train/val/test fractions.
        label: ``"z"`` or ``"morph_class"``: keep only rows with that label.
        label_fraction: with ``label``, keep a seeded random fraction of the labelled rows.
        seed: seed of the label subset.
        transform: optional callable applied to the (C, H, W) image tensor.
    """

    def __init__(self, source, split: str | None = None, split_fractions=DEFAULT_FRACTIONS,
                 label: str | None = None, label_fraction: float | None = None, seed: int = 0,
                 transform=None):
        self.source = Path(source)
        self.index = index_shards(source)
        self.offsets = self.index.offsets
        cols = self.index.columns
        keep = np.ones(len(cols["object_id"]), dtype=bool)
        if split is not None:
            keep &= split_mask(cols["object_id"], split, split_fractions)
        if label is not None:
            if label not in LABELS:
                raise ValueError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
            keep &= LABELS[label](cols)
        elif label_fraction is not None:
            raise ValueError("label_fraction needs label= ('z' or 'morph_class') to know which rows are labelled")
        self.indices = np.flatnonzero(keep)  # (M,) global row of each item
        if label_fraction is not None and label_fraction < 1.0:
            self.indices = label_subset(self.indices, fraction=label_fraction, seed=seed)
        self.transform = transform
        self._files: dict[int, h5py.File] = {}
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

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # a fresh worker: never share handles across fork
            self._files, self._pid = {}, os.getpid()
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = h5py.File(self.index.paths[shard], "r")
        return handle

    def read_image(self, global_index: int) -> np.ndarray:
        """(C, H, W) float32 image of a global row."""
        shard, row = self.locate(global_index)
        image = self._file(shard)[self.index.image_key][row]
        if self.index.channels_last:
            image = np.moveaxis(image, -1, 0)
        return np.ascontiguousarray(image, dtype=np.float32)

    def __getitem__(self, i: int) -> dict:
        g = int(self.indices[i])
        image = torch.from_numpy(self.read_image(g))
        if self.transform is not None:
            image = self.transform(image)
        cols = self.index.columns
        item = {
            "image": image,
            "object_id": int(cols["object_id"][g]),
            "z": float(cols["z"][g]),
            "ebv": float(cols["ebv"][g]),
            "morph_class": int(cols["morph_class"][g]),
            "index": g,
        }
        for name in PER_BAND_COLUMNS:
            if name in cols:
                item[name] = torch.from_numpy(cols[name][g])  # (C,)
        return item

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state
