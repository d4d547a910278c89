"""Science benchmark: do MoCo v2 representations save labels on a mock SDSS survey? (Hayat et al. 2021, Fig. 6)

    python benchmarks/label_efficiency.py --threads 1        # default scale: about 2 h on 2 idle CPU cores
    python benchmarks/label_efficiency.py --quick            # a few minutes: checks the plumbing, not the science
    python benchmarks/label_efficiency.py --n-galaxies 20000 --pretrain-steps 20000 --seeds 0,1,2,3,4   # bigger

Stages, each in ``--workdir`` so that a rerun resumes (by stage, and by cell within the tuning and the sweeps):

1. ``sslsky mock`` (``mpirun -n 2`` when mpirun is here): an SDSS-like survey with known z and morph_class;
2. ``sslsky pack`` into HDF5 shards;
3. ``sslsky pretrain`` (MoCo v2, ``config/pretrain_demo.yaml``: ResNet-18, ImageNet stem, 32x32 crops) on the
   train split for ``--pretrain-steps`` steps; the held-out contrastive top-1 curve is printed;
4. tuning: the learning rate of every supervised protocol (linear, finetune, scratch) is picked on the val split
   from the same trials (``--lrs`` at ``--tune-fraction``, seed ``--tune-seed``; best val score: photo-z CRPS,
   morphology error rate), so the supervised baseline gets the same search as fine-tuning (``WORKDIR/tune``);
5. ``sslsky sweep`` (executor local) for photo-z and morphology, side by side (``--jobs 2``): protocols linear,
   finetune, scratch (and kNN for morphology) x label fractions x ``--seeds``, with the stock eval configs
   (``config/eval_specz.yaml``, ``config/eval_morph.yaml``) and only these run-time changes: the tuned
   ``optim.lr``, ``optim.epochs`` and ``optim.min_steps`` (below), ``optim.allow_prior=true`` (a prior-only
   cell is written and marked, not failed), ``device``, ``data.num_workers``, ``plots=false``, ``progress=false``;
6. the table (:mod:`sslsky.eval.intervals`): sigma_MAD, eta and morphology accuracy per protocol per number of
   labels -- the mean over seeds on the test split, with the central 95 % interval of a bootstrap over seeds and
   test galaxies -- and the label saving factor with its interval: the labels scratch needs to reach
   finetune's value (scratch interpolated linearly in log n), over finetune's labels.

Epochs: every protocol and task at one label count gets the same schedule: ``--epochs`` passes, raised so that
the run takes at least ``--min-steps`` optimizer steps (the rule of the eval configs' ``optim.min_steps``).
Early stopping (``optim.patience``) applies as configured.

Skipped stages (outputs present, same knobs) are reported as such; a stage whose outputs were made with
other knobs is an error naming the folder (use another ``--workdir``). Sweep cells are idempotent already
(same config and encoder bytes: not run again), and a finished cell made with another encoder, lr or epoch
count is an error. The table also goes to ``WORKDIR/label_efficiency.md``.
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
from sslsky.eval.features import usable_cpus  # noqa: E402
from sslsky.eval.intervals import DRAWS, LEVEL  # noqa: E402
from sslsky.eval.supervised import training_epochs  # noqa: E402
from sslsky.eval.sweep import collect, run_sweep  # noqa: E402
from sslsky.train.pretrain import ENCODER_EXPORT, METRICS_FILE  # noqa: E402

MOCK_SEED = 2021
PRETRAIN_CONFIG = REPO / "config" / "pretrain_demo.yaml"
EVAL_CONFIGS = {"specz": REPO / "config" / "eval_specz.yaml", "morph": REPO / "config" / "eval_morph.yaml"}
LABEL_COLUMN = {"specz": "z", "morph": "morph_class"}
PROTOCOLS = {"specz": ["linear", "finetune", "scratch"], "morph": ["linear", "finetune", "scratch", "knn"]}
TABLE_PROTOCOLS = ("linear", "finetune", "scratch", "knn")
#: The protocols whose learning rate is tuned on val, each with the same trials (kNN has none).
TUNED = ("linear", "finetune", "scratch")
#: The bootstrap's random seed: the same draws for a rerun.
BOOTSTRAP_SEED = 14
#: (task, metrics.json key, label in the table, lower is better)
METRICS = (("specz", "sigma_mad", "σ_MAD", True), ("specz", "eta", "η", True), ("morph", "accuracy", "accuracy", False))

DEFAULTS = {"n_galaxies": 2500, "pretrain_steps": 4000, "fractions": "0.03,0.1,0.3,1", "seeds": "0,1,2",
            "epochs": 20, "min_steps": 100, "lrs": "0.001,0.003", "tune_fraction": 0.1,
            "workdir": "runs/label_efficiency"}
QUICK = {"n_galaxies": 300, "pretrain_steps": 60, "fractions": "0.1,1", "seeds": "0,1,2", "epochs": 2, "min_steps": 2,
         "lrs": "0.001,0.003", "tune_fraction": 0.3, "workdir": "runs/label_efficiency_quick"}


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
    text = f"{cpu}, {usable_cpus()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
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
    """``--epochs``, raised to reach ``--min-steps`` optimizer steps (the rule of ``optim.min_steps``)."""
    return training_epochs(args.epochs, args.min_steps, n_labels, batch_size)


def eval_batch_size(task: str) -> int:
    import yaml

    return int((yaml.safe_load(EVAL_CONFIGS[task].read_text()).get("data") or {}).get("batch_size", 64))


def n_train_labels(work: Path, task: str, fraction: float) -> int:
    return len(ShardDataset(work / "packed", split="train", label=LABEL_COLUMN[task], label_fraction=fraction))


def cell_overrides(args, epochs: int, lr: float | None) -> list[str]:
    """The run-time changes of a sweep cell: its epoch budget and learning rate; the rest of the stock config. A
    cell that keeps only the prior is written (marked ``prior_only``, counted in the report) rather than failed:
    it is a result of the protocol at that label count, and one such cell must not stop a two-hour run."""
    return [f"optim.epochs={epochs}", f"optim.min_steps={args.min_steps}",
            *([f"optim.lr={lr:g}"] if lr is not None else []), f"device={args.device}",
            f"data.num_workers={args.workers}", "plots=false", "progress=false", "optim.allow_prior=true"]


def sweep_config(args, work: Path, out: Path, task: str, protocols: list[str], fraction: float, seeds: list[int],
                 overrides: list[str]) -> SweepConfig:
    return SweepConfig(ckpt=str(work / "pretrain" / ENCODER_EXPORT), data_path=str(work / "packed"), out=str(out),
                       tasks=[task], protocols=protocols, label_fractions=[fraction], seeds=seeds,
                       specz_config=str(EVAL_CONFIGS["specz"]), morph_config=str(EVAL_CONFIGS["morph"]),
                       overrides=overrides, executor="local")


def check_cells(out: Path, task: str, protocol: str, fraction: float, seeds: list[int], expected: dict,
                ckpt_sha: str) -> None:
    """Finished cells must come from this encoder and these ``optim`` settings (``expected``: epochs, lr).

    ``run_sweep`` reruns a cell whose config changed, but the epochs and lr here are the benchmark's own knobs: a
    rerun with other ones must not quietly retrain half the table into a mix of two settings.
    """
    for seed in seeds:
        path = out / task / protocol / f"frac{fraction:g}" / f"seed{seed}" / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        optim = (metrics.get("config") or {}).get("optim", {})
        old = {key: optim.get(key) for key in expected}
        if metrics.get("ckpt_sha256") != ckpt_sha or (protocol != "knn" and old != expected):
            raise SystemExit(f"label_efficiency: {path} was made with another encoder or schedule ({old}, now "
                             f"{expected}); use another --workdir or delete {out}")


#: What each task's early stopping watches (``Task.val_score_name``), the score its tuning compares.
MONITOR = {"specz": "val_crps", "morph": "val_error"}


def val_score(metrics: dict) -> float:
    """The best val score of a supervised cell over its trained epochs: what its early stopping watched."""
    monitor = MONITOR[metrics["task"]]
    return min(r[monitor] for r in metrics["history"] if monitor in r and r["epoch"] > 0)


def stage_tune(args, work: Path, task: str) -> str:
    """The learning rate of each supervised protocol, picked on val: every protocol gets the same trials (each lr
    of ``--lrs`` at ``--tune-fraction``, seed ``--tune-seed``), scored by its best val score. The picks go to
    ``WORKDIR/tune/<task>.json``; the sweep uses them at every label count."""
    ckpt_sha = file_sha256(work / "pretrain" / ENCODER_EXPORT)
    n = n_train_labels(work, task, args.tune_fraction)
    epochs = epochs_for(args, n, eval_batch_size(task))
    failed = 0
    for lr in args.lrs:
        out = work / "tune" / f"lr{lr:g}"
        for protocol in TUNED:
            check_cells(out, task, protocol, args.tune_fraction, [args.tune_seed],
                        {"epochs": epochs, "min_steps": args.min_steps, "lr": lr}, ckpt_sha)
        print(f"label_efficiency: tuning {task} at {n} labels, lr {lr:g}", flush=True)
        failed += run_sweep(sweep_config(args, work, out, task, list(TUNED), args.tune_fraction, [args.tune_seed],
                                         cell_overrides(args, epochs, lr)))
    if failed:
        raise SystemExit(f"label_efficiency: {failed} {task} tuning call(s) had failed cells (see above); rerun")
    scores: dict = {}
    for protocol in TUNED:
        for lr in args.lrs:
            path = (work / "tune" / f"lr{lr:g}" / task / protocol / f"frac{args.tune_fraction:g}" /
                    f"seed{args.tune_seed}" / "metrics.json")
            scores.setdefault(protocol, {})[f"{lr:g}"] = val_score(json.loads(path.read_text()))
    picks = {protocol: float(min(by_lr, key=by_lr.get)) for protocol, by_lr in scores.items()}
    (work / "tune" / f"{task}.json").write_text(json.dumps({"labels": n, "fraction": args.tune_fraction,
                                                          "seed": args.tune_seed, "val_scores": scores,
                                                          "picked_lr": picks}, indent=1) + "\n")
    return "; ".join(f"{p} lr {lr:g}" for p, lr in picks.items())


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies, so a worker never outlives a killed benchmark (it would
    go on writing sweep cells beside the next run's)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: the workers end with their current cell's task list
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _task_stage(stage, args, work: Path, task: str) -> str:
    """One task's stage in a worker process (its own torch threads; it dies with the benchmark)."""
    die_with_parent()
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, usable_cpus() // 2))  # 2 workers share
    return stage(args, work, task)


