"""Benchmark: pretraining methods x encoders at one budget: SimCLR on resnet18 / vit / fusion, and MoCo on resnet18.

    python benchmarks/methods.py --threads 1           # default scale: ~28 min on a shared 2-core CPU (README)
    python benchmarks/methods.py --quick --threads 1   # a few minutes: checks the plumbing, not the science
    python benchmarks/methods.py --device cuda --n-galaxies 40000 --pretrain-steps 20000 --seeds 0,1,2   # a GPU node

After Wei et al. 2022 (SimCLR with a CNN + ViT fusion encoder): which method and encoder give the best frozen
features for morphology with few labels, and at what speed? Stages, each in ``--workdir`` so that a rerun
resumes (the stamps of ``label_efficiency.py``; a killed pretraining continues from its checkpoint):

1. ``sslsky mock``: an SDSS-like survey (``--n-galaxies``, seed 2021) with a known ``morph_class``;
2. ``sslsky pack``;
3. ``sslsky pretrain`` of every ``--configs`` x ``--seeds`` (the pretraining seed), all from
   ``config/pretrain_demo.yaml``: the same train split, 32x32 crops, astro augmentations, batch 32, SGD
   schedule (base_lr 0.24, cosine) and ``--pretrain-steps``; only the method and the encoder differ:

   - ``simclr-resnet18``, ``moco-resnet18``: ResNet-18 with the ImageNet stem of pretrain_demo.yaml;
   - ``simclr-vit``: ``model.arch=vit``, patch 8 (a 4x4 grid on 32 px), depth 6, width 128, 4 heads, MLP
     ratio 4 (``model.stem=hayat``, the default, clears pretrain_demo.yaml's stem: a vit has none);
   - ``simclr-fusion``: ``model.arch=fusion`` with its defaults (Wei et al.: ResNet-18 branch with levels [3],
     ViT branch depth 6, width 128, 4 heads, vit_dim 256) except ``model.fusion.patch_size=8`` (their 12 px
     patches would leave a 2x2 grid with a 8-px border on 32 px crops); its CNN branch has the same ImageNet
     stem as the resnet18 configs;
   - SimCLR: ``model.simclr`` defaults (dim 128, hidden = feature dim, temperature 0.1) and ``model.moco={}``
     to clear pretrain_demo.yaml's MoCo section; MoCo: that section (dim 64, queue 1024, momentum 0.99, T 0.2);
4. per config and seed ``s``, one ``sslsky sweep`` cell set with seed ``s`` (the 750-label train subset and
   the head's seed; the same subsets for every config, nested as the sweep draws them) on the stock
   ``config/eval_morph.yaml``: ``knn`` (k=15, cosine) and ``linear`` test accuracy with ``--labels`` labels
   (linear: ``--epochs`` epochs raised to ``--min-steps`` steps, early stopping as configured), and
   ``cluster`` (k-means with k = 7 classes on the frozen test features: NMI, ARI);
5. the table: per config, mean over seeds ± half their range of each metric (so the spread holds the
   pretraining seed and the label subset together), pretraining images/s (median of the run's logged
   ``images_per_s``: batch rows, two views each, per second), encoder size, wall time of pretraining (per seed)
   and of the evaluation; the majority-class and random-partition baselines.

The table also goes to ``WORKDIR/methods.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hybrid_transfer as ht  # noqa: E402  (label count -> fraction)
import label_efficiency as le  # noqa: E402  (stage helpers, stamps, machine description, epoch rule)
import torch  # noqa: E402

from sslsky.config import SweepConfig  # noqa: E402
from sslsky.eval.sweep import collect, run_sweep  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE  # noqa: E402

REPO = le.REPO
#: Encoder settings on top of config/pretrain_demo.yaml (ResNet-18, ImageNet stem, 32x32 crops).
ARCH_OVERRIDES = {
    "resnet18": [],
    "vit": ["model.arch=vit", "model.stem=hayat", "model.vit.patch_size=8", "model.vit.depth=6",
            "model.vit.width=128", "model.vit.heads=4", "model.vit.mlp_ratio=4"],
    "fusion": ["model.arch=fusion", "model.fusion.patch_size=8"],
}
#: Method settings on top of the same config (its model.moco section is MoCo's; others must clear it).
METHOD_OVERRIDES = {"moco": [], "simclr": ["model.moco={}"]}
#: name -> (method, encoder).
CONFIGS = {"simclr-resnet18": ("simclr", "resnet18"), "simclr-vit": ("simclr", "vit"),
           "simclr-fusion": ("simclr", "fusion"), "moco-resnet18": ("moco", "resnet18")}
PROTOCOLS = ["knn", "linear", "cluster"]
WALL_FILE = "benchmark_wall_s.txt"  # seconds of the pretraining command, in its run folder
DEFAULTS = {"n_galaxies": 5000, "pretrain_steps": 300, "labels": 750, "seeds": "0,1", "epochs": 20,
            "min_steps": 100, "configs": ",".join(CONFIGS), "workdir": "runs/methods"}
QUICK = {"n_galaxies": 400, "pretrain_steps": 20, "labels": 100, "seeds": "0,1", "epochs": 2, "min_steps": 2,
         "configs": ",".join(CONFIGS), "workdir": "runs/methods_quick"}


def pretrain_folder(work: Path, name: str, seed: int) -> Path:
    return work / "pretrain" / name / f"seed{seed}"


def pretrain_overrides(args, work: Path, name: str, seed: int) -> list[str]:
    """The overrides of one pretraining: label_efficiency's schedule, the seed, then method and encoder."""
    method, arch = CONFIGS[name]
    folder = pretrain_folder(work, name, seed)
    common = [o if not o.startswith("run_dir=") else f"run_dir={folder}" for o in le.pretrain_overrides(args, work)]
    return [*common, f"seed={seed}", f"method={method}", *METHOD_OVERRIDES[method], *ARCH_OVERRIDES[arch]]


