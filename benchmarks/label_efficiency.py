"""Science benchmark: do MoCo v2 representations save labels on a mock SDSS survey? (Hayat et al. 2021, Fig. 6)

    python benchmarks/label_efficiency.py                    # default scale: <= 60 min on 2 idle CPU cores
    python benchmarks/label_efficiency.py --quick            # a few minutes: checks the plumbing, not the science
    python benchmarks/label_efficiency.py --n-galaxies 20000 --pretrain-steps 20000 --seeds 0,1,2   # bigger machines

Stages, each in ``--workdir`` so that a rerun resumes:

1. ``sslsky mock`` (``mpirun -n 2`` when mpirun is here): an SDSS-like survey with known z and morph_class;
2. ``sslsky pack`` into HDF5 shards;
3. ``sslsky pretrain`` (MoCo v2, ``config/pretrain_demo.yaml``: ResNet-18, ImageNet stem, 32x32 crops) on the
   train split for ``--pretrain-steps`` steps; the held-out contrastive top-1 curve is printed;
4. ``sslsky sweep`` (executor local, in this process) for photo-z and morphology: protocols linear, finetune,
   scratch (and kNN for morphology) x label fractions x seeds, all with the stock eval configs
   (``config/eval_specz.yaml``, ``config/eval_morph.yaml``) and only these run-time changes: ``optim.epochs``,
   ``device``, ``data.num_workers``, ``plots=false``, ``progress=false``;
5. the table: sigma_MAD, eta and morphology accuracy per protocol per number of labels (mean over seeds, +-
   half the seed range), and the label saving factor: the number of labels scratch needs to reach finetune's
   metric at each finetune label count, from scratch's mean metric interpolated linearly in log(n_labels)
   (first crossing; '> max' when scratch never gets there), divided by finetune's label count.

Epochs: every protocol and task at one label count gets the same schedule: ``--epochs`` passes, raised so
that the run takes at least ``--min-steps`` optimizer steps (a 1% subset of 2000 labels is one batch per
epoch; fine-tuning on small subsets for longer is the usual practice, e.g. Chen et al. 2020). Early stopping
(``optim.patience`` of the eval config) applies as configured.

Skipped stages (outputs present, same knobs) are reported as such; a stage whose outputs were made with
other knobs is an error naming the folder (use another ``--workdir``). Sweep cells are idempotent already
(same config and encoder bytes: not run again). The table also goes to ``WORKDIR/label_efficiency.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sslsky.config import SweepConfig  # noqa: E402
from sslsky.data.shards import ShardDataset  # noqa: E402
from sslsky.data.verify import file_sha256  # noqa: E402
from sslsky.eval.sweep import collect, run_sweep, summarize  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE  # noqa: E402

MOCK_SEED = 2021
PRETRAIN_CONFIG = REPO / "config" / "pretrain_demo.yaml"
EVAL_CONFIGS = {"specz": REPO / "config" / "eval_specz.yaml", "morph": REPO / "config" / "eval_morph.yaml"}
LABEL_COLUMN = {"specz": "z", "morph": "morph_class"}
PROTOCOLS = {"specz": ["linear", "finetune", "scratch"], "morph": ["linear", "finetune", "scratch", "knn"]}
TABLE_PROTOCOLS = ("linear", "finetune", "scratch", "knn")
#: (task, metrics.json key, label in the table, lower is better)
METRICS = (("specz", "sigma_mad", "σ_MAD", True), ("specz", "eta", "η", True), ("morph", "accuracy", "accuracy", False))

DEFAULTS = {"n_galaxies": 2500, "pretrain_steps": 4000, "fractions": "0.01,0.03,0.1,0.3,1", "seeds": "0,1",
            "epochs": 20, "min_steps": 100, "workdir": "runs/label_efficiency"}
QUICK = {"n_galaxies": 300, "pretrain_steps": 60, "fractions": "0.1,1", "seeds": "0,1", "epochs": 2, "min_steps": 2,
         "workdir": "runs/label_efficiency_quick"}


# ---------------------------------------------------------------------------
# Machine, stages, stamps.
# ---------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"Python {platform.python_version()}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


class Stages:
    """Wall time of each stage, printed as it ends."""

    def __init__(self):
        self.times: list[tuple[str, float, str]] = []

    def run(self, name: str, function, *args):
        print(f"\n== {name} (load average {load_average()})", flush=True)
        t0 = time.perf_counter()
        note = function(*args) or ""
        elapsed = time.perf_counter() - t0
        self.times.append((name, elapsed, note))
        print(f"== {name}: {elapsed:.0f} s{f' ({note})' if note else ''}", flush=True)

    def table(self) -> list[str]:
        lines = [f"  {name:28s} {elapsed:7.0f} s  {note}" for name, elapsed, note in self.times]
        total = sum(t for _, t, _ in self.times)
        return lines + [f"  {'total':28s} {total:7.0f} s  ({total / 60:.1f} min)"]


@dataclasses.dataclass
class Session:
    """One benchmark run: its work folder, command line, start time and load average, stage timer."""

    name: str
    work: Path
    command: str
    started: str
    load_start: str
    stages: Stages = dataclasses.field(default_factory=lambda: Stages())


def start(name: str, args, argv=None) -> Session:
    """Threads for this process (the sweeps) and the subprocesses, the work folder, the command line, printed."""
    if getattr(args, "threads", 0) > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    session = Session(name, work, command, time.strftime("%Y-%m-%d %H:%M"), load_average())
    print(f"{name}: {machine()}\n{name}: {command} -> {work} (load average {session.load_start})", flush=True)
    return session


def write_report(session: Session, title: str, body: list[str], where: str = "") -> Path:
    """``WORK/<name>.md``: the title with the start time, ``body``, the machine, the load, the command and the stage
    times; printed too. ``where``: what else the run left, said after the table's path."""
    md = [f"# {title} ({session.started})", "", *body, "",
          f"Machine: {machine()}; load average (1/5/15 min) {session.load_start} at the start, {load_average()} "
          f"at the end.", "", f"Command: `{session.command}`", "", "Stage times:", "```", *session.stages.table(),
          "```", ""]
    out = session.work / f"{session.name}.md"
    out.write_text("\n".join(md))
    print("\n" + "\n".join(md), flush=True)
    print(f"{session.name}: table in {out}{f'; {where}' if where else ''}", flush=True)
    return out