def both_tasks(stage, args, work: Path) -> str:
    """``stage`` for photo-z and morphology, side by side in ``--jobs`` processes (they write separate folders);
    a failure in either is raised after both have ended, so the other's finished cells are kept."""
    import concurrent.futures
    import multiprocessing

    tasks = ("specz", "morph")
    if args.jobs < 2:
        return "; ".join(f"{task}: {stage(args, work, task)}" for task in tasks)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = {task: pool.submit(_task_stage, stage, args, work, task) for task in tasks}
        concurrent.futures.wait(futures.values())
    errors = [f"{task}: {future.exception()}" for task, future in futures.items() if future.exception() is not None]
    if errors:
        raise SystemExit("label_efficiency: " + "; ".join(errors))
    return "; ".join(f"{task}: {future.result()}" for task, future in futures.items())


def picked_lrs(work: Path, task: str) -> dict[str, float]:
    return json.loads((work / "tune" / f"{task}.json").read_text())["picked_lr"]


def stage_sweep(args, work: Path, task: str) -> str:
    """One ``run_sweep`` per label fraction and protocol (the epochs depend on the fraction, the lr on the
    protocol: the tuned one); all write WORKDIR/sweep."""
    ckpt_sha = file_sha256(work / "pretrain" / ENCODER_EXPORT)
    batch = eval_batch_size(task)
    lrs = picked_lrs(work, task)
    failed = 0
    schedule = []
    for fraction in args.fractions:
        n = n_train_labels(work, task, fraction)
        epochs = epochs_for(args, n, batch)
        schedule.append(f"{n} labels: {epochs} epochs")
        print(f"label_efficiency: {task}, fraction {fraction:g} ({n} labels), {epochs} epochs at most", flush=True)
        for protocol in PROTOCOLS[task]:
            lr = lrs.get(protocol)
            check_cells(work / "sweep", task, protocol, fraction, args.seeds,
                        {"epochs": epochs, "min_steps": args.min_steps, "lr": lr} if lr is not None else {},
                        ckpt_sha)
            failed += run_sweep(sweep_config(args, work, work / "sweep", task, [protocol], fraction, args.seeds,
                                             cell_overrides(args, epochs, lr)))
    if failed:
        raise SystemExit(f"label_efficiency: {failed} {task} sweep call(s) had failed cells (see above); rerun to "
                         f"retry them, the finished ones are kept")
    return "; ".join(schedule)


