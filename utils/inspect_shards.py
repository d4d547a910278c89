"""Summarise a packed folder: manifest, splits, and a read-back check.

    python utils/inspect_shards.py OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sslsky.data.schema import MANIFEST_NAME
from sslsky.data.shards import ShardDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packed", type=Path, help="folder written by `sslsky pack`")
    args = parser.parse_args()

    manifest = json.loads((args.packed / MANIFEST_NAME).read_text())
    print(f"survey {manifest.get('survey')}  bands {manifest.get('bands')}  "
          f"shards {len(manifest['shards'])}  dtype {manifest.get('dtype')}")
    for key, value in manifest.get("counts", {}).items():
        print(f"  {key}: {value}")
    stats = manifest.get("stats") or {}  # per-band lists: bands, median, sigma_mad, p01, p99
    for i, band in enumerate(stats.get("bands", [])):
        keys = [key for key in ("median", "sigma_mad", "p01", "p99") if key in stats]
        values = "  ".join(f"{key} {stats[key][i]:.4g}" for key in keys)
        print(f"  band {band}: {values} nmgy/pix")

    for split in ("train", "val", "test"):
        ds = ShardDataset(args.packed, split=split)
        print(f"split {split:5s}: {len(ds)} galaxies")
    ds = ShardDataset(args.packed)
    start = time.perf_counter()
    fluxes = np.stack([ds[i]["image"].sum(dim=(1, 2)).numpy() for i in range(len(ds))])
    seconds = time.perf_counter() - start
    z = ds.index.columns["z"]
    print(f"read back {len(ds)} cutouts of shape {tuple(ds[0]['image'].shape)} in {seconds:.2f} s "
          f"({len(ds) / seconds:.0f}/s); median z {np.nanmedian(z):.3f}; "
          f"median summed flux per band {np.round(np.median(fluxes, axis=0), 2).tolist()} nmgy")


if __name__ == "__main__":
    main()