def add_run_args(parser: argparse.ArgumentParser, defaults: dict, quick: dict, ranks: int = 2) -> None:
    """The options every benchmark has: --workdir, --quick, --ranks, --device, --workers, --threads."""
    parser.add_argument("--workdir", help=f"outputs, kept for resuming (default {defaults['workdir']})")
    parser.add_argument("--quick", action="store_true", help="tiny scale (plumbing check): " + ", ".join(
        f"{k}={v}" for k, v in quick.items()))
    parser.add_argument("--ranks", type=int, default=ranks, help=f"MPI ranks for mock and pack (default {ranks})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (pretraining and evaluation)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the evaluation (default 0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch/OpenMP threads per process (default 0: torch's choice); 1 on a shared CPU")


def parse_run_args(parser: argparse.ArgumentParser, argv, defaults: dict, quick: dict) -> argparse.Namespace:
    """Parsed arguments with every option left unset taken from ``quick`` (--quick) or ``defaults``."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_stamp(folder: Path, knobs: dict, done: bool) -> bool:
    """True when ``folder`` holds this stage's finished outputs for ``knobs``; an error for other knobs."""
    stamp = folder / "benchmark_stage.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old != knobs:
            raise SystemExit(f"label_efficiency: {folder} was made with {old}, not {knobs}; use another --workdir "
                             f"or delete {folder}")
    elif done:
        raise SystemExit(f"label_efficiency: {folder} holds outputs this benchmark did not stamp; use another "
                         f"--workdir or delete {folder}")
    return done and stamp.is_file()


