"""Benchmark: the Galaxy Zoo path with few labels -- does fine-tuning hold against the linear probe and scratch?

    python benchmarks/gz_small_labels.py --threads 1        # default scale: ~1 h on a shared 2-core CPU (README)
    python benchmarks/gz_small_labels.py --quick            # a few minutes: the plumbing, not the science
    python benchmarks/gz_small_labels.py --n-galaxies 20000 --pretrain-steps 20000 --labels 100,400,4000 \\
        --device cuda                                       # a GPU node

The setting of the real-data issue, on the Galaxy-Zoo-shaped mock: 424x424 8-bit PNGs keyed by IAU names,
resampled to 72x72 at pack time, a two-class label (smooth / featured), a few hundred labels. Stages, each
in ``--workdir`` so that a rerun resumes:

1. ``sslsky mock --survey decals --format png`` (the galaxy-datasets catalog: ``id_str``, ``file_loc``, ``label``);
2. ``sslsky pack image_size=72 label_column=label`` (uint8 shards, text ids);
3. ``sslsky pretrain --config config/pretrain_rgb.yaml`` (MoCo v2, ResNet-18, ImageNet stem, 42x42 crops);
4. ``sslsky sweep`` of eval-morph with the stock ``config/eval_morph.yaml``: ``linear``, ``knn``, ``finetune``
   and ``scratch`` at each of ``--labels`` labelled train galaxies, seeds ``--seeds`` (label subset, head
   initialisation, data order; nested subsets across label counts);
5. the table: test accuracy and macro-F1, mean and sample standard deviation over the seeds that gave a
   result, how many seeds were refused because the kept model was only the prior (eval exit 4, no
   metrics.json), the majority-class baseline, and a line per label count saying whether finetune >= linear
   and >= scratch (by the mean).

The table also goes to ``WORKDIR/gz_small_labels.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import label_efficiency as le  # noqa: E402  (stage helpers, machine description)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sslsky.config import SweepConfig  # noqa: E402
from sslsky.data.shards import ShardDataset  # noqa: E402
from sslsky.eval.sweep import collect, run_sweep  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT  # noqa: E402

REPO = le.REPO
PRETRAIN_CONFIG = REPO / "config" / "pretrain_rgb.yaml"
MORPH_CONFIG = le.EVAL_CONFIGS["morph"]
PROTOCOLS = ("linear", "knn", "finetune", "scratch")
IMAGE_SIZE = 72
DEFAULTS = {"n_galaxies": 2500, "pretrain_steps": 2000, "labels": "100,400", "seeds": "0,1,2", "epochs": 0,
            "workdir": "runs/gz_small_labels"}
QUICK = {"n_galaxies": 300, "pretrain_steps": 20, "labels": "60", "seeds": "0,1", "epochs": 2,
         "workdir": "runs/gz_small_labels_quick"}


def stage_mock(args, work: Path) -> str:
    folder = work / "mock"
    knobs = {"n": args.n_galaxies, "seed": le.MOCK_SEED, "survey": "decals", "format": "png"}
    if le.check_stamp(folder, knobs, (folder / "catalog.fits").is_file()):
        return "skipped: outputs exist"
    le.run(le.sslsky_command("mock", "--survey", "decals", "--n", str(args.n_galaxies), "--seed", str(le.MOCK_SEED),
                             "--format", "png", "--out", str(folder), "progress=false"))
    le.write_stamp(folder, knobs)
    return f"{args.n_galaxies} 424x424 PNGs"


def stage_pack(args, work: Path) -> str:
    folder = work / "packed"
    knobs = {"catalog": str(work / "mock" / "catalog.fits"), "image_size": IMAGE_SIZE, "label_column": "label"}
    if le.check_stamp(folder, knobs, (folder / "manifest.json").is_file()):
        return "skipped: outputs exist"
    le.run(le.sslsky_command("pack", "--catalog", str(work / "mock" / "catalog.fits"), "--out", str(folder),
                             f"image_size={IMAGE_SIZE}", "label_column=label", "progress=false"))
    le.write_stamp(folder, knobs)
    return f"resampled to {IMAGE_SIZE}x{IMAGE_SIZE}, uint8"


def stage_pretrain(args, work: Path) -> str:
    folder = work / "pretrain"
    steps = args.pretrain_steps
    overrides = [f"data.path={work / 'packed'}", f"run_dir={folder}", f"optim.total_steps={steps}",
                 f"optim.warmup_steps={max(1, min(100, steps // 20))}", f"val_every={max(1, steps // 10)}",
                 f"checkpoint_every={max(1, min(250, steps // 4))}", f"device={args.device}",
                 "data.num_workers=0", "tensorboard=false", "progress=false"]
    if args.quick:
        overrides += ["data.batch_size=32", "model.moco.queue_size=256", "optim.base_lr=0.24"]
    knobs = {"config": str(PRETRAIN_CONFIG.relative_to(REPO)), "overrides": overrides}
    if le.check_stamp(folder, knobs, (folder / ENCODER_EXPORT).is_file()):
        return "skipped: encoder exists"
    le.write_stamp(folder, knobs)  # before training: an interrupted run resumes from its checkpoints
    le.run(le.sslsky_command("pretrain", "--config", str(PRETRAIN_CONFIG), *overrides))
    if not (folder / ENCODER_EXPORT).is_file():
        raise SystemExit(f"gz_small_labels: pretraining stopped before its last step (no {ENCODER_EXPORT} in "
                         f"{folder}); run the same command again to continue")
    return f"{steps} steps"


def label_cells(args, work: Path) -> list[tuple[int, float, int]]:
    """(labels asked, label fraction, labels it gives) for each of ``--labels``."""
    total = len(ShardDataset(work / "packed", split="train", label="morph_class"))
    out = []
    for n_labels in args.labels:
        if n_labels > total:
            raise SystemExit(f"gz_small_labels: {n_labels} labels asked but the train split has {total}; raise "
                             f"--n-galaxies")
        fraction = min(1.0, n_labels / total)
        out.append((n_labels, fraction, le.n_train_labels(work, "morph", fraction)))
    return out


def stage_transfer(args, work: Path) -> str:
    failed = 0
    overrides = [f"device={args.device}", f"data.num_workers={args.workers}", "plots=false", "progress=false",
                 *([f"optim.epochs={args.epochs}"] if args.epochs else []), *args.eval_overrides]
    for _, fraction, n in label_cells(args, work):
        cfg = SweepConfig(ckpt=str(work / "pretrain" / ENCODER_EXPORT), data_path=str(work / "packed"),
                          out=str(work / "sweep"), tasks=["morph"], protocols=list(PROTOCOLS),
                          label_fractions=[fraction], seeds=args.seeds, morph_config=str(MORPH_CONFIG),
                          overrides=overrides, executor="local")
        print(f"gz_small_labels: {'/'.join(PROTOCOLS)} with {n} labels, seeds {args.seeds}", flush=True)
        failed += run_sweep(cfg)
    if failed:
        print(f"gz_small_labels: {failed} sweep call(s) had cells without a result (failed, or refused as prior "
              f"only: exit 4); the table counts them", flush=True)
    return f"{failed} sweep call(s) with cells missing" if failed else "every cell ran"


def summary(values: list[float]) -> str:
    if not values:
        return "–"
    spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{spread}"


def build_table(args, work: Path) -> tuple[list[str], list[str]]:
    rows = collect(work / "sweep") if (work / "sweep").is_dir() else []
    table = ["| labels | protocol | accuracy | macro-F1 | seeds with a result | refused: prior only |",
             "|---|---|---|---|---|---|"]
    verdicts, baselines = [], []
    for _, fraction, n in label_cells(args, work):
        means = {}
        for protocol in PROTOCOLS:
            cells = [r for r in rows if r.get("protocol") == protocol and int(r["seed"]) in args.seeds
                     and abs(float(r["label_fraction"]) - fraction) < 1e-12]
            acc = [float(r["accuracy"]) for r in cells if r.get("accuracy") not in (None, "")]
            f1 = [float(r["macro_f1"]) for r in cells if r.get("macro_f1") not in (None, "")]
            means[protocol] = np.mean(acc) if acc else None
            refused = sum((work / "sweep" / "morph" / protocol / f"frac{fraction:g}" / f"seed{seed}" /
                           "metrics.prior_only.json").is_file() for seed in args.seeds)
            table.append(f"| {n} | {protocol} | {summary(acc)} | {summary(f1)} | {len(acc)} of {len(args.seeds)} | "
                         f"{refused} |")
        ft, lin, sc = means["finetune"], means["linear"], means["scratch"]
        if None not in (ft, lin, sc):
            verdicts.append(f"- {n} labels: finetune {ft:.3f} vs linear {lin:.3f} ({'>=' if ft >= lin else '<'}) "
                            f"and scratch {sc:.3f} ({'>=' if ft >= sc else '<'})")
        path = work / "sweep" / "morph" / "linear" / f"frac{fraction:g}" / f"seed{args.seeds[0]}" / "metrics.json"
        if path.is_file():
            base = json.loads(path.read_text())["majority_baseline"]
            baselines.append(f"- {n} labels: majority class ({base['class']}) accuracy {base['accuracy']:.3f}")
    return table, verdicts + baselines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-galaxies", type=int, help=f"mock galaxies (default {DEFAULTS['n_galaxies']})")
    parser.add_argument("--pretrain-steps", type=int, help=f"MoCo steps of batch 64 (default "
                                                           f"{DEFAULTS['pretrain_steps']})")
    parser.add_argument("--labels", help=f"labelled train galaxies, comma-separated (default {DEFAULTS['labels']})")
    parser.add_argument("--seeds", help=f"seeds of the supervised stage (default {DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, help="supervised epochs (default 0: config/eval_morph.yaml's)")
    parser.add_argument("--eval-override", action="append", default=[], dest="eval_overrides", metavar="KEY=VALUE",
                        help="extra eval_morph.yaml override for every cell")
    parser.add_argument("--workdir", help=f"outputs, kept for resuming (default {DEFAULTS['workdir']})")
    parser.add_argument("--quick", action="store_true", help="tiny scale (plumbing check)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the evaluation (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads per process (0: torch's choice)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.labels = sorted(int(x) for x in str(args.labels).split(","))
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    started, load_start = time.strftime("%Y-%m-%d %H:%M"), le.load_average()
    print(f"gz_small_labels: {le.machine()}\ngz_small_labels: {command} -> {work}", flush=True)
    stages = le.Stages()
    stages.run("1 mock", stage_mock, args, work)
    stages.run("2 pack", stage_pack, args, work)
    stages.run("3 pretrain", stage_pretrain, args, work)
    stages.run("4 transfer", stage_transfer, args, work)
    table, notes = build_table(args, work)
    md = [f"# Galaxy Zoo shape, few labels ({started})", "",
          f"Galaxy-Zoo-shaped mock of {args.n_galaxies} galaxies (424x424 PNGs resampled to {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"two classes smooth / featured, train/val/test 80/10/10); MoCo v2 {args.pretrain_steps} steps "
          f"(config/pretrain_rgb.yaml); supervised stage config/eval_morph.yaml; test accuracy and macro-F1, mean ± "
          f"standard deviation over seeds {', '.join(map(str, args.seeds))} (label subset, initialisation, data "
          f"order; one pretraining, one test set: their spread is not included).", "",
          *table, "", *notes, "",
          f"Machine: {le.machine()}; load average {load_start} at the start, {le.load_average()} at the end.", "",
          f"Command: `{command}`", "", "Stage times:", "```", *stages.table(), "```", ""]
    out = work / "gz_small_labels.md"
    out.write_text("\n".join(md))
    print("\n" + "\n".join(md), flush=True)


if __name__ == "__main__":
    main()
