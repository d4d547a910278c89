"""``sslsky sweep``: label-fraction studies as submitit job arrays, then one CSV and label-efficiency plots.

The grid is task (specz; morph: classes; votes: vote fractions) x protocol (linear, finetune, scratch; knn
for morph and votes; cluster, k-means NMI / ARI, and zeroshot, an align run's nearest class prototype, for morph,
once per seed as they use no label; zeroshot is drawn as a level in the plot) x label
fraction x seed. Each cell is one call of :func:`sslsky.eval.photoz.run_specz`
or :func:`sslsky.eval.morphology.run_morph` (``target=class`` for morph, ``target=votes`` for votes, both from
``morph_config``) with the task's base config plus the cell's overrides, writing
``OUT/<task>/<protocol>/frac<f>/seed<s>/metrics.json``. A cell is done when its ``metrics.json`` was made
with the cell's resolved config and the same checkpoint bytes (:func:`sslsky.eval.results.finished_metrics`,
the test the task functions themselves apply); done cells are not submitted again, so a sweep can be re-run
after a failure or with more seeds at no cost for what is done, while a re-pretrained encoder at the same
``ckpt`` path or changed ``overrides`` make the stale cells run again.

On a SLURM cluster (``executor: auto`` finds ``sbatch``) the cells go out as one job array with the
resources of ``slurm.*``; a task that reaches its time limit is requeued by submitit
(:meth:`SweepTask.checkpoint`) and starts again. Without SLURM the same cells run one after the other
in this process. ``collect`` (at the end, or ``sslsky sweep ... --collect``) reads every
``metrics.json`` into ``OUT/results.csv`` (its ``task`` column is the cell's task folder) and draws
``OUT/label_efficiency_<task>.png``: the task's headline metric (:data:`HEADLINE`: sigma_mad, accuracy,
vote_mae) against the number of training labels, one line per protocol (mean over seeds, the band their range).
A cell whose test split is too small to mean anything has its reasons in the ``warnings`` column (empty for
a real result; :func:`sslsky.eval.metrics.small_test_warnings`), and the sweep says how many there are.

Before anything is written or submitted, every cell's config is resolved (its base config plus the overrides),
so a bad value in ``overrides`` is one message, not a failure in each array task.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import shutil
import sys
from pathlib import Path

from sslsky.config import ConfigError, SweepConfig, check_values
from sslsky.outputs import atomic_output, output_dir, write_text_atomic

#: Task name -> (module, function, schema name in sslsky.config, base-config field of SweepConfig).
TASKS = {
    "specz": ("sslsky.eval.photoz", "run_specz", "EvalSpeczConfig", "specz_config"),
    "morph": ("sslsky.eval.morphology", "run_morph", "EvalMorphConfig", "morph_config"),
    "votes": ("sslsky.eval.morphology", "run_morph", "EvalMorphConfig", "morph_config"),
}
#: Overrides that make a task what it is (applied after ``SweepConfig.overrides``).
TASK_OVERRIDES = {"morph": ("target=class",), "votes": ("target=votes",)}
PROTOCOLS = {"specz": ("linear", "finetune", "scratch"),
             "morph": ("linear", "finetune", "scratch", "knn", "cluster", "zeroshot"),
             "votes": ("linear", "finetune", "scratch", "knn")}
#: Protocols that use no train label: one cell per seed (at the largest label fraction), not one per fraction.
LABEL_FREE = ("cluster", "zeroshot")
#: Metric drawn in the label-efficiency plot of each task, and whether lower is better.
HEADLINE = {"specz": ("sigma_mad", True), "morph": ("accuracy", False), "votes": ("vote_mae", True)}
METRICS_NAME = "metrics.json"
RESULTS_NAME = "results.csv"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One task of the sweep."""

    task: str
    protocol: str
    label_fraction: float
    seed: int

    def folder(self, out: Path) -> Path:
        return out / self.task / self.protocol / f"frac{self.label_fraction:g}" / f"seed{self.seed}"


