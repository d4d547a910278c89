"""What a supervised evaluation leaves in its ``cfg.out``, and when a finished one is not run again.

Idempotence: :func:`finished_metrics` returns the ``metrics.json`` of a task made with the same resolved config
(ignoring :data:`RUNTIME_KEYS`) and the same checkpoint bytes (:func:`checkpoint_sha256`, cached per file
version); the sweep uses it to find stale cells. :func:`write_json` writes atomically (NaN/inf become null).

Prior only: a run that kept only the untrained head (:attr:`sslsky.eval.supervised.SupervisedRun.prior_only`) is
no result. :func:`refuse_prior_only` writes :data:`PRIOR_ONLY_FILE` (why, the history, the config), removes a
stale metrics.json and the resume state (:data:`TRAIN_STATE`) and raises :class:`PriorOnlyError` (exit status 4);
``optim.allow_prior=true`` writes it as metrics.json marked ``prior_only``. :func:`print_warnings` puts a
result's warnings between bars on stderr.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import typing
from pathlib import Path

import numpy as np

from sslsky.config import config_to_dict
from sslsky.data.verify import file_sha256
from sslsky.outputs import write_text_atomic

if typing.TYPE_CHECKING:
    from sslsky.eval.supervised import SupervisedRun

TRAIN_STATE = "train_state.pt"
METRICS_FILE = "metrics.json"
#: What a task that kept only the prior leaves instead of metrics.json (history and config, no test metrics).
PRIOR_ONLY_FILE = "metrics.prior_only.json"
#: Config keys that do not change a result: a finished task with other values here is not run again.
RUNTIME_KEYS = ("progress", "data.num_workers")


def comparable_config(config: dict) -> dict:
    """A copy of a resolved config (a dict) without :data:`RUNTIME_KEYS`: two runs that agree here give one result."""
    config = copy.deepcopy(config)
    for dotted in RUNTIME_KEYS:
        node, *rest = dotted.split(".")
        if rest:
            config.get(node, {}).pop(rest[0], None)
        else:
            config.pop(node, None)
    return config


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, cached per file version (path, inode, size, mtime): a sweep checking 100 cells
    against one checkpoint hashes it once, and a checkpoint rewritten in place is hashed again."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _sha256_of_version(path, st.st_ino, st.st_size, st.st_mtime_ns)


def finished_metrics(out: str | os.PathLike, cfg, verbose: bool = True) -> dict | None:
    """The metrics of a finished task in ``out`` with the same resolved config (and checkpoint bytes), else None.

    ``verbose``: say why existing metrics are not used (the sweep counts them instead).
    """
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if comparable_config(metrics.get("config") or {}) != comparable_config(config_to_dict(cfg)):
        if verbose:
            print(f"eval: {path} was made with another config; running again", flush=True)
        return None
    if cfg.ckpt and (not Path(cfg.ckpt).is_file() or metrics.get("ckpt_sha256") != checkpoint_sha256(cfg.ckpt)):
        if verbose:
            print(f"eval: {path} was made from another {cfg.ckpt}; running again", flush=True)
        return None
    return metrics


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON atomically (temp name, then rename); NaN/inf become null."""
    return write_text_atomic(path, json.dumps(_json_ready(obj), indent=2) + "\n", "results")


def clear_train_state(out: str | os.PathLike) -> None:
    """Remove the resume state of a finished task."""
    (Path(out) / TRAIN_STATE).unlink(missing_ok=True)


def print_warnings(command: str, warnings: typing.Sequence[str]) -> None:
    """Print each warning of a result (e.g. :func:`sslsky.eval.metrics.small_test_warnings`) between bars on
    stderr, where a reader of the log cannot miss it; nothing when there are none."""
    if warnings:
        bar = "!" * 100
        lines = [bar, *(f"{command}: WARNING: {text}" for text in warnings), bar]
        print("\n".join(lines), file=sys.stderr, flush=True)


class PriorOnlyError(RuntimeError):
    """The kept model is only the prior (:attr:`sslsky.eval.supervised.SupervisedRun.prior_only`): no result.
    The eval commands print it and exit with status 4, as for a diverged training."""


_PRIOR_ONLY_HINTS = {
    "finetune": "optim.freeze_bn=true, optim.head_warmup_epochs=30 (LP-FT: fine-tuning starts from the linear "
                "probe), a lower optim.encoder_lr_factor (0.1), more labels (label_fraction), or protocol=linear",
    "linear": "more labels (label_fraction), another optim.lr, more optim.patience, or a better-trained encoder",
    "scratch": "more labels (label_fraction), more optim.epochs / optim.patience, or a pretrained encoder "
               "(protocol=finetune)",
}


def refuse_prior_only(run: SupervisedRun, command: str) -> str | None:
    """Refuse a run that kept only the prior: write :data:`PRIOR_ONLY_FILE` (why, history, config), remove a stale
    metrics.json and the resume state, raise :class:`PriorOnlyError` saying what happened and what to try.

    With ``optim.allow_prior`` it only warns and returns the reason (metrics.json then carries it as
    ``prior_only``); a run that is a result returns None.
    """
    cfg, out = run.cfg, Path(run.cfg.out)
    if not run.prior_only:
        (out / PRIOR_ONLY_FILE).unlink(missing_ok=True)  # from an earlier attempt
        return None
    what = (f"{command}: PRIOR ONLY, no result: {run.task.name} {cfg.protocol} with {run.n_train} labels kept only "
            f"the prior: {run.prior_only}")
    if cfg.optim.allow_prior:
        print(f"{what}; optim.allow_prior=true: written as metrics.json marked prior_only", flush=True)
        (out / PRIOR_ONLY_FILE).unlink(missing_ok=True)
        return run.prior_only
    write_json({
        "prior_only": run.prior_only, "task": run.task.name, "protocol": cfg.protocol,
        "label_fraction": cfg.label_fraction, "seed": cfg.seed, "n_train_labels": run.n_train,
        "n_val": len(run.splits.val), "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
        "probe_epochs": run.probe_epochs, "train_time_s": run.train_time_s, "history": run.history,
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None,
        "config": config_to_dict(cfg),
    }, out / PRIOR_ONLY_FILE)
    (out / METRICS_FILE).unlink(missing_ok=True)  # an older result here must not pass for this one
    clear_train_state(out)
    raise PriorOnlyError(f"{what}. Its predictions would not depend on the galaxy, so no "
                         f"{METRICS_FILE} was written; the history is in {out / PRIOR_ONLY_FILE}. Try "
                         f"{_PRIOR_ONLY_HINTS.get(cfg.protocol, 'more labels')}; optim.allow_prior=true reports "
                         f"it anyway, marked prior_only")