def median_speed(folder: Path) -> float | None:
    """Median of the run's logged ``images_per_s`` over the windows without a held-out pass.

    A held-out pass at step v runs after step v's record, so it lands in the window that ends at the next
    record; those windows (and the first, which holds the step-0 pass and the warm-up) are left out.
    """
    path = folder / METRICS_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    held_out = {r["step"] for r in records if any(k.startswith("val_") for k in r)}
    speed, previous = [], None
    for r in records:
        if "images_per_s" not in r:
            continue
        if previous is not None and not any(previous <= v < r["step"] for v in held_out):
            speed.append(r["images_per_s"])
        previous = r["step"]
    if not speed:  # every window held a held-out pass (a very short run): all of them
        speed = [r["images_per_s"] for r in records if "images_per_s" in r]
    return statistics.median(speed) if speed else None


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def stage_pretrain(args, work: Path, name: str, seed: int) -> str:
    folder = pretrain_folder(work, name, seed)
    overrides = pretrain_overrides(args, work, name, seed)
    knobs = {"config": str(le.PRETRAIN_CONFIG.relative_to(REPO)), "overrides": overrides}
    if le.check_stamp(folder, knobs, (folder / ENCODER_EXPORT).is_file()):
        note = "skipped: encoder exists"
    else:
        le.write_stamp(folder, knobs)  # before training: an interrupted run resumes from its checkpoints
        t0 = time.perf_counter()
        le.run(le.sslsky_command("pretrain", "--config", str(le.PRETRAIN_CONFIG), *overrides))
        if not (folder / ENCODER_EXPORT).is_file():
            raise SystemExit(f"methods: {name} seed {seed} pretraining stopped before its last step (no "
                             f"{ENCODER_EXPORT} in {folder}); run the same command again to continue")
        # kept for the table of a later, resumed run (a resumed pretraining counts only its last part)
        (folder / WALL_FILE).write_text(f"{time.perf_counter() - t0:.1f}\n")
        note = f"{args.pretrain_steps} steps"
    speed = median_speed(folder)
    return note + (f"; {speed:.0f} images/s (median)" if speed else "")