def write_stamp(folder: Path, knobs: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmark_stage.json").write_text(json.dumps(knobs) + "\n")


def sslsky_command(*args: str, ranks: int = 1) -> list[str]:
    command = [sys.executable, "-m", "sslsky", *args]
    if ranks > 1:
        command = ["mpirun", "-n", str(ranks), *command]
    return command


def mpi_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # OpenMPI refuses root unless told (CI containers)
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run(command: list[str], ok=(0,)) -> int:
    print("$ " + shlex.join(command), flush=True)
    status = subprocess.run(command, cwd=REPO, env=mpi_env()).returncode
    if status not in ok:
        raise SystemExit(f"label_efficiency: command failed with status {status}: {shlex.join(command)}")
    return status


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def stage_mock(args, work: Path) -> str:
    folder = work / "mock"
    knobs = {"n": args.n_galaxies, "seed": MOCK_SEED, "survey": "sdss"}
    if check_stamp(folder, knobs, (folder / "catalog.fits").is_file()):
        return "skipped: outputs exist"
    ranks = args.ranks if shutil.which("mpirun") and args.ranks > 1 else 1
    run(sslsky_command("mock", "--survey", "sdss", "--n", str(args.n_galaxies), "--seed", str(MOCK_SEED),
                       "--out", str(folder), "progress=false", ranks=ranks))
    write_stamp(folder, knobs)
    return f"{args.n_galaxies} galaxies on {ranks} rank(s)"


def stage_pack(args, work: Path) -> str:
    folder = work / "packed"
    knobs = {"catalog": str(work / "mock" / "catalog.fits")}
    if check_stamp(folder, knobs, (folder / "manifest.json").is_file()):
        return "skipped: outputs exist"
    ranks = args.ranks if shutil.which("mpirun") and args.ranks > 1 else 1
    status = run(sslsky_command("pack", "--catalog", str(work / "mock" / "catalog.fits"), "--out", str(folder),
                                "--shard-size", "512", "progress=false", ranks=ranks), ok=(0, 3))
    write_stamp(folder, knobs)
    return f"{ranks} rank(s)" + ("; some cutouts rejected, see rejected.csv" if status == 3 else "")


def pretrain_overrides(args, work: Path) -> list[str]:
    steps = args.pretrain_steps
    return [f"data.path={work / 'packed'}", f"run_dir={work / 'pretrain'}", f"optim.total_steps={steps}",
            f"optim.warmup_steps={max(1, min(100, steps // 20))}", f"val_every={max(1, steps // 15)}",
            f"log_every={max(1, min(100, steps // 30))}", f"checkpoint_every={max(1, min(250, steps // 4))}",
            f"device={args.device}", "data.num_workers=0", "tensorboard=false", "progress=false"]


def stage_pretrain(args, work: Path) -> str:
    folder = work / "pretrain"
    overrides = pretrain_overrides(args, work)
    knobs = {"config": str(PRETRAIN_CONFIG.relative_to(REPO)), "overrides": overrides}
    if check_stamp(folder, knobs, (folder / ENCODER_EXPORT).is_file()):
        note = "skipped: encoder exists"
    else:
        write_stamp(folder, knobs)  # before training: an interrupted run resumes from its checkpoints
        run(sslsky_command("pretrain", "--config", str(PRETRAIN_CONFIG), *overrides))
        if not (folder / ENCODER_EXPORT).is_file():  # stopped by a signal: checkpointed, exit status 0
            raise SystemExit(f"label_efficiency: pretraining stopped before its last step (no {ENCODER_EXPORT} in "
                             f"{folder}); run the same command again to continue from its checkpoint")
        note = f"{args.pretrain_steps} steps"
    records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    curve = [(r["step"], r["val_top1"]) for r in records if "val_top1" in r]
    speed = [r["images_per_s"] for r in records if "images_per_s" in r]
    print("pretrain: held-out contrastive top-1 (chance = 1/batch): "
          + ", ".join(f"{s}: {a:.3f}" for s, a in curve), flush=True)
    if speed:
        note += f"; {sorted(speed)[len(speed) // 2]:.0f} images/s (median)"
    return note


def epochs_for(args, n_labels: int, batch_size: int) -> int:
    """``--epochs``, raised to reach ``--min-steps`` optimizer steps (the loop takes n // min(batch, n) a pass)."""
    steps_per_epoch = max(1, n_labels // max(1, min(batch_size, n_labels)))
    return max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))