# ---------------------------------------------------------------------------
# The table and the label saving factor, with bootstrap intervals.
# ---------------------------------------------------------------------------


def fmt_value(mean: float, low: float, high: float, digits: int) -> str:
    """mean ± half the range (the other benchmarks' seed spread)."""
    return f"{mean:.{digits}f} ±{(high - low) / 2:.{digits}f}"


def fmt_interval(value: float, low: float, high: float, digits: int) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def cell_predictions(work: Path, task: str, protocol: str, fraction: float, seeds: list[int]) -> tuple | None:
    """(object ids, truth, (S, T) predictions, mean n_labels) of one cell from its seeds' predictions.h5; None
    when a seed is missing. Photo-z: the PDF mean against z_spec; morphology: the predicted class."""
    import h5py
    import numpy as np

    ids, truth, preds, counts = None, None, [], []
    for seed in seeds:
        folder = work / "sweep" / task / protocol / f"frac{fraction:g}" / f"seed{seed}"
        if not (folder / "predictions.h5").is_file() or not (folder / "metrics.json").is_file():
            return None
        with h5py.File(folder / "predictions.h5", "r") as handle:
            oid = handle["object_id"][:]
            if task == "specz":
                t, p = handle["z_spec"][:], handle["z_mean"][:]
            else:
                t, p = handle["true_class"][:], handle["pred_class"][:]
        order = np.argsort(oid, kind="stable")  # one test order for every cell of the task
        oid, t, p = oid[order], t[order], p[order]
        if ids is None:
            ids, truth = oid, t
        elif not (np.array_equal(oid, ids) and np.array_equal(t, truth)):
            raise SystemExit(f"label_efficiency: {folder} scored other test galaxies than seed {seeds[0]}")
        preds.append(p)
        counts.append(int(json.loads((folder / "metrics.json").read_text())["n_train_labels"]))
    return ids, truth, np.stack(preds), round(sum(counts) / len(counts))


