"""Benchmark: which pretraining transfers best to low-label morphology? moco, byol, hybrid, votes-only.

    python benchmarks/hybrid_transfer.py --threads 1     # default scale: ~1.5 h on a shared 2-core CPU (README)
    python benchmarks/hybrid_transfer.py --quick         # a few minutes: checks the plumbing, not the science
    python benchmarks/hybrid_transfer.py --n-galaxies 40000 --labels 750,7500 --pretrain-steps 30000 \\
        --finetune-labels 750,7500 --seeds 0,1,2 --device cuda                   # a GPU node

After Walmsley et al. 2022 ("Towards Galaxy Foundation Models with Hybrid Contrastive Learning"): the
hybrid of BYOL and the Dirichlet-multinomial vote loss should transfer best when the downstream task has
few labels. Stages, each in ``--workdir`` so that a rerun resumes:

1. ``sslsky mock``: an SDSS-like survey with volunteer votes for ``1 - --unlabelled`` of the galaxies (the
   others have none: BYOL sees them, the vote loss does not);
2. ``sslsky pack``;
3. ``sslsky pretrain`` once per ``--methods`` (default moco, byol, hybrid, votes), all from
   ``config/pretrain_demo.yaml`` (ResNet-18, ImageNet stem, 32x32 crops, the same astro augmentations,
   seed, batch and step count), on the train split; only ``method`` differs (byol, hybrid and votes also
   reset the config's MoCo section, ``model.moco={}``: another method's changed section is a config error);
4. transfer to the catalog's ``morph_class`` (7 classes) with ``--labels`` labelled train galaxies (a
   seeded subset per ``--seeds``, nested across counts; the same subsets for every method): ``linear``
   probe and ``knn`` (k=15, cosine) on the frozen features of every method at every label count;
   ``finetune`` of every method and ``scratch`` (the same network from random weights) at
   ``--finetune-labels`` only (fine-tuning on thousands of labels for every method does not fit the CPU
   budget; pass ``--finetune-labels 750,7500`` on a bigger machine). All through ``sslsky sweep`` with the
   stock ``config/eval_morph.yaml`` plus ``optim.epochs`` (``--epochs``, raised to ``--min-steps``),
   ``device``, ``plots=false``, ``progress=false``;
5. the table: test accuracy and macro-F1 per method, protocol and label count (mean over seeds, +- half
   their range), the majority-class baseline, and each method's gain over MoCo.

The votes are made from the same true morphology the ``morph_class`` labels come from, so vote
pretraining is close to supervised pretraining on the downstream task (as GZ-Evo's votes are for Galaxy Zoo
downstream tasks); what the benchmark measures is how much of that each method keeps with few labels.
The table also goes to ``WORKDIR/hybrid_transfer.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import label_efficiency as le  # noqa: E402  (stage helpers, machine description, epoch rule)

from sslsky.config import SweepConfig  # noqa: E402
from sslsky.data.shards import ShardDataset  # noqa: E402
from sslsky.eval.sweep import collect, run_sweep, summarize  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE  # noqa: E402

REPO = le.REPO
METHODS = ("moco", "byol", "hybrid", "votes")
DEFAULTS = {"n_galaxies": 10000, "pretrain_steps": 2500, "labels": "750,7500", "finetune_labels": "750",
            "seeds": "0,1", "epochs": 20, "min_steps": 100, "unlabelled": 0.5, "methods": ",".join(METHODS),
            "workdir": "runs/hybrid_transfer"}
QUICK = {"n_galaxies": 400, "pretrain_steps": 40, "labels": "30,300", "finetune_labels": "30", "seeds": "0,1",
         "epochs": 2, "min_steps": 2, "unlabelled": 0.5, "methods": ",".join(METHODS),
         "workdir": "runs/hybrid_transfer_quick"}
MORPH_CONFIG = le.EVAL_CONFIGS["morph"]


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def stage_mock(args, work: Path) -> str:
    folder = work / "mock"
    knobs = {"n": args.n_galaxies, "seed": le.MOCK_SEED, "survey": "sdss", "unlabelled_fraction": args.unlabelled}
    if le.check_stamp(folder, knobs, (folder / "catalog.fits").is_file()):
        return "skipped: outputs exist"
    ranks = args.ranks if shutil.which("mpirun") and args.ranks > 1 else 1
    le.run(le.sslsky_command("mock", "--survey", "sdss", "--n", str(args.n_galaxies), "--seed", str(le.MOCK_SEED),
                             "--out", str(folder), f"unlabelled_fraction={args.unlabelled}", "progress=false",
                             ranks=ranks))
    le.write_stamp(folder, knobs)
    return f"{args.n_galaxies} galaxies on {ranks} rank(s)"


def pretrain_overrides(args, work: Path, method: str) -> list[str]:
    """label_efficiency's schedule in ``pretrain_<method>``; a method other than moco clears the config's
    ``model.moco`` section (config/pretrain_demo.yaml is a MoCo config: another method's changed section is a
    config error)."""
    overrides = [f"method={method}", *(["model.moco={}"] if method != "moco" else []),
                 *le.pretrain_overrides(args, work)]
    return [o if not o.startswith("run_dir=") else f"run_dir={work / f'pretrain_{method}'}" for o in overrides]


def stage_pretrain(args, work: Path, method: str) -> str:
    folder = work / f"pretrain_{method}"
    overrides = pretrain_overrides(args, work, method)
    knobs = {"config": str(le.PRETRAIN_CONFIG.relative_to(REPO)), "overrides": overrides}
    if le.check_stamp(folder, knobs, (folder / ENCODER_EXPORT).is_file()):
        note = "skipped: encoder exists"
    else:
        le.write_stamp(folder, knobs)  # before training: an interrupted run resumes from its checkpoints
        le.run(le.sslsky_command("pretrain", "--config", str(le.PRETRAIN_CONFIG), *overrides))
        if not (folder / ENCODER_EXPORT).is_file():
            raise SystemExit(f"hybrid_transfer: {method} pretraining stopped before its last step (no "
                             f"{ENCODER_EXPORT} in {folder}); run the same command again to continue")
        note = f"{args.pretrain_steps} steps"
    records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    speed = sorted(r["images_per_s"] for r in records if "images_per_s" in r)
    if speed:
        note += f"; {speed[len(speed) // 2]:.0f} images/s (median)"
    return note


def label_fraction(work: Path, n_labels: int) -> tuple[float, int]:
    """The label fraction giving ``n_labels`` labelled train galaxies, and the count it really gives."""
    total = len(ShardDataset(work / "packed", split="train", label="morph_class"))
    if n_labels > total:
        raise SystemExit(f"hybrid_transfer: {n_labels} labels asked but the train split has {total} galaxies with a "
                         f"morph_class; raise --n-galaxies")
    fraction = min(1.0, n_labels / total)
    return fraction, le.n_train_labels(work, "morph", fraction)


def sweep_cells(args, work: Path) -> list[tuple[int, float, int, int]]:
    """(labels asked, label fraction, labels it gives, epochs) for each of ``--labels``."""
    batch = le.eval_batch_size("morph")
    out = []
    for n_labels in args.labels:
        fraction, n = label_fraction(work, n_labels)
        out.append((n_labels, fraction, n, le.epochs_for(args, n, batch)))
    return out


def stage_transfer(args, work: Path) -> str:
    """One ``run_sweep`` per (encoder, label count): linear + kNN, and finetune / scratch where asked."""
    notes, failed = [], 0
    for n_labels, fraction, n, epochs in sweep_cells(args, work):
        jobs = [(method, ["linear", "knn"] + (["finetune"] if n_labels in args.finetune_labels else []))
                for method in args.methods]
        if n_labels in args.finetune_labels:
            jobs.append(("scratch", ["scratch"]))
        for name, protocols in jobs:
            method = args.methods[0] if name == "scratch" else name  # scratch: architecture + inputs only
            cfg = SweepConfig(ckpt=str(work / f"pretrain_{method}" / ENCODER_EXPORT), data_path=str(work / "packed"),
                              out=str(work / "sweep" / name), tasks=["morph"], protocols=protocols,
                              label_fractions=[fraction], seeds=args.seeds, morph_config=str(MORPH_CONFIG),
                              overrides=[f"optim.epochs={epochs}", f"optim.min_steps={args.min_steps}",
                                         f"device={args.device}", f"data.num_workers={args.workers}", "plots=false",
                                         "progress=false",
                                         *args.eval_overrides],
                              executor="local")
            print(f"hybrid_transfer: {name} {'/'.join(protocols)} with {n} labels ({epochs} epochs at most)",
                  flush=True)
            failed += run_sweep(cfg)
        notes.append(f"{n} labels: {epochs} epochs")
    if failed:
        raise SystemExit(f"hybrid_transfer: {failed} sweep call(s) had failed cells (see above); rerun to retry")
    return "; ".join(notes)


# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------


def build_table(args, work: Path) -> tuple[list[str], list[str]]:
    """(markdown table lines, notes) from every sweep's metrics.json."""
    names = [*args.methods, "scratch"]
    rows = {name: collect(work / "sweep" / name) if (work / "sweep" / name).is_dir() else [] for name in names}
    grid = sweep_cells(args, work)
    wanted = {round(f, 12) for _, f, _, _ in grid}
    for name in names:
        rows[name] = [r for r in rows[name] if round(float(r["label_fraction"]), 12) in wanted
                      and int(r["seed"]) in args.seeds]
    series = {(name, metric): summarize(rows[name], metric) for name in names for metric in ("accuracy", "macro_f1")}
    moco = {protocol: {n: mean for n, mean, _, _ in points}
            for protocol, points in series.get(("moco", "accuracy"), {}).items()}
    table = ["| labels | protocol | pretraining | accuracy | macro-F1 | Δ accuracy vs moco |",
             "|---|---|---|---|---|---|"]
    counts = sorted({n for (name, _), by_protocol in series.items() for pts in by_protocol.values() for n, *_ in pts})
    for n in counts:
        for protocol in ("linear", "knn", "finetune", "scratch"):
            for name in names:
                acc = {p[0]: p for p in series[(name, "accuracy")].get(protocol, [])}.get(n)
                f1 = {p[0]: p for p in series[(name, "macro_f1")].get(protocol, [])}.get(n)
                if acc is None:
                    continue
                ref = moco.get(protocol, {}).get(n)
                delta = f"{acc[1] - ref:+.3f}" if ref is not None and name != "moco" and name != "scratch" else "–"
                table.append(f"| {n} | {protocol} | {'none (random init)' if name == 'scratch' else name} | "
                             f"{le.fmt_value(*acc[1:], 3)} | {le.fmt_value(*f1[1:], 3) if f1 else '–'} | {delta} |")
    notes = []
    for _, fraction, n, _ in grid:
        path = work / "sweep" / args.methods[0] / "morph" / "linear" / f"frac{fraction:g}" / f"seed{args.seeds[0]}" \
            / "metrics.json"
        if path.is_file():
            base = json.loads(path.read_text())["majority_baseline"]
            notes.append(f"- {n} labels: majority class ({base['class']}) accuracy {base['accuracy']:.3f}")
    return table, notes


