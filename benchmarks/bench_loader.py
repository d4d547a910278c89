"""Loader throughput: SDSS-size cutouts/s read from packed shards (page cache warm).

    python benchmarks/bench_loader.py [--n 4000] [--seconds 5]

Packs a synthetic set of 5x107x107 cutouts once (into a temp folder), then
times random-access reads of ShardDataset items in this process and through
a DataLoader with 0 and 2 workers. Target: >= 5,000 cutouts/s per process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table
from torch.utils.data import DataLoader, RandomSampler

from sslsky.config import PackConfig
from sslsky.data.fits_io import write_cutout
from sslsky.data.pack import run_pack
from sslsky.data.shards import ShardDataset, batch_loader
from sslsky.surveys import SURVEYS


def make_cutouts(folder: Path, n: int, seed: int = 0) -> Path:
    """n noisy SDSS-size cutouts with a Gaussian blob, and their catalog.fits."""
    survey = SURVEYS["sdss"]
    rng = np.random.default_rng(seed)
    size = survey.cutout_size
    yy, xx = np.mgrid[:size, :size] - size // 2
    blob = np.exp(-(xx**2 + yy**2) / (2 * 4.0**2))
    (folder / "cutouts").mkdir(parents=True)
    files = []
    for i in range(n):
        cube = rng.normal(0, 0.03, (survey.n_bands, size, size)) + blob * rng.uniform(0.1, 2.0)
        name = f"cutouts/{i}.fits"
        write_cutout(folder / name, cube, survey.bands, survey.pixel_scale, 150.0, 2.0, survey="sdss")
        files.append(name)
    Table({"object_id": np.arange(n, dtype=np.int64), "ra": np.full(n, 150.0), "dec": np.full(n, 2.0),
           "z": rng.uniform(0.02, 0.3, n), "ebv": rng.uniform(0, 0.1, n), "file": files}).write(folder / "catalog.fits")
    return folder / "catalog.fits"


def rate(fn, seconds: float) -> float:
    """Items per second of ``fn()`` (which returns how many items it read), run for ~``seconds``."""
    fn()  # warm-up: page cache, file handles, workers
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="cutouts to pack")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="sslsky-bench-loader-") as tmp:
        tmp = Path(tmp)
        catalog = make_cutouts(tmp / "raw", args.n)
        status = run_pack(PackConfig(catalog=str(catalog), out=str(tmp / "packed"), shard_size=1024, progress=False))
        if status not in (0, 3):
            raise SystemExit(f"pack failed with status {status}")
        ds = ShardDataset(tmp / "packed")
        rng = np.random.default_rng(0)
        print(f"loader benchmark: {len(ds)} cutouts of {tuple(ds[0]['image'].shape)} float32, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")

        def random_items(k: int = 512) -> int:
            for i in rng.integers(0, len(ds), k):
                ds[int(i)]
            return k

        print(f"  random access, ShardDataset[i] in-process: {rate(random_items, args.seconds):8.0f} cutouts/s")
        for workers in (0, 2):
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=RandomSampler(ds, replacement=True,
                                num_samples=args.batch_size * 8), num_workers=workers,
                                persistent_workers=workers > 0)

            def batches(loader=loader) -> int:
                return sum(len(b["image"]) for b in loader)

            print(f"  DataLoader random batches of {args.batch_size}, {workers} workers: "
                  f"{rate(batches, args.seconds):8.0f} cutouts/s")
        for workers in (0, 2):  # what the trainer uses: one read_batch per batch, no per-item arrays
            loader = batch_loader(ds, RandomSampler(ds, replacement=True, num_samples=args.batch_size * 8),
                                  args.batch_size, num_workers=workers, persistent_workers=workers > 0)

            def batches(loader=loader) -> int:
                return sum(len(b["image"]) for b in loader)

            print(f"  batch_loader (read_batch) batches of {args.batch_size}, {workers} workers: "
                  f"{rate(batches, args.seconds):8.0f} cutouts/s")
        ds.close()


if __name__ == "__main__":
    main()