def eval_batch_size(task: str) -> int:
    import yaml

    return int((yaml.safe_load(EVAL_CONFIGS[task].read_text()).get("data") or {}).get("batch_size", 64))


def n_train_labels(work: Path, task: str, fraction: float) -> int:
    return len(ShardDataset(work / "packed", split="train", label=LABEL_COLUMN[task], label_fraction=fraction))


def check_cells(work: Path, task: str, fraction: float, seeds: list[int], epochs: int, ckpt_sha: str) -> None:
    """Finished cells of this grid point must come from this encoder and schedule.

    ``run_sweep`` skips any cell whose metrics.json exists, so a rerun with another ``--epochs`` or after a new
    pretraining would otherwise mix old cells into the table.
    """
    for protocol in PROTOCOLS[task]:
        for seed in seeds:
            path = work / "sweep" / task / protocol / f"frac{fraction:g}" / f"seed{seed}" / "metrics.json"
            if not path.is_file():
                continue
            metrics = json.loads(path.read_text())
            old_epochs = (metrics.get("config") or {}).get("optim", {}).get("epochs")
            if metrics.get("ckpt_sha256") != ckpt_sha or (protocol != "knn" and old_epochs != epochs):
                raise SystemExit(f"label_efficiency: {path} was made with another encoder or schedule (epochs "
                                 f"{old_epochs}, now {epochs}); use another --workdir or delete {work / 'sweep'}")


def stage_sweep(args, work: Path, task: str) -> str:
    """One ``run_sweep`` per label fraction (the epoch count depends on it); all write WORKDIR/sweep."""
    ckpt = work / "pretrain" / ENCODER_EXPORT
    ckpt_sha = file_sha256(ckpt)
    batch = eval_batch_size(task)
    failed = 0
    schedule = []
    for fraction in args.fractions:
        n = n_train_labels(work, task, fraction)
        epochs = epochs_for(args, n, batch)
        schedule.append(f"{n} labels: {epochs} epochs")
        check_cells(work, task, fraction, args.seeds, epochs, ckpt_sha)
        cfg = SweepConfig(ckpt=str(ckpt), data_path=str(work / "packed"), out=str(work / "sweep"), tasks=[task],
                          protocols=PROTOCOLS[task], label_fractions=[fraction], seeds=args.seeds,
                          specz_config=str(EVAL_CONFIGS["specz"]), morph_config=str(EVAL_CONFIGS["morph"]),
                          overrides=[f"optim.epochs={epochs}", f"device={args.device}",
                                     f"data.num_workers={args.workers}", "plots=false", "progress=false"],
                          executor="local")
        print(f"label_efficiency: {task}, fraction {fraction:g} ({n} labels), {epochs} epochs at most", flush=True)
        failed += run_sweep(cfg)
    if failed:
        raise SystemExit(f"label_efficiency: {failed} {task} sweep call(s) had failed cells (see above); rerun to "
                         f"retry them, the finished ones are kept")
    return "; ".join(schedule)


# ---------------------------------------------------------------------------
# The table and the label saving factor.
# ---------------------------------------------------------------------------


def matching_labels(series: list[tuple[int, float, float, float]], target: float, lower_better: bool) -> tuple:
    """Labels scratch needs to reach ``target``: ("=", n) interpolated in log n, ("<=", n_min) or (">", n_max)."""
    def good(value: float) -> bool:
        return value <= target if lower_better else value >= target

    for i, (n, mean, _, _) in enumerate(series):
        if good(mean):
            if i == 0:
                return "<=", float(n)
            n0, m0 = series[i - 1][0], series[i - 1][1]
            t = (target - m0) / (mean - m0)
            return "=", math.exp(math.log(n0) + t * (math.log(n) - math.log(n0)))
    return ">", float(series[-1][0])


def fmt_value(mean: float, low: float, high: float, digits: int) -> str:
    return f"{mean:.{digits}f} ±{(high - low) / 2:.{digits}f}"


