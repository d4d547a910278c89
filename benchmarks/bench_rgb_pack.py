"""Galaxy Zoo-shaped colour cutouts: pack rate and size, uint8 against float32 shards, loader rate.

    python benchmarks/bench_rgb_pack.py [--n 300] [--seconds 4]

Writes the Galaxy-Zoo-shaped mock (424x424 8-bit PNGs, ``sslsky mock --format png``) once into a temp folder,
then packs it four ways and prints, side by side in one run: cutouts/s of ``sslsky pack`` (one rank),
shard bytes per image, and random-batch throughput of ``batch_loader`` (the trainer's loader) -- for
uint8 (dtype=auto) and float32 shards, at the native 424 and resampled to 72 (``image_size=72``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_loader import rate  # same folder
from torch.utils.data import RandomSampler

from sslsky.config import MockConfig, PackConfig
from sslsky.data.mock import run_mock
from sslsky.data.pack import run_pack
from sslsky.data.shards import ShardDataset, batch_loader
from sslsky.machine import describe_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="mock galaxies (424x424 PNGs)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per loader measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(prefix="sslsky-bench-rgb-") as tmp:
        tmp = Path(tmp)
        run_mock(MockConfig(survey="decals", n=args.n, seed=0, out=str(tmp / "gz"), format="png", progress=False))
        catalog = tmp / "gz" / "catalog.fits"
        print(f"{'shards':>22}  {'pack cutouts/s':>14}  {'MB per 1000 images':>18}  {'loader images/s':>15}")
        for size in (0, 72):
            for dtype in ("auto", "float32"):
                out = tmp / f"packed-{size}-{dtype}"
                start = time.perf_counter()
                status = run_pack(PackConfig(catalog=str(catalog), out=str(out), image_size=size, dtype=dtype,
                                             label_column="label", progress=False))
                seconds = time.perf_counter() - start
                if status != 0:
                    raise SystemExit(f"pack failed with status {status}")
                nbytes = sum(p.stat().st_size for p in out.glob("shard-*.h5"))
                ds = ShardDataset(out)
                sampler = RandomSampler(ds, replacement=True, num_samples=args.batch_size * 8)
                loader = batch_loader(ds, sampler, args.batch_size, num_workers=0)

                def batches(loader=loader) -> int:
                    return sum(len(b["image"]) for b in loader)

                label = f"{'424' if not size else size} px {'uint8' if dtype == 'auto' else dtype}"
                print(f"{label:>22}  {args.n / seconds:14.1f}  {nbytes / len(ds) * 1000 / 1e6:18.1f}  "
                      f"{rate(batches, args.seconds):15.0f}", flush=True)
                ds.close()
    print(f"cpus: {os.cpu_count()}; pack and loader on one process, one torch thread; images/s of batches of "
          f"{args.batch_size} from the page cache (uint8 batches become floats on the device)")


if __name__ == "__main__":
    main()