def pretrain_lines(args, work: Path) -> list[str]:
    """The last logged training loss and held-out figure of each method."""
    lines = []
    for method in args.methods:
        path = work / f"pretrain_{method}" / METRICS_FILE
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if any(k.startswith("val_") for k in r)]
        text = f"- {method}: final train loss {train[-1]['loss']:.3f}" if train else f"- {method}:"
        if val:
            text += "; held-out " + ", ".join(f"{k} {v:.3f}" for k, v in val[-1].items()
                                             if k.startswith("val_") and isinstance(v, (int, float)))
        lines.append(text)
    return lines


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-galaxies", type=int, help=f"mock survey size (default {DEFAULTS['n_galaxies']})")
    parser.add_argument("--unlabelled", type=float,
                        help=f"fraction of galaxies without votes (default {DEFAULTS['unlabelled']})")
    parser.add_argument("--methods", help=f"pretraining methods, comma-separated (default {DEFAULTS['methods']})")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"pretraining steps of batch 32, each method (default {DEFAULTS['pretrain_steps']})")
    parser.add_argument("--labels", help=f"downstream label counts (default {DEFAULTS['labels']})")
    parser.add_argument("--finetune-labels",
                        help=f"label counts that also get finetune + scratch (default {DEFAULTS['finetune_labels']})")
    parser.add_argument("--seeds", help=f"label-subset / head seeds (default {DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"supervised epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--min-steps", type=int,
                        help="raise the epochs of small label sets to this many steps "
                             f"(default {DEFAULTS['min_steps']})")
    parser.add_argument("--eval-override", action="append", default=[], dest="eval_overrides", metavar="KEY=VALUE",
                        help="extra eval_morph.yaml override for every cell, e.g. optim.encoder_lr_factor=1.0")
    le.add_run_args(parser, DEFAULTS, QUICK)
    args = le.parse_run_args(parser, argv, DEFAULTS, QUICK)
    args.methods = [m for m in str(args.methods).split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: choose from {', '.join(METHODS)} (got {args.methods})")
    args.labels = sorted(int(x) for x in str(args.labels).split(","))
    args.finetune_labels = [int(x) for x in str(args.finetune_labels).split(",") if x]
    if not set(args.finetune_labels) <= set(args.labels):
        parser.error("--finetune-labels must be among --labels")
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    if not 0 <= args.unlabelled < 1:
        parser.error("--unlabelled must lie in [0, 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    session = le.start("hybrid_transfer", args, argv)
    work, stages = session.work, session.stages
    stages.run("1 mock", stage_mock, args, work)
    stages.run("2 pack", le.stage_pack, args, work)
    for i, method in enumerate(args.methods):
        stages.run(f"3.{i + 1} pretrain {method}", stage_pretrain, args, work, method)
    stages.run("4 transfer", stage_transfer, args, work)

    table, notes = build_table(args, work)
    le.write_report(session, "Pretraining methods on low-label morphology", [
        f"Mock SDSS survey of {args.n_galaxies} galaxies (train/val/test 80/10/10), votes for "
        f"{1 - args.unlabelled:.0%} of them; each method pretrained {args.pretrain_steps} steps of batch 32 "
        f"(ResNet-18, 32×32 crops, config/pretrain_demo.yaml); downstream: 7-class morph_class on the fixed test "
        f"split; seeds {', '.join(map(str, args.seeds))} (label subset and head); mean ± half the seed range.", "",
        *table, "", "Baselines:", *notes, "", "Pretraining:", *pretrain_lines(args, work)])


if __name__ == "__main__":
    main()