def build_report(rows: list[dict], fractions: list[float], seeds: list[int]) -> tuple[list[str], list[str], dict]:
    """(result table lines, saving-factor table lines, summary facts) in markdown."""
    rows = [r for r in rows if float(r["label_fraction"]) in fractions and int(r["seed"]) in seeds]
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("specz", "morph")}
    series = {(task, metric): summarize(by_task[task], metric) for task, metric, _, _ in METRICS}
    digits = {"sigma_mad": 4, "eta": 3, "accuracy": 3}

    def cell(task: str, metric: str, protocol: str, fraction: float) -> tuple[int, str] | None:
        points = series[(task, metric)].get(protocol) or []
        present = sorted({float(r["label_fraction"]) for r in by_task[task]
                          if r["protocol"] == protocol and r.get(metric) is not None})
        if fraction not in present:
            return None
        n, mean, low, high = points[present.index(fraction)]  # summarize() sorts by n: the fraction order
        return n, fmt_value(mean, low, high, digits[metric])

    table = ["| labels (z / morph) | fraction | protocol | σ_MAD | η | morph. accuracy |",
             "|---|---|---|---|---|---|"]
    for fraction in sorted(fractions):
        for protocol in TABLE_PROTOCOLS:
            z = cell("specz", "sigma_mad", protocol, fraction)
            eta = cell("specz", "eta", protocol, fraction)
            acc = cell("morph", "accuracy", protocol, fraction)
            if z is None and acc is None:
                continue
            nz, nm = (z[0] if z else None), (acc[0] if acc else None)
            labels = str(nz or nm) if nz == nm or None in (nz, nm) else f"{nz} / {nm}"
            table.append(f"| {labels} | {fraction:g} | {protocol} | {z[1] if z else '–'} | {eta[1] if eta else '–'} "
                         f"| {acc[1] if acc else '–'} |")
    facts: dict = {"beats": {}, "factors": {}}

    saving = ["| finetune labels | " + " | ".join(f"{label}: scratch labels to match (factor)"
                                                 for _, _, label, _ in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    ft_counts = sorted({n for task, metric, _, _ in METRICS for n, *_ in series[(task, metric)].get("finetune", [])})
    per_metric: dict = {}
    for task, metric, label, lower in METRICS:
        ft = {n: mean for n, mean, _, _ in series[(task, metric)].get("finetune", [])}
        sc = series[(task, metric)].get("scratch", [])
        per_metric[metric] = {}
        for n, target in ft.items():
            if sc:
                per_metric[metric][n] = matching_labels(sc, target, lower)
        # finetune better than scratch at the same label count below 100% (means over seeds)?
        full = {int(r["n_train_labels"]) for r in by_task[task] if float(r["label_fraction"]) == 1.0}
        sc_mean = {n: mean for n, mean, _, _ in sc}
        verdict = [(n, mean < sc_mean[n] if lower else mean > sc_mean[n]) for n, mean in ft.items()
                   if n in sc_mean and n not in full]
        facts["beats"][label] = verdict
        facts["factors"][label] = {n: how for n, how in per_metric[metric].items()}
    for n in ft_counts:
        cells = []
        for _, metric, _, _ in METRICS:
            how = per_metric[metric].get(n)
            if how is None:
                cells.append("–")
            elif how[0] == "=":
                cells.append(f"{how[1]:.0f} ({how[1] / n:.2f}×)")
            elif how[0] == "<=":
                cells.append(f"≤ {how[1]:.0f} (≤ {how[1] / n:.2f}×)")
            else:
                cells.append(f"> max = {how[1]:.0f} (> {how[1] / n:.2f}×)")
        saving.append(f"| {n} | " + " | ".join(cells) + " |")
    return table, saving, facts


def baseline_lines(work: Path, fractions: list[float], seeds: list[int]) -> list[str]:
    """Trivial predictors at each label count (from the scratch cells' metrics.json): the floor to beat."""
    lines = []
    for fraction in sorted(fractions):
        z = work / "sweep" / "specz" / "scratch" / f"frac{fraction:g}" / f"seed{seeds[0]}" / "metrics.json"
        m = work / "sweep" / "morph" / "scratch" / f"frac{fraction:g}" / f"seed{seeds[0]}" / "metrics.json"
        parts = []
        if z.is_file():
            b = json.loads(z.read_text())["median_z_baseline"]
            parts.append(f"median-z guess σ_MAD {b['sigma_mad']:.4f}, η {b['eta']:.3f}")
        if m.is_file():
            b = json.loads(m.read_text())["majority_baseline"]
            parts.append(f"majority class accuracy {b['accuracy']:.3f}")
        if parts:
            lines.append(f"- fraction {fraction:g} (seed {seeds[0]}): " + "; ".join(parts))
    return lines


def verdict_lines(facts: dict) -> list[str]:
    """The two targets of the paper, per metric: finetune better below 100%; scratch needs >= 2x the labels."""
    lines = []
    for label, verdict in facts["beats"].items():
        if not verdict:
            continue
        losing = [n for n, ok in verdict if not ok]
        lines.append(f"- {label}: finetune beats scratch at every label count below 100%: "
                     + ("yes" if not losing else f"no (not at {', '.join(map(str, losing))} labels)"))
    for label, factors in facts["factors"].items():
        yes, no, unknown = [], [], []
        for n, (how, n_scratch) in sorted(factors.items()):
            if how == "=":
                (yes if n_scratch / n >= 2 else no).append(n)
            elif how == ">":  # scratch never matched: at least n_max / n
                (yes if n_scratch / n >= 2 else unknown).append(n)
            else:
                no.append(n)
        if factors:
            text = f"- {label}: scratch needs ≥ 2× finetune's labels at {len(yes)} of {len(factors)} finetune label " \
                   f"counts" + (f" ({', '.join(map(str, yes))})" if yes else "")
            if unknown:
                text += f"; not measurable at {', '.join(map(str, unknown))} (scratch never matches, and the " \
                        f"grid ends below 2×)"
            lines.append(text)
    return lines


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-galaxies", type=int, help=f"mock survey size (default {DEFAULTS['n_galaxies']})")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"MoCo v2 steps of batch 32 (default {DEFAULTS['pretrain_steps']})")
    parser.add_argument("--fractions", help=f"label fractions, comma-separated (default {DEFAULTS['fractions']})")
    parser.add_argument("--seeds", help=f"seeds, comma-separated (default {DEFAULTS['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--min-steps", type=int,
                        help="raise the epochs of small label sets to this many optimizer steps "
                             f"(default {DEFAULTS['min_steps']})")
    add_run_args(parser, DEFAULTS, QUICK)
    args = parse_run_args(parser, argv, DEFAULTS, QUICK)
    args.fractions = sorted(float(x) for x in str(args.fractions).split(","))
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    session = start("label_efficiency", args, argv)
    work, stages = session.work, session.stages
    stages.run("1 mock", stage_mock, args, work)
    stages.run("2 pack", stage_pack, args, work)
    stages.run("3 pretrain", stage_pretrain, args, work)
    stages.run("4 sweep photo-z", stage_sweep, args, work, "specz")
    stages.run("5 sweep morphology", stage_sweep, args, work, "morph")

    rows = collect(work / "sweep")
    table, saving, facts = build_report(rows, args.fractions, args.seeds)
    baselines = baseline_lines(work, args.fractions, args.seeds)
    verdicts = verdict_lines(facts)
    header = [
        f"Mock SDSS survey of {args.n_galaxies} galaxies (train/val/test 80/10/10 by object id), MoCo v2 "
        f"{args.pretrain_steps} steps (ResNet-18, 32×32 crops); seeds {', '.join(map(str, args.seeds))}; "
        f"values are the mean over seeds ± half their range, on the fixed test split.",
    ]
    write_report(session, "Label efficiency", [
        *header, "", *table, "",
        "Labels scratch needs to match finetune (scratch's mean metric interpolated in log n; factor = that "
        "over finetune's labels):", "", *saving, "", *verdicts, "", "Trivial predictors:", *baselines],
        where=f"per-cell metrics in {work / 'sweep'} (results.csv, label_efficiency_*.png)")

if __name__ == "__main__":
    main()
