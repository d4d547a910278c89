"""The embeddings file that ``sslsky embed`` writes and ``sslsky search`` reads: one HDF5 file,

    embeddings   (N, F) float32, L2-normalised (cosine similarity = dot product)
    object_id    (N,) int64      z (N,)   ebv (N,)   morph_class (N,)
    index        (N,) int64      global row of each galaxy in the shards (ShardDataset.read_image)
    attrs        format, ckpt, arch, stem, feature_dim, data, survey, bands, split, ranks, ...;
                 space: features (the encoder's) | aligned (an align run's shared space, with ckpt_sha256);
                 absent in older files: features

:class:`Embeddings` opens one read-only and checks what search needs (a file without it is an
:class:`EmbeddingsError` naming what is missing and how to make it again); :func:`create_datasets` lays out a
new one (or a part of one) for the writer, :mod:`sslsky.eval.embed`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from sslsky.data.ids import as_id_array, id_text, is_string_ids, match_query, read_ids, write_ids
from sslsky.vocabulary import class_names

EMBEDDINGS_FORMAT = "sslsky-embeddings-v1"
#: Per-row columns stored next to the embeddings (``index``: global row in the shards).
COLUMNS = ("object_id", "z", "ebv", "morph_class", "index")
#: Columns search needs (the neighbour table, the evaluation); ``ebv`` and ``index`` may be missing.
REQUIRED_COLUMNS = ("object_id", "z", "morph_class")
_CHUNK_BYTES = 4 << 20  # target HDF5 chunk of the embeddings dataset


class EmbeddingsError(ValueError):
    """A user-fixable problem with an embeddings file or a query; the message names the file or id."""


class Embeddings:
    """An embeddings file written by ``sslsky embed``, read-only.

    ``vectors`` is the ``(N, F)`` HDF5 dataset, or a NumPy array when it fits in ``cache_mb``;
    the per-row columns are in memory (``columns[name]``, ``(N,)``). A file without the datasets search
    needs (:data:`REQUIRED_COLUMNS`, a float ``(N, F)`` ``embeddings``) is an :class:`EmbeddingsError` naming
    what is missing; ``index`` may be missing (the images for ``--png`` are then found by object_id).
    Rows with NaN/inf are not looked for here: the search skips them as it reads them.
    """

    def __init__(self, path: str | os.PathLike, cache_mb: float = 2048.0):
        self.path = Path(path)
        remake = f"make it again with `sslsky embed --ckpt ENCODER --data SHARDS --out {self.path}`"
        if self.path.is_dir():
            raise EmbeddingsError(f"embeddings file {self.path} is a folder: give the file written by sslsky embed")
        if not self.path.is_file():
            raise EmbeddingsError(f"embeddings file {self.path} does not exist; make it with "
                                  f"`sslsky embed --ckpt ENCODER --data SHARDS --out {self.path}`")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise EmbeddingsError(f"embeddings file {self.path} is not readable HDF5 ({err}): damaged, cut short or "
                                  f"another kind of file; {remake}") from None
        try:
            self._check(remake)
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}
            self.columns = {name: read_ids(self.file[name]) if name == "object_id" else self.file[name][()]
                            for name in COLUMNS if name in self.file}
            dataset = self.file["embeddings"]
            fits = dataset.size * dataset.dtype.itemsize <= cache_mb * 2**20
            self.vectors = dataset[()] if fits else dataset  # (N, F)
            self.normalized = bool(self.attrs.get("normalized", False))  # rows meant to be unit vectors
        except OSError as err:
            self.file.close()
            raise EmbeddingsError(f"cannot read {self.path} ({err}): the file is damaged; {remake}") from None
        except EmbeddingsError:
            self.file.close()
            raise
        self._sorter: np.ndarray | None = None  # (N,) argsort of object_id, made on the first lookup

    def _check(self, remake: str) -> None:
        """The format attribute, a float (N, F) embeddings dataset and (N,) columns, else EmbeddingsError."""
        if self.file.attrs.get("format") != EMBEDDINGS_FORMAT or "embeddings" not in self.file:
            raise EmbeddingsError(f"{self.path} is not an sslsky embeddings file (format={EMBEDDINGS_FORMAT}); "
                                  f"make one with `sslsky embed`")
        dataset = self.file["embeddings"]
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 2 or dataset.dtype.kind != "f":
            shape = f"{dataset.shape} {dataset.dtype}" if isinstance(dataset, h5py.Dataset) else "a group"
            raise EmbeddingsError(f"{self.path}: 'embeddings' is {shape}, not (N, F) floats; {remake}")
        n = dataset.shape[0]
        missing = [name for name in REQUIRED_COLUMNS if name not in self.file]
        if missing:
            raise EmbeddingsError(f"{self.path} has no {', '.join(missing)} dataset(s) (written by another tool, "
                                  f"or edited); {remake}")
        for name in COLUMNS:
            if name in self.file and getattr(self.file[name], "shape", None) != (n,):
                shape = getattr(self.file[name], "shape", "a group")
                raise EmbeddingsError(f"{self.path}: {name!r} has shape {shape}, the embeddings {n} rows; {remake}")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows_of(self, object_ids) -> np.ndarray:
        """``(Q,)`` rows of the given object ids (the first row of a repeated id); an unknown id is an error."""
        ids = self.columns["object_id"]
        if self._sorter is None:
            self._sorter = np.argsort(ids, kind="stable")
        try:
            wanted = as_id_array([match_query(q, ids) for q in np.asarray(object_ids, dtype=object).reshape(-1)])
        except ValueError as err:
            raise EmbeddingsError(f"{err} ({self.path})") from None
        pos = np.minimum(np.searchsorted(ids, wanted, sorter=self._sorter), len(ids) - 1)
        rows = self._sorter[pos]
        missing = wanted[ids[rows] != wanted]
        if missing.size:
            kind = "names such as " + repr(id_text(ids[0])) if is_string_ids(ids) else f"{ids.min()}..{ids.max()}"
            raise EmbeddingsError(f"object_id {', '.join(map(id_text, missing[:5].tolist()))} not in {self.path} "
                                  f"({len(ids)} rows, object_id {kind}); embed the shards that hold it, or check "
                                  f"the id")
        return rows.astype(np.int64)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_datasets(handle: h5py.File, n: int, dim: int, columns: dict[str, np.ndarray]) -> None:
    """The per-row columns of an embeddings (or part) file and its ``(n, dim)`` embeddings dataset, to fill."""
    rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (4 * dim)))
    handle.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                          chunks=(rows_per_chunk, dim) if n else None)
    for name, values in columns.items():
        if name == "object_id":
            write_ids(handle, name, values)
        else:
            handle.create_dataset(name, data=values)


def morph_class_name(c: int, attrs: dict) -> str:
    """Name of class ``c`` of the embedded shards' label column ("unknown" for -1)."""
    if c < 0:
        return "unknown"
    return class_names(c, attrs)[c]