def stage_eval(args, work: Path, name: str) -> str:
    """knn, linear and cluster of every seed's encoder, each with that seed's label subset."""
    fraction, n = ht.label_fraction(work, args.labels)
    epochs = le.epochs_for(args, n, le.eval_batch_size("morph"))
    failed = 0
    for seed in args.seeds:
        cfg = SweepConfig(ckpt=str(pretrain_folder(work, name, seed) / ENCODER_EXPORT), data_path=str(work / "packed"),
                          out=str(work / "sweep" / name), tasks=["morph"], protocols=PROTOCOLS,
                          label_fractions=[fraction], seeds=[seed], morph_config=str(le.EVAL_CONFIGS["morph"]),
                          overrides=[f"optim.epochs={epochs}", f"optim.min_steps={args.min_steps}",
                                     f"device={args.device}", f"data.num_workers={args.workers}", "plots=false",
                                     "progress=false",
                                     "optim.allow_prior=true"],
                          executor="local")
        print(f"methods: {name} seed {seed}: {'/'.join(PROTOCOLS)} with {n} labels ({epochs} epochs at most)",
              flush=True)
        failed += run_sweep(cfg)
    if failed:
        raise SystemExit(f"methods: {failed} sweep call(s) of {name} had failed cells (see above); rerun to retry")
    return f"{n} labels, linear {epochs} epochs at most"


# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------


def spread(values: list[float], digits: int) -> str:
    """Mean ± half the range, and the count when some seed is missing."""
    if not values:
        return "–"
    return le.fmt_value(sum(values) / len(values), min(values), max(values), digits)


