"""Stable train/val/test splits and seeded label-fraction subsets.

A galaxy's split depends on its ``object_id`` alone (a 64-bit mix of the id,
not Python's salted ``hash``), so it never moves when shards are re-packed,
re-ordered or grown, and every rank computes the same answer. Text ids (IAU
names) enter the mix as 64 bits of their BLAKE2b digest.
"""

from __future__ import annotations

import numpy as np

from sslsky.data.ids import id_hash_keys

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_SALT = np.uint64(0x5A1C5A1C2021)  # fixed: changing it moves every galaxy


def unit_hash(object_ids) -> np.ndarray:
    """Map ids to floats in [0, 1), uniformly and stably (splitmix64 finaliser).

    ``object_ids`` (N,) int or str -> (N,) float64.
    """
    with np.errstate(over="ignore"):
        x = id_hash_keys(object_ids) + _SALT
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(object_ids, fractions=DEFAULT_FRACTIONS) -> np.ndarray:
    """Split name index (0 train, 1 val, 2 test) of each id; ``fractions`` sum to 1."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (len(SPLITS),) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}")
    edges = np.cumsum(fractions)[:-1]
    return np.searchsorted(edges, unit_hash(object_ids), side="right")


def split_mask(object_ids, split: str, fractions=DEFAULT_FRACTIONS) -> np.ndarray:
    """Boolean mask of the ids that fall in ``split`` ("train", "val" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return assign_splits(object_ids, fractions) == SPLITS.index(split)


def label_subset(indices, fraction: float | None = None, count: int | None = None, seed: int = 0) -> np.ndarray:
    """A seeded random subset of ``indices`` holding ``fraction`` of them (or ``count``).

    Subsets are nested: for one seed, the 1% subset lies inside the 10% subset,
    so label-efficiency curves differ only by the added labels. The result is
    sorted (fast, sequential reads).
    """
    indices = np.asarray(indices)
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * len(indices))))
    if not 0 < count <= len(indices):
        raise ValueError(f"asked for {count} labelled objects but only {len(indices)} are available")
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[:count]])