def cells(cfg: SweepConfig) -> list[Cell]:
    """The grid, checked: unknown tasks or protocols are config errors (the fractions' and seeds' ranges are the
    schema's, :class:`sslsky.config.SweepConfig`)."""
    problems = check_values(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    for task in cfg.tasks:
        if task not in TASKS:
            raise ConfigError(f"sweep task {task!r}: choose from {', '.join(TASKS)}")
    out = []
    for task, protocol, fraction, seed in itertools.product(cfg.tasks, cfg.protocols, cfg.label_fractions,
                                                            cfg.seeds):
        if protocol not in PROTOCOLS[task]:
            if protocol in ("knn", "cluster", "zeroshot"):
                continue  # morphology protocols (cluster, zeroshot: classes only); the other tasks skip them
            raise ConfigError(f"protocol {protocol!r} for task {task}: choose from {', '.join(PROTOCOLS[task])}")
        if protocol in LABEL_FREE and fraction != max(cfg.label_fractions):
            continue
        out.append(Cell(task, protocol, float(fraction), int(seed)))
    if not out:
        raise ConfigError("the sweep grid is empty: check tasks, protocols, label_fractions and seeds")
    return out


def task_overrides(cfg: SweepConfig, cell: Cell, out: Path) -> list[str]:
    # scratch gets the checkpoint too: it takes the architecture, stem, crop and normalisation from it
    # and starts from random weights, so the baseline is the same network.
    return [*cfg.overrides, *TASK_OVERRIDES.get(cell.task, ()), f"protocol={cell.protocol}",
            f"label_fraction={cell.label_fraction}", f"seed={cell.seed}", f"out={cell.folder(out)}",
            f"ckpt={cfg.ckpt}", f"data.path={cfg.data_path}"]


def task_config(task: str, base_config: str, overrides: list[str]):
    """The resolved config of one cell: the task's schema, its base config file, then the cell's overrides."""
    from sslsky import config as config_module
    from sslsky.config import load_config

    return load_config(getattr(config_module, TASKS[task][2]), base_config or None, overrides)


class SweepTask:
    """What one array task runs (picklable); submitit calls :meth:`checkpoint` at a timeout and requeues."""

    def __init__(self, task: str, base_config: str, overrides: list[str]):
        self.task, self.base_config, self.overrides = task, base_config, overrides

    def config(self):
        """The resolved config the task function gets."""
        return task_config(self.task, self.base_config, self.overrides)

    def __call__(self) -> dict:
        import importlib

        module, function, _, _ = TASKS[self.task]
        return getattr(importlib.import_module(module), function)(self.config())

    def checkpoint(self, *args, **kwargs):
        """Requeue the same task: finished cells are skipped by the task itself."""
        import submitit

        return submitit.helpers.DelayedSubmission(SweepTask(self.task, self.base_config, self.overrides))


def is_done(cfg: SweepConfig, cell: Cell, out: Path) -> bool:
    """Whether the cell's ``metrics.json`` exists and was made with its resolved config and checkpoint bytes."""
    from sslsky.eval.results import finished_metrics

    folder = cell.folder(out)
    if not (folder / METRICS_NAME).is_file():
        return False
    return finished_metrics(folder, make_task(cfg, cell, out).config(), verbose=False) is not None


def pending(cfg: SweepConfig, out: Path) -> tuple[list[Cell], list[Cell]]:
    """(cells to run, cells already done); a cell to run whose ``metrics.json`` exists is stale."""
    todo, done = [], []
    for cell in cells(cfg):
        (done if is_done(cfg, cell, out) else todo).append(cell)
    return todo, done


def is_stale(cell: Cell, out: Path) -> bool:
    """A cell to run that has a ``metrics.json`` (another config or checkpoint made it)."""
    return (cell.folder(out) / METRICS_NAME).is_file()


def make_task(cfg: SweepConfig, cell: Cell, out: Path) -> SweepTask:
    base = getattr(cfg, TASKS[cell.task][3])
    if base and not Path(base).is_file():
        raise ConfigError(f"{TASKS[cell.task][3]}={base!r} does not exist")
    return SweepTask(cell.task, base, task_overrides(cfg, cell, out))


def use_slurm(cfg: SweepConfig) -> bool:
    if cfg.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor=slurm but sbatch is not on PATH; use executor=local or auto")
    return cfg.executor == "slurm" or (cfg.executor == "auto" and shutil.which("sbatch") is not None)


def submit_slurm(cfg: SweepConfig, tasks: list[SweepTask], out: Path) -> list:
    """One job array of ``tasks``; returns the submitit jobs."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster="slurm")
    slurm = cfg.slurm
    params = {"name": "sslsky-sweep", "timeout_min": slurm.time_min, "cpus_per_task": slurm.cpus_per_task,
              "slurm_array_parallelism": slurm.array_parallelism, "tasks_per_node": 1, "nodes": 1}
    if slurm.gpus_per_task:
        params["gpus_per_node"] = slurm.gpus_per_task
    if slurm.mem_gb:
        params["mem_gb"] = slurm.mem_gb
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    if slurm.account:
        params["slurm_account"] = slurm.account
    if slurm.additional:
        params["slurm_additional_parameters"] = dict(slurm.additional)
    executor.update_parameters(**params)
    try:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except Exception as err:  # noqa: BLE001 (submitit wraps sbatch's refusal in several types)
        cause = err.__cause__ or err
        detail = (getattr(cause, "stderr", None) or getattr(cause, "output", None) or str(err))
        detail = detail.decode() if isinstance(detail, bytes) else detail
        raise ConfigError(f"sbatch refused the job array ({', '.join(f'{k}={v}' for k, v in params.items())}): "
                          f"{str(detail).strip()}; adjust slurm.* in the sweep config") from None
    return jobs


def run_sweep(cfg: SweepConfig, collect_only: bool = False) -> int:
    """Run (or submit) the missing cells, then collect; 0 when every cell has its metrics."""
    out = Path(cfg.out)
    if not collect_only:
        if not cfg.data_path:
            raise ConfigError("data_path is empty: point it at packed shards")
        if not Path(cfg.data_path).exists():
            raise ConfigError(f"data_path={cfg.data_path!r} does not exist")
        grid = cells(cfg)
        if not cfg.ckpt and any(c.protocol != "scratch" for c in grid):
            raise ConfigError("ckpt is empty but protocols other than scratch need a pretrained encoder")
        for task in sorted({c.task for c in grid}):  # each task's resolved config, before anything is written
            cell = next(c for c in grid if c.task == task)
            try:
                make_task(cfg, cell, out).config()
            except ConfigError as err:
                raise ConfigError(f"the {task} cells' config ({TASKS[task][3]} + overrides): {err}") from None
    output_dir(cfg.out, "out")
    from sslsky.config import write_config

    write_config(cfg, out / "sweep_config.yaml")
    todo, done = pending(cfg, out) if not collect_only else ([], [])
    failed: list[tuple[Cell, str]] = []
    if not collect_only and todo:
        tasks = [make_task(cfg, cell, out) for cell in todo]
        stale = sum(is_stale(cell, out) for cell in todo)
        if stale:
            print(f"sweep: {stale} finished cell(s) were made with another config or checkpoint ({cfg.ckpt}); "
                  f"they run again", flush=True)
        print(f"sweep: {len(todo)} task(s) to run, {len(done)} already done -> {out}", flush=True)
        if use_slurm(cfg):
            jobs = submit_slurm(cfg, tasks, out)
            print(f"sweep: submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks)", flush=True)
            if not cfg.wait:
                print(f"sweep: collect later with `sslsky sweep --config ... out={out} --collect`", flush=True)
                return 0
            for cell, job in zip(todo, jobs):
                try:
                    job.result()
                except Exception as err:  # noqa: BLE001 (submitit re-raises the task's own error)
                    failed.append((cell, f"job {job.job_id}: {str(err).strip().splitlines()[-1]}"))
        else:
            for i, (cell, task) in enumerate(zip(todo, tasks), 1):
                print(f"sweep: [{i}/{len(todo)}] {cell.task} {cell.protocol} fraction {cell.label_fraction:g} "
                      f"seed {cell.seed}", flush=True)
                try:
                    task()
                except ConfigError:
                    raise
                except Exception as err:  # noqa: BLE001 (one failed cell must not lose the others)
                    failed.append((cell, f"{type(err).__name__}: {err}"))
    rows = collect(out)
    missing = pending(cfg, out)[0] if not collect_only else []
    for cell, reason in failed:
        print(f"sweep: FAILED {cell.task} {cell.protocol} fraction {cell.label_fraction:g} seed {cell.seed}: {reason}",
              file=sys.stderr, flush=True)
    for cell in missing:
        if cell not in {c for c, _ in failed}:
            print(f"sweep: no up-to-date {METRICS_NAME} for {cell.task} {cell.protocol} fraction "
                  f"{cell.label_fraction:g} seed {cell.seed} in {cell.folder(out)}", file=sys.stderr, flush=True)
    flagged = [row for row in rows if row.get("warnings")]
    if flagged:
        print(f"sweep: WARNING: {len(flagged)} of {len(rows)} result(s) come from splits too small or incomplete "
              f"to mean much (a small test or train split, a class with no test or train galaxy, k above the labels; "
              f"see the warnings column of {out / RESULTS_NAME}), e.g. {flagged[0]['task']} "
              f"{flagged[0].get('protocol')} fraction {flagged[0].get('label_fraction')}: {flagged[0]['warnings']}",
              file=sys.stderr, flush=True)
    print(f"sweep: {len(rows)} result(s) in {out / RESULTS_NAME}", flush=True)
    return 1 if (failed or missing) else 0


def collect(out: Path) -> list[dict]:
    """Every ``metrics.json`` under ``out`` into ``results.csv`` (atomic) and one plot per task."""
    rows = []
    for path in sorted(out.glob(f"*/*/frac*/seed*/{METRICS_NAME}")):
        task = path.relative_to(out).parts[0]
        metrics = json.loads(path.read_text())
        # a cell too small to mean anything says why next to the task (empty for a real result)
        row = {"task": task, "warnings": "; ".join(metrics.get("warnings") or [])}
        for key, value in metrics.items():
            if key != "task" and (isinstance(value, (int, float, str, bool)) or value is None):
                row[key] = value  # the folder names the task: morph and votes cells both run run_morph
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / RESULTS_NAME, buffer.getvalue(), "results")
    for task in sorted({row["task"] for row in rows}):
        plot_label_efficiency([r for r in rows if r["task"] == task], task, out / f"label_efficiency_{task}.png")
    return rows


def summarize(rows: list[dict], metric: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """protocol -> [(n_labels, mean, min, max) of ``metric`` over seeds], sorted by n_labels."""
    groups: dict[tuple[str, float], list[tuple[int, float]]] = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        groups.setdefault((row["protocol"], float(row["label_fraction"])), []).append(
            (int(row["n_train_labels"]), float(row[metric])))
    out: dict[str, list[tuple[int, float, float, float]]] = {}
    for (protocol, _), values in sorted(groups.items()):
        n = round(sum(v[0] for v in values) / len(values))
        metric_values = [v[1] for v in values]
        out.setdefault(protocol, []).append((n, sum(metric_values) / len(metric_values), min(metric_values),
                                             max(metric_values)))
    for series in out.values():
        series.sort()
    return out


def plot_label_efficiency(rows: list[dict], task: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, lower_better = HEADLINE[task]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for protocol, series in summarize(rows, metric).items():
        n, mean, low, high = (list(v) for v in zip(*series))
        if max(n) == 0:  # no training label (zeroshot): a level, not a point on the log axis
            ax.axhline(mean[0], linestyle="--", color="grey", label=f"{protocol} (no labels)")
            continue
        ax.plot(n, mean, marker="o", label=protocol)
        ax.fill_between(n, low, high, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training labels")
    ax.set_ylabel(metric + (" (lower is better)" if lower_better else ""))
    ax.set_title(f"label efficiency: {task}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, "plot") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
