"""Benchmark: does image–symbol–text alignment (GalaxAlign) help low-label morphology on the mock? (issue 13)

    python benchmarks/align.py --threads 1            # default scale: ~40 min on one thread of a shared 2-core CPU
    python benchmarks/align.py --quick --threads 1    # a few minutes: checks the plumbing, not the science
    python benchmarks/align.py --device cuda --n-galaxies 40000 --pretrain-steps 20000 --align-steps 4000 \\
        --seeds 0,1,2                                  # a GPU node

After Wang, Wang & Luo 2024 (arXiv 2411.19475): fine-tune an encoder by aligning the galaxy images with
schematic symbols and captions of their class, then use it zero-shot (nearest class prototype), fine-tuned
on the same few labels, or for retrieval. Everything starts from one encoder. Stages, each in ``--workdir``
so that a rerun resumes (the stamps of ``label_efficiency.py``; a killed pretraining continues from its
checkpoint, finished evaluation cells are kept):

1. ``sslsky mock``: an SDSS-like survey (``--n-galaxies``, seed 2021) with a known ``morph_class`` (7 classes);
2. ``sslsky pack``;
3. ``sslsky pretrain`` of MoCo v2 (``config/pretrain_demo.yaml``: ResNet-18, ImageNet stem, 32x32 crops;
   ``--pretrain-steps``): the common starting encoder;
4. per label fraction f (``--fractions``) and seed s (``--seeds``):

   a. ``sslsky pretrain --config config/pretrain_align.yaml`` with ``model.align.init`` = the MoCo encoder,
      ``data.label_fraction=f data.label_seed=s`` (align learns only from the labels of the train subset that
      ``eval-morph label_fraction=f seed=s`` takes, so it never sees more labels than the fine-tuning it is
      compared with) and ``seed=s``; ``--align-steps`` split evenly over the config's two stages (stage 1:
      images and symbols through the image tower against the captions; stage 2: a symbol tower of its own,
      three-way loss); ``data.batch_size`` = ``--align-batch`` (default: the config's 32, lowered to the number
      of labelled galaxies at the smallest fraction, since a batch is drawn from them only);
   b. ``sslsky sweep`` cells on the stock ``config/eval_morph.yaml``, all with ``label_fraction=f seed=s`` and
      the same schedule (``optim.epochs`` = ``--epochs`` raised to ``--min-steps`` optimizer steps, early
      stopping as configured, ``optim.allow_prior=true`` so a cell that kept only the prior is reported, not
      dropped): ``zeroshot`` and ``finetune`` of the align encoder; ``finetune`` of the MoCo encoder and
      ``scratch`` (the same ResNet-18 from random weights);
   c. retrieval on the test split: ``sslsky embed`` (split=test) and ``sslsky search --evaluate k=--k`` for
      image -> image on the align encoder's features and (``space=aligned``) on its shared space, where the
      class captions' and symbols' prototypes are also queries (text -> image, symbol -> image; 7 queries);
      image -> image of the MoCo encoder's features once (stage 3's encoder: no f or s in it);
5. the tables: test accuracy per fraction and protocol, retrieval mAP@k / precision@k (relevant = same class),
   mean over seeds ± half their range, the majority-class baseline, each stage's wall time.

The table also goes to ``WORKDIR/align.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import label_efficiency as le  # noqa: E402  (stage helpers, stamps, machine description, epoch rule)
import methods as mb  # noqa: E402  (mean ± half range, median images/s)

from sslsky.config import SweepConfig  # noqa: E402
from sslsky.data.shards import ShardDataset  # noqa: E402
from sslsky.data.verify import file_sha256  # noqa: E402
from sslsky.eval.sweep import run_sweep  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT  # noqa: E402

REPO = le.REPO
ALIGN_CONFIG = REPO / "config" / "pretrain_align.yaml"
MORPH_CONFIG = le.EVAL_CONFIGS["morph"]
WALL_FILE = mb.WALL_FILE
#: Table columns: (sweep folder key, protocol, heading).
CELLS = (("align", "zeroshot", "zero-shot (align)"), ("align", "finetune", "align + finetune"),
         ("moco", "finetune", "finetune (MoCo)"), ("moco", "scratch", "scratch"))
#: Retrieval rows: (embeddings name, result key, heading).
RETRIEVAL = (("moco_features", "image_to_image", "image → image, MoCo features"),
             ("align_features", "image_to_image", "image → image, align encoder features"),
             ("align_aligned", "image_to_image", "image → image, align shared space"),
             ("align_aligned", "text_to_image", "text → image, align (caption prototypes)"),
             ("align_aligned", "symbol_to_image", "symbol → image, align (symbol prototypes)"))
DEFAULTS = {"n_galaxies": 3000, "pretrain_steps": 300, "align_steps": 200, "align_batch": 0, "fractions": "0.01,0.1",
            "seeds": "0,1", "epochs": 15, "min_steps": 60, "k": 10, "workdir": "runs/align"}
QUICK = {"n_galaxies": 500, "pretrain_steps": 20, "align_steps": 10, "align_batch": 0, "fractions": "0.05,0.1",
         "seeds": "0,1", "epochs": 2, "min_steps": 2, "k": 10, "workdir": "runs/align_quick"}


def tag(fraction: float, seed: int) -> str:
    return f"frac{fraction:g}_seed{seed}"


def align_folder(work: Path, fraction: float, seed: int) -> Path:
    return work / "align" / tag(fraction, seed)


def labelled(work: Path, fraction: float, seed: int) -> int:
    """Labelled train galaxies of ``eval-morph label_fraction=fraction seed=seed`` (= align's subset)."""
    return len(ShardDataset(work / "packed", split="train", label="morph_class", label_fraction=fraction, seed=seed))


def align_batch(args, work: Path) -> int:
    """``--align-batch``, or the config's batch lowered to the smallest labelled subset; an error if too big."""
    import yaml

    fewest = min(labelled(work, f, s) for f in args.fractions for s in args.seeds)
    batch = args.align_batch or min(int(yaml.safe_load(ALIGN_CONFIG.read_text())["data"]["batch_size"]), fewest)
    if batch > fewest:
        raise SystemExit(f"align: --align-batch {batch} exceeds the {fewest} labelled train galaxies of the smallest "
                         f"label fraction (align draws its batches from them); lower it")
    if batch < 2:
        raise SystemExit(f"align: the smallest label subset holds {fewest} galaxies: too few for a contrastive batch; "
                         f"raise --n-galaxies or the smallest --fractions")
    return batch


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def stage_align(args, work: Path, fraction: float, seed: int) -> str:
    folder = align_folder(work, fraction, seed)
    steps, batch = args.align_steps, align_batch(args, work)
    schedule = argparse.Namespace(**{**vars(args), "pretrain_steps": steps})
    first = steps // 2
    stages = (f"model.align.stages=[{{steps: {first}, symbol_tower: image, image_text: 1.0, symbol_text: 1.0}}, "
              f"{{steps: {steps - first}, symbol_tower: own, image_text: 1.0, image_symbol: 1.0, symbol_text: 1.0}}]")
    overrides = [o if not o.startswith("run_dir=") else f"run_dir={folder}"
                 for o in le.pretrain_overrides(schedule, work)]
    overrides += [f"seed={seed}", f"model.align.init={work / 'pretrain' / ENCODER_EXPORT}",
                  f"data.label_fraction={fraction}", f"data.label_seed={seed}", f"data.batch_size={batch}", stages]
    knobs = {"config": str(ALIGN_CONFIG.relative_to(REPO)), "overrides": overrides,
             "init_sha256": file_sha256(work / "pretrain" / ENCODER_EXPORT)}
    if le.check_stamp(folder, knobs, (folder / ENCODER_EXPORT).is_file()):
        note = "skipped: encoder exists"
    else:
        le.write_stamp(folder, knobs)  # before training: an interrupted run resumes from its checkpoints
        t0 = time.perf_counter()
        le.run(le.sslsky_command("pretrain", "--config", str(ALIGN_CONFIG), *overrides))
        if not (folder / ENCODER_EXPORT).is_file():
            raise SystemExit(f"align: the align run {folder} stopped before its last step (no {ENCODER_EXPORT}); run "
                             f"the same command again to continue from its checkpoint")
        (folder / WALL_FILE).write_text(f"{time.perf_counter() - t0:.1f}\n")
        note = f"{steps} steps of batch {batch}"
    speed = mb.median_speed(folder)
    return f"{labelled(work, fraction, seed)} labelled galaxies; {note}" + (f"; {speed:.0f} images/s" if speed else "")


def sweep_folder(work: Path, which: str, fraction: float, seed: int) -> Path:
    return work / "sweep" / ("moco" if which == "moco" else f"align_{tag(fraction, seed)}")


def cell_metrics(work: Path, which: str, protocol: str, fraction: float, seed: int) -> Path:
    return sweep_folder(work, which, fraction, seed) / "morph" / protocol / f"frac{fraction:g}" / f"seed{seed}" / \
        "metrics.json"


def check_cells(work: Path, which: str, protocols: list[str], fraction: float, seed: int, epochs: int,
                ckpt_sha: str) -> None:
    """Finished cells must come from this encoder and schedule (run_sweep keeps any cell with a metrics.json)."""
    for protocol in protocols:
        path = cell_metrics(work, which, protocol, fraction, seed)
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        old = (metrics.get("config") or {}).get("optim", {}).get("epochs")
        if metrics.get("ckpt_sha256") != ckpt_sha or (protocol != "zeroshot" and old != epochs):
            raise SystemExit(f"align: {path} was made with another encoder or schedule (epochs {old}, now {epochs}); "
                             f"use another --workdir or delete {path.parent}")


def stage_eval(args, work: Path, fraction: float, seed: int) -> str:
    """zeroshot + finetune of the align encoder, finetune of the MoCo encoder, scratch: all at (f, s)."""
    n = labelled(work, fraction, seed)
    epochs = le.epochs_for(args, n, le.eval_batch_size("morph"))
    failed = 0
    encoders = (("align", align_folder(work, fraction, seed) / ENCODER_EXPORT, ["zeroshot", "finetune"]),
                ("moco", work / "pretrain" / ENCODER_EXPORT, ["finetune", "scratch"]))
    for which, ckpt, protocols in encoders:
        check_cells(work, which, protocols, fraction, seed, epochs, file_sha256(ckpt))
        cfg = SweepConfig(ckpt=str(ckpt), data_path=str(work / "packed"),
                          out=str(sweep_folder(work, which, fraction, seed)),
                          tasks=["morph"], protocols=protocols, label_fractions=[fraction], seeds=[seed],
                          morph_config=str(MORPH_CONFIG),
                          overrides=[f"optim.epochs={epochs}", f"optim.min_steps={args.min_steps}",
                                     f"device={args.device}", f"data.num_workers={args.workers}", "plots=false",
                                     "progress=false",
                                     "optim.allow_prior=true"],
                          executor="local")
        print(f"align: {which} encoder, {'/'.join(protocols)} with {n} labels (fraction {fraction:g}, seed {seed}; "
              f"{epochs} epochs at most)", flush=True)
        failed += run_sweep(cfg)
    if failed:
        raise SystemExit(f"align: {failed} sweep call(s) at fraction {fraction:g} seed {seed} had failed cells (see "
                         f"above); rerun to retry them, the finished ones are kept")
    return f"{n} labels, {epochs} epochs at most"


def retrieval_file(work: Path, name: str, fraction: float | None = None, seed: int | None = None) -> Path:
    """``search --evaluate``'s JSON of one embeddings file; its folder also holds the file and the stamp."""
    return work / "retrieval" / ("moco" if fraction is None else tag(fraction, seed)) / name / "eval.json"


def embed_and_evaluate(args, work: Path, ckpt: Path, space: str, out_json: Path) -> str:
    """``sslsky embed`` of the test split, then ``sslsky search --evaluate``; skipped when done for this encoder."""
    knobs = {"ckpt_sha256": file_sha256(ckpt), "space": space, "k": args.k}
    if le.check_stamp(out_json.parent, knobs, out_json.is_file()):
        return "skipped"
    le.write_stamp(out_json.parent, knobs)
    embeddings = out_json.parent / "embeddings.h5"
    embeddings.unlink(missing_ok=True)
    le.run(le.sslsky_command("embed", "--ckpt", str(ckpt), "--data", str(work / "packed"), "--out", str(embeddings),
                             "--space", space, "split=test", f"device={args.device}", f"num_workers={args.workers}",
                             "progress=false"))
    le.run(le.sslsky_command("search", "--embeddings", str(embeddings), "--evaluate", "--k", str(args.k),
                             f"eval_json={out_json}"))
    return "done"


def stage_retrieval_moco(args, work: Path) -> str:
    return embed_and_evaluate(args, work, work / "pretrain" / ENCODER_EXPORT, "features",
                              retrieval_file(work, "moco_features"))


def stage_retrieval(args, work: Path, fraction: float, seed: int) -> str:
    ckpt = align_folder(work, fraction, seed) / ENCODER_EXPORT
    notes = [embed_and_evaluate(args, work, ckpt, space, retrieval_file(work, f"align_{space}", fraction, seed))
             for space in ("features", "aligned")]
    return f"features {notes[0]}, aligned {notes[1]}"


# ---------------------------------------------------------------------------
# The tables.
# ---------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def build_tables(args, work: Path) -> tuple[list[str], list[str], list[str]]:
    """(accuracy table, retrieval table, notes) in markdown."""
    heads = [head for _, _, head in CELLS]
    acc = ["| fraction | train labels | " + " | ".join(heads) + " | zero-shot text / symbol only | majority class |",
           "|---|---|" + "---|" * len(heads) + "---|---|"]
    prior_only, best_epochs = [], []
    for fraction in args.fractions:
        counts = sorted({labelled(work, fraction, s) for s in args.seeds})
        values, text, symbol, majority = {}, [], [], []
        for which, protocol, head in CELLS:
            values[head] = []
            for seed in args.seeds:
                m = read_json(cell_metrics(work, which, protocol, fraction, seed))
                if m is None:
                    continue
                values[head].append(m["accuracy"])
                if protocol == "zeroshot":
                    text.append(m["accuracy_text"])
                    symbol.append(m["accuracy_symbol"])
                else:
                    best_epochs.append(f"{head} {fraction:g}/s{seed}: {m.get('best_epoch')}/{m.get('epochs_run')}")
                if m.get("prior_only"):
                    prior_only.append(f"{head} fraction {fraction:g} seed {seed}")
                if "majority_baseline" in m and head == "scratch":
                    majority.append(m["majority_baseline"]["accuracy"])
        acc.append(f"| {fraction:g} | {'/'.join(map(str, counts))} | "
                   + " | ".join(mb.spread(values[h], 3) for h in heads)
                   + f" | {mb.spread(text, 3)} / {mb.spread(symbol, 3)} | {mb.spread(majority, 3)} |")
    ret = [f"| query → database (test split) | fraction | mAP@{args.k} | precision@{args.k} | queries |",
           "|---|---|---|---|---|"]
    for name, key, head in RETRIEVAL:
        grid = [(None, None)] if name == "moco_features" else [(f, s) for f in args.fractions for s in args.seeds]
        for fraction in ([None] if name == "moco_features" else args.fractions):
            found = [read_json(retrieval_file(work, name, f, s)) for f, s in grid if f == fraction]
            found = [r[key] for r in found if r is not None and key in r]
            if not found:
                continue
            queries = sorted({r["queries"] for r in found})
            ret.append(f"| {head} | {'–' if fraction is None else f'{fraction:g}'} | "
                       f"{mb.spread([r['map_at_k'] for r in found], 3)} | "
                       f"{mb.spread([r['precision_at_k'] for r in found], 3)} | {'/'.join(map(str, queries))} |")
    chance = read_json(retrieval_file(work, "moco_features"))
    notes = ["cells that kept only the prior (reported anyway, optim.allow_prior=true): "
             + (", ".join(prior_only) if prior_only else "none"),
             "best / run epochs of the trained cells: " + "; ".join(best_epochs)]
    if chance:
        notes.append(f"chance class agreement of the test split (a random neighbour shares the class): "
                     f"{chance['chance_class_agreement']:.3f}")
    return acc, ret, notes


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-galaxies", type=int, help=f"mock survey size (default {DEFAULTS['n_galaxies']})")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"MoCo v2 steps of batch 32: the starting encoder (default {DEFAULTS['pretrain_steps']})")
    parser.add_argument("--align-steps", type=int,
                        help=f"align steps, half per stage (default {DEFAULTS['align_steps']})")
    parser.add_argument("--align-batch", type=int, help="align batch (default 0: the config's 32, at most the "
                                                        "smallest labelled subset)")
    parser.add_argument("--fractions", help=f"label fractions, comma-separated (default {DEFAULTS['fractions']})")
    parser.add_argument("--seeds", help=f"label-subset / align / head seeds, comma-separated (default "
                                        f"{DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"finetune / scratch epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--min-steps", type=int, help="raise the epochs of small label sets to this many optimizer "
                                                      f"steps (default {DEFAULTS['min_steps']})")
    parser.add_argument("--k", type=int, help=f"retrieval depth of mAP@k / precision@k (default {DEFAULTS['k']})")
    le.add_run_args(parser, DEFAULTS, QUICK, ranks=1)
    args = le.parse_run_args(parser, argv, DEFAULTS, QUICK)
    args.fractions = sorted(float(x) for x in str(args.fractions).split(",") if x)
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x]
    if not args.fractions or any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    if not args.seeds:
        parser.error("--seeds: give at least one")
    if args.align_steps < 2 or args.pretrain_steps < 1 or args.k < 1 or args.align_batch < 0:
        parser.error("--align-steps must be >= 2 (two stages), --pretrain-steps and --k >= 1, --align-batch >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    session = le.start("align", args, argv)
    work, stages = session.work, session.stages
    stages.run("1 mock", le.stage_mock, args, work)
    stages.run("2 pack", le.stage_pack, args, work)
    stages.run("3 pretrain moco", le.stage_pretrain, args, work)
    stages.run("3 retrieval moco", stage_retrieval_moco, args, work)
    for fraction in args.fractions:
        for seed in args.seeds:
            stages.run(f"4a align {tag(fraction, seed)}", stage_align, args, work, fraction, seed)
            stages.run(f"4b eval {tag(fraction, seed)}", stage_eval, args, work, fraction, seed)
            stages.run(f"4c retrieval {tag(fraction, seed)}", stage_retrieval, args, work, fraction, seed)

    acc, ret, notes = build_tables(args, work)
    batch = align_batch(args, work)
    le.write_report(session, "Image–symbol–text alignment", [
        f"Mock SDSS survey of {args.n_galaxies} galaxies (seed {le.MOCK_SEED}; train/val/test 80/10/10 by object "
        f"id), 7-class morph_class. Starting encoder: MoCo v2, {args.pretrain_steps} steps of batch 32 "
        f"(config/pretrain_demo.yaml, ResNet-18, 32×32 crops). Align: config/pretrain_align.yaml from it, "
        f"{args.align_steps} steps of batch {batch} (half per stage), on the labelled train subset of each "
        f"fraction and seed only. Evaluation: config/eval_morph.yaml, test-split accuracy, epochs "
        f"{args.epochs} raised to {args.min_steps} steps; seeds {', '.join(map(str, args.seeds))} (seed s = the "
        f"label subset, the align run's seed and the head's seed; one MoCo pretraining); values are the mean over "
        f"seeds ± half their range.", "", *acc, "", *ret, "", *[f"- {line}" for line in notes]],
        where=f"per-cell metrics in {work / 'sweep'}, retrieval in {work / 'retrieval'}")


if __name__ == "__main__":
    main()
