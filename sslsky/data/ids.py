"""Galaxy identifiers: integers (SDSS ``objid``) or strings (IAU names, ``id_str``, ``brickid_objid``).

A catalog's ids are kept exactly as they come: an integer column stays int64, a text column stays text
(surrounding blanks stripped, as FITS pads them). Everything downstream -- shards, predictions,
embeddings, ``sslsky search --query`` -- carries the same kind, so a name typed by the user finds its row.

    ids = as_id_array(["J000411.19+020924.0", "J000412.00-010203.4"])   # (N,) str
    write_ids(handle, "object_id", ids)          # HDF5: int64, or UTF-8 variable-length strings
    read_ids(handle["object_id"])                # back to (N,) int64 or str
    match_query("J000411.19+020924.0", ids)      # the query as the ids' kind (ValueError when it cannot be)
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Catalog columns taken as the galaxy id, in this order, when ``id_column`` is not given.
ID_COLUMN_ALIASES = ("object_id", "id_str", "iauname", "objid", "dr8_id")


def is_string_ids(ids: np.ndarray) -> bool:
    """True for text ids (NumPy ``U``/``S``/object arrays), False for integers."""
    return np.asarray(ids).dtype.kind in "USO"


def as_id_array(values) -> np.ndarray:
    """(N,) int64 for integer ids, (N,) str for anything else (bytes decoded as UTF-8, blanks stripped)."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "b":
        raise ValueError("object ids cannot be booleans")
    if array.dtype.kind == "f":
        raise ValueError("object ids must be integers or text, not floats")
    out = [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in array.reshape(-1)]
    return np.array([value.strip() for value in out], dtype=str).reshape(array.shape)


def id_hash_keys(ids) -> np.ndarray:
    """(N,) uint64 keys for hashing: the int64 bit pattern of integer ids, 64 bits of BLAKE2b of text ids."""
    array = np.asarray(ids)
    if not is_string_ids(array):
        return array.astype(np.int64).view(np.uint64)
    keys = [int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little")
            for value in as_id_array(array)]
    return np.array(keys, dtype=np.uint64)


def write_ids(handle, name: str, ids: np.ndarray, **kwargs):
    """Create dataset ``name`` holding ``ids``: int64, or UTF-8 variable-length strings."""
    import h5py

    if is_string_ids(ids):
        data = np.array([str(v) for v in ids], dtype=object)
        return handle.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8"), **kwargs)
    return handle.create_dataset(name, data=np.asarray(ids, dtype=np.int64), **kwargs)


def read_ids(dataset) -> np.ndarray:
    """(N,) int64 or str ids of an HDF5 dataset written by :func:`write_ids` (or any integer dataset)."""
    if dataset.dtype.kind in "SOU":
        return as_id_array(dataset.asstr()[()])
    return np.asarray(dataset[()]).astype(np.int64)


def id_text(value) -> str:
    """An id as the user writes it."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def match_query(query, ids: np.ndarray):
    """``query`` as the kind of ``ids``: text for text ids, an int for integer ids (ValueError otherwise)."""
    if is_string_ids(ids):
        return id_text(query).strip()
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        return int(query)
    text = id_text(query).strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"object_id {text!r} is not an integer, and these ids are integers") from None