@dataclasses.dataclass
class TaskTable:
    """The cells of one task: {(protocol, fraction): Cell}, the shared test truth and the galaxy draws."""

    task: str
    cells: dict
    truth: object
    galaxies: object


def task_tables(work: Path, fractions: list[float], seeds: list[int], draws: int) -> dict[str, TaskTable]:
    import numpy as np

    from sslsky.eval.intervals import Cell, galaxy_draws

    rng = np.random.default_rng(BOOTSTRAP_SEED)
    out = {}
    for task in ("specz", "morph"):
        cells, ids, truth = {}, None, None
        for protocol in PROTOCOLS[task]:
            for fraction in fractions:
                got = cell_predictions(work, task, protocol, fraction, seeds)
                if got is None:
                    continue
                if ids is not None and not np.array_equal(got[0], ids):
                    raise SystemExit(f"label_efficiency: the {task} cells scored different test galaxies")
                ids, truth = got[0], got[1]
                cells[(protocol, fraction)] = Cell(got[3], got[2])
        if cells:
            out[task] = TaskTable(task, cells, truth, galaxy_draws(len(truth), draws, rng))
    return out


def build_report(tables: dict[str, TaskTable], fractions: list[float], draws: int) -> tuple[list[str], list[str]]:
    """(result table lines, saving-factor table lines) in markdown, every value with its bootstrap interval."""
    import numpy as np

    from sslsky.eval.intervals import cell_draws, cell_value, percentile_interval, saving_factors, seed_draws

    rng = np.random.default_rng(BOOTSTRAP_SEED + 1)
    digits = {"sigma_mad": 4, "eta": 3, "accuracy": 3}

    def value(task: str, metric: str, protocol: str, fraction: float) -> str | None:
        table = tables.get(task)
        cell = table.cells.get((protocol, fraction)) if table else None
        if cell is None:
            return None
        drawn = cell_draws(cell, table.truth, metric, table.galaxies, seed_draws(len(cell.predictions), draws, rng))
        return fmt_interval(cell_value(cell, table.truth, metric), *percentile_interval(drawn), digits[metric])

    lines = ["| labels (z / morph) | protocol | σ_MAD | η | morph. accuracy |", "|---|---|---|---|---|"]
    for fraction in sorted(fractions):
        for protocol in TABLE_PROTOCOLS:
            z, eta, acc = (value(task, metric, protocol, fraction) for task, metric, _, _ in METRICS)
            if z is None and acc is None:
                continue
            counts = [tables[t].cells[(protocol, fraction)].n_labels for t in ("specz", "morph")
                      if t in tables and (protocol, fraction) in tables[t].cells]
            labels = " / ".join(str(n) for n in dict.fromkeys(counts))
            lines.append(f"| {labels} | {protocol} | {z or '–'} | {eta or '–'} | {acc or '–'} |")

    saving = ["| metric | finetune labels | scratch labels to match | factor [95 % interval] | draws censored "
              "(≤ / >) |", "|---|---|---|---|---|"]
    for task, metric, label, _ in METRICS:
        table = tables.get(task)
        if table is None:
            continue
        ft = [c for (p, _), c in table.cells.items() if p == "finetune"]
        sc = [c for (p, _), c in table.cells.items() if p == "scratch"]
        if not ft or len(sc) < 2:
            continue
        top = max(c.n_labels for c in sc)
        for s in saving_factors([c for c in ft if c.n_labels < top], sc, table.truth, metric, table.galaxies, rng):
            kind, n = s.point
            point = {"=": f"{n:.0f}", "<=": f"≤ {n:.0f}", ">": f"> {n:.0f}"}[kind]
            factor = {"=": f"{n / s.n_finetune:.2f}×", "<=": f"≤ {n / s.n_finetune:.2f}×",
                      ">": f"> {n / s.n_finetune:.2f}×"}[kind]
            high = "∞ (scratch never matches)" if math.isinf(s.high) else f"{s.high:.2f}"
            low = f"≤ {s.low:.2f}" if s.low_is_bound else f"{s.low:.2f}"
            saving.append(f"| {label} | {s.n_finetune} | {point} | {factor} [{low}, {high}] | "
                          f"{s.censored_low:.0%} / {s.censored_high:.0%} |")
    return lines, saving


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