def encoder_size(path: Path) -> tuple[float, int] | None:
    """(millions of encoder weights, feature dim) of an ``encoder.pt``."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return sum(t.numel() for t in state["encoder"].values()) / 1e6, int(state["feature_dim"])


def build_table(args, work: Path, stages: le.Stages) -> tuple[list[str], list[str]]:
    """(markdown table lines with the baseline rows, notes)."""
    fraction, n = ht.label_fraction(work, args.labels)
    times = {name: elapsed for name, elapsed, _ in stages.times}
    table = ["| pretraining | encoder | weights (M) / feature dim | images/s | kNN accuracy | linear accuracy | NMI | "
             "ARI | pretrain s / seed | eval s (all seeds) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    majority: list[float] = []
    majority_class: set = set()
    chance: dict = {"nmi": [], "ari": [], "k": "?"}
    prior_only: list[str] = []
    for name in args.configs:
        method, arch = CONFIGS[name]
        folder = work / "sweep" / name
        rows = [r for r in (collect(folder) if folder.is_dir() else []) if int(r["seed"]) in args.seeds
                and round(float(r["label_fraction"]), 12) == round(fraction, 12)]
        metric = {(protocol, key): [float(r[key]) for r in rows if r["protocol"] == protocol and r.get(key) is not None]
                  for protocol, key in (("knn", "accuracy"), ("linear", "accuracy"), ("cluster", "nmi"),
                                        ("cluster", "ari"))}
        speeds = [s for s in (median_speed(pretrain_folder(work, name, seed)) for seed in args.seeds) if s]
        walls = [pretrain_folder(work, name, seed) / WALL_FILE for seed in args.seeds]
        pretrain_s = [float(path.read_text()) for path in walls if path.is_file()]
        size = encoder_size(pretrain_folder(work, name, args.seeds[0]) / ENCODER_EXPORT)
        done = min((len(v) for v in metric.values()), default=0)
        table.append(f"| {method} | {arch} | {f'{size[0]:.2f} / {size[1]}' if size else '–'} | {spread(speeds, 0)} | "
                     f"{spread(metric[('knn', 'accuracy')], 3)} | {spread(metric[('linear', 'accuracy')], 3)} | "
                     f"{spread(metric[('cluster', 'nmi')], 3)} | {spread(metric[('cluster', 'ari')], 3)} | "
                     f"{spread(pretrain_s, 0)} | "
                     f"{times.get(f'4 eval {name}', 0):.0f} | {done} of {len(args.seeds)} |")
        for row in rows:
            path = folder / "morph" / row["protocol"] / f"frac{float(row['label_fraction']):g}" / \
                f"seed{row['seed']}" / "metrics.json"
            metrics = json.loads(path.read_text())
            if metrics.get("prior_only"):
                prior_only.append(f"{name} {row['protocol']} seed {row['seed']}")
            if name == args.configs[0] and row["protocol"] == "linear":
                majority.append(metrics["majority_baseline"]["accuracy"])
                majority_class.add(metrics["majority_baseline"]["class"])
            if name == args.configs[0] and "random_partition_baseline" in metrics:
                chance["k"] = metrics["cluster"]["k"]
                chance["nmi"].append(metrics["random_partition_baseline"]["nmi"])
                chance["ari"].append(metrics["random_partition_baseline"]["ari"])
    if majority:
        table.append(f"| majority class ({', '.join(sorted(map(str, majority_class)))}) of the labels | – | – | – | "
                     f"{spread(majority, 3)} | {spread(majority, 3)} | – | – | – | – | – |")
    if chance["nmi"]:
        table.append(f"| random partition (k = {chance['k']}) | – | – | – | – | – | {spread(chance['nmi'], 3)} | "
                     f"{spread(chance['ari'], 3)} | – | – | – |")
    notes = [f"{n} train labels = label fraction {fraction:.4g} of the train split",
             "linear cells that kept only the prior (reported anyway, optim.allow_prior=true): "
             + (", ".join(prior_only) if prior_only else "none")]
    return table, notes


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-galaxies", type=int, help=f"mock survey size (default {DEFAULTS['n_galaxies']})")
    parser.add_argument("--configs", help=f"method-encoder pairs, comma-separated (default {DEFAULTS['configs']})")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"pretraining steps of batch 32, every config and seed (default "
                             f"{DEFAULTS['pretrain_steps']})")
    parser.add_argument("--labels", type=int, help=f"labelled train galaxies of knn / linear (default "
                                                   f"{DEFAULTS['labels']})")
    parser.add_argument("--seeds", help=f"pretraining + label-subset seeds, comma-separated (default "
                                        f"{DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"linear-probe epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--min-steps", type=int, help="raise the linear-probe epochs to this many steps "
                                                      f"(default {DEFAULTS['min_steps']})")
    le.add_run_args(parser, DEFAULTS, QUICK)
    args = le.parse_run_args(parser, argv, DEFAULTS, QUICK)
    args.configs = [c for c in str(args.configs).split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--configs: choose from {', '.join(CONFIGS)} (got {', '.join(args.configs) or 'none'})")
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x]
    if not args.seeds:
        parser.error("--seeds: give at least one")
    if args.labels < 1:
        parser.error("--labels must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    session = le.start("methods", args, argv)
    work, stages = session.work, session.stages
    stages.run("1 mock", le.stage_mock, args, work)
    stages.run("2 pack", le.stage_pack, args, work)
    for name in args.configs:
        for seed in args.seeds:
            stages.run(f"3 {name} seed {seed}", stage_pretrain, args, work, name, seed)
    for name in args.configs:
        stages.run(f"4 eval {name}", stage_eval, args, work, name)

    table, notes = build_table(args, work, stages)
    le.write_report(session, "Pretraining methods and encoders", [
        f"Mock SDSS survey of {args.n_galaxies} galaxies (train/val/test 80/10/10 by object id); every config "
        f"pretrained {args.pretrain_steps} steps of batch 32 on 32×32 crops (config/pretrain_demo.yaml, same "
        f"augmentations and schedule; only method and encoder differ); downstream: 7-class morph_class on the "
        f"fixed test split, frozen features; seeds {', '.join(map(str, args.seeds))} (seed s = pretraining seed s "
        f"and label subset / head / k-means seed s); values are the mean over seeds ± half their range.", "",
        *table, "", *[f"- {line}" for line in notes]], where=f"per-cell metrics in {work / 'sweep'}")

if __name__ == "__main__":
    main()
