"""What does a frozen encoder know? Linear probes of the mock survey's known truth.

    python benchmarks/probe_features.py --data runs/label_efficiency/packed \\
        --catalog runs/label_efficiency/mock/catalog.fits runs/label_efficiency/pretrain/encoder.pt

For each checkpoint (and, as the control, the same network with random weights) the frozen features of the
train, val and test rows (eval transform: the centred crop and normalisation of pretraining) are fitted by
ridge regression (NumPy, closed form, features standardised on train, the ridge strength picked on val) to
quantities the mock knows exactly, and the test R^2 is printed. A representation that only kept what
instance discrimination needs (brightness, colour, size) shows high R^2 there and little for shape, bars
or arms -- the contrastive "feature suppression" of Chen et al. 2021 -- while a random network is the floor
of what the input transform alone gives a linear read-out.

Targets (catalog columns of ``sslsky mock``): r magnitude, g-r and u-r colours, redshift, log10 of the
half-light radius, the axis ratio of smooth galaxies (bulge_q, rows with morph_class 0-2), bar presence
among face-on disks (has_bar, classes 4-5), arm strength (arm_frac, classes 4-5) and merger flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslsky.config import EvalMorphConfig, load_config  # noqa: E402
from sslsky.devices import resolve_device  # noqa: E402
from sslsky.eval.backbone import build_backbone  # noqa: E402
from sslsky.eval.features import extract_features  # noqa: E402
from sslsky.eval.task import open_splits  # noqa: E402

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)


def targets(catalog) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """name -> (values (N,), rows used (N,) bool or None for all), in catalog row order."""
    cls = np.asarray(catalog["morph_class"])
    disk = np.isin(cls, (4, 5))
    smooth = np.isin(cls, (0, 1, 2))
    return {
        "r magnitude": (np.asarray(catalog["mag_r"], float), None),
        "g-r colour": (np.asarray(catalog["mag_g"], float) - np.asarray(catalog["mag_r"], float), None),
        "u-r colour": (np.asarray(catalog["mag_u"], float) - np.asarray(catalog["mag_r"], float), None),
        "redshift": (np.asarray(catalog["z_true"], float), None),
        "log10 half-light radius": (np.log10(np.asarray(catalog["r50"], float)), None),
        "axis ratio (smooth)": (np.asarray(catalog["bulge_q"], float), smooth),
        "bar (face-on disks)": (np.asarray(catalog["has_bar"], float), disk),
        "arm flux fraction (face-on disks)": (np.asarray(catalog["arm_frac"], float), disk),
        "merger": (np.asarray(catalog["is_merger"], float), None),
    }


def ridge_r2(train_x, train_y, val_x, val_y, test_x, test_y) -> float:
    """Test R^2 of ridge regression, the strength picked by val R^2; features standardised on train."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs = [(x - mean) / std for x in (train_x, val_x, test_x)]
    y_mean = train_y.mean()
    gram = xs[0].T @ xs[0]
    rhs = xs[0].T @ (train_y - y_mean)

    def fit(lam: float) -> np.ndarray:
        return np.linalg.solve(gram + lam * len(train_y) * np.eye(len(gram)), rhs)

    def r2(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        resid = y - (x @ w + y_mean)
        return 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())

    best = max(LAMBDAS, key=lambda lam: r2(fit(lam), xs[1], val_y))
    return r2(fit(best), xs[2], test_y)


def features(ckpt: str, data: str, random: bool, device: str) -> dict[str, dict]:
    cfg = load_config(EvalMorphConfig, None, [f"ckpt={ckpt}", f"data.path={data}", "data.num_workers=0",
                                               f"protocol={'scratch' if random else 'linear'}", f"device={device}"])
    dev = resolve_device(cfg.device)
    splits = open_splits(cfg, "morph_class")
    import torch

    torch.manual_seed(0)
    backbone = build_backbone(cfg, splits.attrs, dev)
    return {name: extract_features(backbone.encoder, backbone.transform, getattr(splits, name), cfg, dev)
            for name in ("train", "val", "test")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", help="encoder checkpoints (sslsky encoder.pt or any load_encoder layout)")
    parser.add_argument("--data", required=True, help="packed shards of the mock survey")
    parser.add_argument("--catalog", required=True, help="the mock's catalog.fits (truth columns)")
    parser.add_argument("--names", help="comma-separated column names for the checkpoints (default: folder names)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from astropy.table import Table

    catalog = Table.read(args.catalog)
    row_of = {int(i): k for k, i in enumerate(catalog["object_id"])}
    truth = targets(catalog)
    names = args.names.split(",") if args.names else [Path(c).parent.name for c in args.ckpts]
    runs = [("random init", args.ckpts[0], True)] + [(n, c, False) for n, c in zip(names, args.ckpts)]
    table: dict[str, list[str]] = {name: [] for name in truth}
    for label, ckpt, random in runs:
        feats = features(ckpt, args.data, random, args.device)
        catalog_rows = {split: np.array([row_of[int(i)] for i in f["object_id"]]) for split, f in feats.items()}
        for name, (values, mask) in truth.items():
            parts = []
            for split in ("train", "val", "test"):
                rows = catalog_rows[split]
                keep = np.ones(len(rows), bool) if mask is None else mask[rows]
                keep &= np.isfinite(values[rows])
                parts += [feats[split]["features"][keep].astype(np.float64), values[rows][keep]]
            table[name].append(f"{ridge_r2(*parts):.2f}")
        print(f"probe_features: {label} done", file=sys.stderr, flush=True)
    print("| target (test R²) | " + " | ".join(label for label, _, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