def schedule_lines(work: Path, fractions: list[float], seeds: list[int]) -> list[str]:
    """How each supervised cell trained: epochs run of the budget and the kept epoch, over seeds."""
    lines = []
    for task in ("specz", "morph"):
        for protocol in ("linear", "finetune", "scratch"):
            parts = []
            for fraction in sorted(fractions):
                runs = []
                for seed in seeds:
                    path = work / "sweep" / task / protocol / f"frac{fraction:g}" / f"seed{seed}" / "metrics.json"
                    if path.is_file():
                        m = json.loads(path.read_text())
                        runs.append(f"{m['best_epoch']}/{m['epochs_run']}" + (" (prior only)" if m.get("prior_only")
                                                                               else ""))
                if runs:
                    parts.append(f"{fraction:g}: " + " ".join(runs))
            if parts:
                lines.append(f"- {task} {protocol}: " + "; ".join(parts))
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
    parser.add_argument("--seeds", help=f"seeds of the supervised stage, comma-separated (default "
                                        f"{DEFAULTS['seeds']}; at least 3 for an interval worth quoting)")
    parser.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--min-steps", type=int,
                        help="raise the epochs of small label sets to this many optimizer steps "
                             f"(default {DEFAULTS['min_steps']})")
    parser.add_argument("--lrs", help=f"the learning rates every supervised protocol is tuned over on val "
                                      f"(default {DEFAULTS['lrs']})")
    parser.add_argument("--tune-fraction", type=float,
                        help=f"the label fraction the tuning runs at (default {DEFAULTS['tune_fraction']})")
    parser.add_argument("--tune-seed", type=int, default=0, help="the seed of the tuning runs (default 0)")
    parser.add_argument("--draws", type=int, default=DRAWS, help=f"bootstrap draws (default {DRAWS})")
    parser.add_argument("--jobs", type=int, default=min(2, usable_cpus()),
                        help="processes for the tuning and sweep stages: 2 runs photo-z and morphology side by side "
                             "(default: 2 where there are 2 CPUs)")
    add_run_args(parser, DEFAULTS, QUICK)
    args = parse_run_args(parser, argv, DEFAULTS, QUICK)

    def numbers(option: str, text, kind):
        try:
            values = [kind(x) for x in str(text).split(",")]
        except ValueError:
            parser.error(f"--{option} takes comma-separated {kind.__name__}s, got {text!r}")
        if len(set(values)) != len(values):
            parser.error(f"--{option} repeats a value: {text!r}")
        return values

    args.fractions = sorted(numbers("fractions", args.fractions, float))
    args.seeds = numbers("seeds", args.seeds, int)
    args.lrs = [float(f"{x:g}") for x in numbers("lrs", args.lrs, float)]  # as the folders and overrides say them
    if len(set(args.lrs)) != len(args.lrs):
        parser.error(f"--lrs repeats a value at 6 significant digits: {args.lrs}")
    if any(seed < 0 for seed in args.seeds) or args.tune_seed < 0:
        parser.error("--seeds and --tune-seed must be >= 0")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if any(not 0 < f <= 1 for f in args.fractions) or not 0 < args.tune_fraction <= 1:
        parser.error("--fractions and --tune-fraction must lie in (0, 1]")
    if any(lr <= 0 for lr in args.lrs):
        parser.error("--lrs must be positive")
    if args.draws < 100:
        parser.error("--draws must be at least 100")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    session = start("label_efficiency", args, argv)
    work, stages = session.work, session.stages
    stages.run("1 mock", stage_mock, args, work)
    stages.run("2 pack", stage_pack, args, work)
    stages.run("3 pretrain", stage_pretrain, args, work)
    stages.run("4 tune (photo-z, morphology)", both_tasks, stage_tune, args, work)
    stages.run("5 sweep (photo-z, morphology)", both_tasks, stage_sweep, args, work)

    collect(work / "sweep")  # results.csv and the plots
    tables = task_tables(work, args.fractions, args.seeds, args.draws)
    table, saving = build_report(tables, args.fractions, args.draws)
    tuned = []
    for task in ("specz", "morph"):
        picks = json.loads((work / "tune" / f"{task}.json").read_text())
        tuned.append(f"- {task}, {picks['labels']} labels, seed {picks['seed']}: " + "; ".join(
            f"{protocol} " + ", ".join(f"{lr} → {score:.4f}" for lr, score in by_lr.items())
            + f" (picked {picks['picked_lr'][protocol]:g})" for protocol, by_lr in picks["val_scores"].items()))
    n_test = {task: len(t.truth) for task, t in tables.items()}
    header = [
        f"Mock SDSS survey of {args.n_galaxies} galaxies (train/val/test 80/10/10 by object id; test "
        f"{n_test.get('specz', '?')} / {n_test.get('morph', '?')} galaxies for photo-z / morphology), MoCo v2 "
        f"{args.pretrain_steps} steps (ResNet-18, 32×32 crops), one pretraining; supervised stage seeds "
        f"{', '.join(map(str, args.seeds))} (each: label subset, initialisation, order, augmentation).",
        f"Values: the mean over seeds of the metric on the test split [the central {LEVEL:.0%} interval of "
        f"{args.draws} bootstrap draws over seeds and test galaxies; not included: the pretraining seed, the mock].",
    ]
    write_report(session, "Label efficiency", [
        *header, "", *table, "",
        "Labels scratch needs to match finetune (scratch's value interpolated in log n; factor = that over "
        "finetune's labels; interval from the same draws):", "", *saving, "",
        f"Learning rates tuned on val (best val score over the epochs: photo-z mean CRPS, morphology error rate), "
        f"the same {len(args.lrs)} trials for every protocol:", *tuned, "",
        "Kept epoch / epochs run per seed:", *schedule_lines(work, args.fractions, args.seeds), "",
        "Trivial predictors:", *baseline_lines(work, args.fractions, args.seeds)],
        where=f"per-cell metrics in {work / 'sweep'} (results.csv, label_efficiency_*.png)")


if __name__ == "__main__":
    main()
