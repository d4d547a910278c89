"""Loader throughput: cutouts/s read from packed shards (page cache warm), with and without checksums.

    python benchmarks/bench_loader.py [--n 4000] [--n-colour 2000] [--seconds 5] [--checksums all|default]

Packs a synthetic set of 5x107x107 float32 SDSS-size cutouts and one of
3x224x224 uint8 colour images (PNG, Zoobot's input size) once (into a temp
folder), then times random-access reads of ShardDataset items in this process
and through a DataLoader with 0 and 2 workers, and the trainer's
``batch_loader``. Target: >= 5,000 SDSS cutouts/s per process.

``--checksums all`` (the default) times three versions of each pack side by
side, measured in alternation (best of ``--rounds``), so the cost of each
check is read off one run: ``sum32`` (the shards as packed: every read checks
the row's ``image_sum32``), ``sum32+f32`` (packed with HDF5's Fletcher32 on
the image chunks too, ``sslsky.data.pack.IMAGE_FLETCHER32``), and ``none``
(a copy without either, like shards packed before checksums existed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from astropy.table import Table
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

import sslsky.data.pack
from sslsky.config import PackConfig
from sslsky.data.fits_io import write_cutout
from sslsky.data.pack import run_pack
from sslsky.data.schema import IMAGE_SUM_DATASET, MANIFEST_NAME
from sslsky.data.shards import ShardDataset, batch_loader
from sslsky.data.verify import file_sha256
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


def make_colour_images(folder: Path, n: int, size: int = 224, seed: int = 0) -> Path:
    """n 8-bit RGB PNGs (noisy sky plus a blob) of ``size`` x ``size``, and their catalog.fits."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    blob = np.exp(-(xx**2 + yy**2) / (2 * (size / 12) ** 2))
    (folder / "images").mkdir(parents=True)
    files = []
    for i in range(n):
        rgb = 20 + rng.normal(0, 6, (size, size, 3)) + blob[..., None] * rng.uniform(60, 220, 3)
        name = f"images/{i}.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / name, compress_level=1)
        files.append(name)
    Table({"object_id": np.arange(n, dtype=np.int64), "ra": np.full(n, 150.0), "dec": np.full(n, 2.0),
           "file": files}).write(folder / "catalog.fits")
    return folder / "catalog.fits"


def without_checksums(packed: Path, out: Path) -> Path:
    """A copy of a packed folder whose shards have no checksums (no image_sum32, no Fletcher32; same chunks),
    the manifest updated: shards as packed before checksums existed."""
    out.mkdir()
    manifest = json.loads((packed / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        with h5py.File(packed / entry["path"], "r") as src, h5py.File(out / entry["path"], "w") as dst:
            for name, dataset in src.items():
                if name == IMAGE_SUM_DATASET:
                    continue
                copy = dst.create_dataset(name, data=dataset[()], chunks=dataset.chunks, track_times=False)
                copy.attrs.update(dict(dataset.attrs))
            dst.attrs.update(dict(src.attrs))
        entry["size_bytes"] = (out / entry["path"]).stat().st_size
        entry["sha256"] = file_sha256(out / entry["path"])
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    for name in ("rejected.csv", "config.yaml"):
        if (packed / name).exists():
            shutil.copy(packed / name, out / name)
    return out


def measures(ds: ShardDataset, batch_size: int, seconds: float, workers: tuple[int, ...]) -> dict[str, float]:
    """Images/s of: random ShardDataset[i]; default-collate DataLoader and batch_loader with each worker count."""
    rng = np.random.default_rng(0)

    def random_items(k: int = 512) -> int:
        for i in rng.integers(0, len(ds), k):
            ds[int(i)]
        return k

    out = {"ShardDataset[i]": rate(random_items, seconds)}
    for kind in ("DataLoader", "batch_loader"):
        for n_workers in workers:
            sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * 8)
            if kind == "DataLoader":
                loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=n_workers,
                                    persistent_workers=n_workers > 0)
            else:  # what the trainer uses: one read_batch per batch, no per-item arrays
                loader = batch_loader(ds, sampler, batch_size, num_workers=n_workers,
                                      persistent_workers=n_workers > 0)

            def batches(loader=loader) -> int:
                return sum(len(b["image"]) for b in loader)

            out[f"{kind} {n_workers}w"] = rate(batches, seconds)
            del loader
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="SDSS cutouts to pack")
    parser.add_argument("--n-colour", type=int, default=2000, help="224x224 colour images to pack (0: none)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--checksums", choices=["all", "default"], default="all",
                        help="default: only the shards as packed (sum32); all: also with Fletcher32 and without "
                             "checksums, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="with --checksums all: alternate this many times, "
                                                              "best of each")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to time, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = tuple(int(w) for w in args.workers.split(",") if w != "")

    with tempfile.TemporaryDirectory(prefix="sslsky-bench-loader-") as tmp:
        tmp = Path(tmp)
        sets = [("float32 5x107x107", make_cutouts(tmp / "raw", args.n))]
        if args.n_colour:
            sets.append(("uint8 3x224x224", make_colour_images(tmp / "rgb", args.n_colour)))
        print(f"loader benchmark: {os.cpu_count()} CPUs, torch {torch.__version__}, h5py {h5py.__version__} "
              f"(HDF5 {h5py.version.hdf5_version}), one torch thread, batches of {args.batch_size}, page cache warm")
        for label, catalog in sets:
            folders = {}
            for name, fletcher32 in (("sum32", False), ("sum32+f32", True))[:2 if args.checksums == "all" else 1]:
                folders[name] = tmp / f"packed-{catalog.parent.name}-{name}"
                sslsky.data.pack.IMAGE_FLETCHER32 = fletcher32
                status = run_pack(PackConfig(catalog=str(catalog), out=str(folders[name]), shard_size=1024,
                                             progress=False))
                sslsky.data.pack.IMAGE_FLETCHER32 = False
                if status not in (0, 3):
                    raise SystemExit(f"pack failed with status {status}")
            if args.checksums == "all":
                folders["none"] = without_checksums(folders["sum32"], tmp / f"packed-{catalog.parent.name}-none")
            datasets = {name: ShardDataset(folder) for name, folder in folders.items()}
            best: dict[str, dict[str, float]] = {name: {} for name in datasets}
            for _ in range(args.rounds if len(datasets) > 1 else 1):
                for name, ds in datasets.items():
                    for key, value in measures(ds, args.batch_size, args.seconds, workers).items():
                        best[name][key] = max(best[name].get(key, 0.0), value)
            keys = list(next(iter(best.values())))
            n_images = len(next(iter(datasets.values())))
            stored = next(iter(datasets.values())).attrs.get("dtype")
            print(f"\n{label} ({n_images} images, stored {stored}; items are float32, batch_loader batches "
                  f"{stored}), images/s:")
            print(f"  {'checksums':<11}" + "".join(f"{key:>17}" for key in keys))
            for name, values in best.items():
                print(f"  {name:<11}" + "".join(f"{values[key]:17.0f}" for key in keys))
            for name in ("sum32", "sum32+f32"):
                if name in best and "none" in best:
                    cost = [100.0 * (1.0 - best[name][k] / best["none"][k]) for k in keys]
                    print(f"  {'cost ' + name:<11}" + "".join(f"{c:16.1f}%" for c in cost))
            for ds in datasets.values():
                ds.close()


if __name__ == "__main__":
    main()
