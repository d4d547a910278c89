"""Photometric redshifts from images: redshift as classification over bins (Pasquet et al. 2019).

    python eval_specz.py --config config/eval_specz.yaml ckpt=runs/sdss/encoder.pt data.path=packed
    sslsky eval-specz --config config/eval_specz.yaml protocol=scratch label_fraction=0.1 seed=2

``run_specz(cfg) -> dict`` trains with :func:`sslsky.eval.supervised.train_supervised` (protocols ``linear``,
``finetune``, ``scratch``; see that module for the data, inputs and optimisation) on ``cfg.n_bins`` equal bins
on [``z_min``, ``z_max``) (default 180 on [0, 0.4)); spectroscopic redshifts outside the range train the
edge bins. Early stopping watches the val split's mean CRPS (less brittle than the cross-entropy of 180
narrow bins with few labels). The softmax over the bins is each test galaxy's PDF; the point estimate is the
PDF mean (median and mode are saved and scored too).

Contract (the label-fraction sweep relies on it):

- **Idempotent**: if ``cfg.out/metrics.json`` exists and was made with the same resolved config (ignoring
  ``progress`` and ``data.num_workers``) and the same checkpoint bytes (``ckpt_sha256``), it is returned
  without training. ``metrics.json`` is written last (atomically), so it marks a finished task; an
  interrupted task resumes from ``cfg.out/train_state.pt``.
- ``cfg.out/config.yaml``: the resolved config, written before training (once the data and the encoder are
  open). A bad ``out`` (a file, not writable) is refused before any work.
- ``cfg.out/metrics.json`` keys: ``task`` ("specz"), ``protocol``, ``label_fraction``, ``seed``,
  ``n_train_labels`` (labelled train rows used), ``n_val``, ``n_test``, ``ckpt``, ``ckpt_sha256``; the
  test-split metrics of the PDF mean ``sigma_mad``, ``bias``, ``eta``, ``bin_accuracy``, ``crps``, ``n``;
  ``by_estimate`` (the same for ``mean``, ``median``, ``mode``); ``median_z_baseline`` (metrics of predicting
  the train median z for every galaxy); ``history`` (per-epoch losses, val CRPS), ``best_epoch``,
  ``epochs_run``, ``train_time_s``, ``config``; ``prior_only``: null, or with ``optim.allow_prior`` why the
  kept model is only the prior. Without it such a model is refused: no metrics.json, exit status 4,
  ``cfg.out/metrics.prior_only.json`` (:func:`sslsky.eval.results.refuse_prior_only`). ``warnings``: why
  the test split is too small to mean anything (:func:`sslsky.eval.metrics.small_test_warnings`: fewer than
  20 labelled test galaxies; also printed), [] when it is not.
- ``cfg.out/predictions.h5`` (atomic): per test galaxy ``object_id``, ``z_spec``, ``ebv``, ``z_mean``,
  ``z_median``, ``z_mode`` (N,) and ``pdf`` (N, K) float32 summing to 1, plus ``bin_edges`` (K + 1,).
- ``cfg.out/plots/``: ``zphot_vs_zspec.png`` (density, 1:1 and outlier lines, metrics in the legend),
  ``delta_z_hist.png``, ``example_pdfs.png``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from sslsky.config import EvalSpeczConfig, config_to_dict
from sslsky.data.ids import as_id_array, write_ids
from sslsky.data.verify import file_sha256
from sslsky.eval.metrics import (
    OUTLIER_THRESHOLD,
    crps_binned,
    delta_z,
    pdf_point_estimates,
    photoz_metrics,
    redshift_bin_edges,
    redshift_to_bin,
    small_test_warnings,
    small_train_warnings,
)
from sslsky.eval.results import (
    METRICS_FILE,
    clear_train_state,
    finished_metrics,
    print_warnings,
    refuse_prior_only,
    write_json,
)
from sslsky.eval.supervised import train_supervised
from sslsky.eval.task import Task, check_config
from sslsky.locks import OutputLock, run_evaluation_locked
from sslsky.outputs import atomic_output, output_dir

PREDICTIONS_FILE = "predictions.h5"
POINT_ESTIMATES = ("mean", "median", "mode")


def write_predictions(path: Path, columns: dict[str, np.ndarray], attrs: dict) -> Path:
    """Write per-object columns to HDF5 atomically (temp name, then rename)."""
    with atomic_output(path, "predictions") as tmp, h5py.File(tmp, "w") as handle:
        for name, values in columns.items():
            if name == "object_id":  # int64, or UTF-8 text ids kept exactly
                write_ids(handle, name, as_id_array(values))
            else:
                handle.create_dataset(name, data=values)
        for key, value in attrs.items():
            handle.attrs[key] = value
    return path


def run_specz(cfg: EvalSpeczConfig) -> dict:
    """Train and score a photo-z model as configured; returns the metrics (see the module docstring).

    One evaluation at a time per out folder: ``OUT/eval.lock`` is held from the check of the folder to the end; a
    second one is refused (ConfigError naming the holder)."""
    return run_evaluation_locked("eval-specz", _run_specz, cfg)


def _run_specz(cfg: EvalSpeczConfig, lock: OutputLock) -> dict:
    out = Path(cfg.out)
    done = finished_metrics(out, cfg)
    if done is not None:
        print(f"eval-specz: {out / METRICS_FILE} exists for this config; not training again", flush=True)
        print_warnings("eval-specz", done.get("warnings") or [])
        return done
    check_config(cfg)
    output_dir(cfg.out, "out")  # a file or a read-only folder: a message now, not after the training
    lock.acquire()  # another evaluation writing this folder: refused, naming it
    edges = redshift_bin_edges(cfg.n_bins, cfg.z_min, cfg.z_max)  # (K + 1,)

    task = Task("photoz", "z", cfg.n_bins, lambda z: redshift_to_bin(z, edges),
                val_score=lambda pdf, z: float(np.mean(crps_binned(pdf, z, edges))), val_score_name="val_crps")
    run = train_supervised(cfg, task)
    prior_only = refuse_prior_only(run, "eval-specz")  # raises PriorOnlyError unless optim.allow_prior
    pred = run.predict_test()
    pdf, z_spec = pred["probs"], pred["z"].astype(np.float64)  # (N, K), (N,)
    estimates = pdf_point_estimates(pdf, edges)
    metrics = photoz_metrics(estimates["mean"], z_spec, pdf, edges)
    by_estimate = {name: photoz_metrics(estimates[name], z_spec, pdf, edges) for name in POINT_ESTIMATES}
    train_z = run.splits.train.index.columns["z"][run.splits.train.indices]
    baseline = photoz_metrics(np.full(len(z_spec), np.median(train_z)), z_spec)
    warnings = small_test_warnings(len(z_spec)) + small_train_warnings(len(train_z))
    outside = int(np.sum((train_z < cfg.z_min) | (train_z >= cfg.z_max)))
    if outside:
        print(f"eval-specz: {outside} train redshifts outside [{cfg.z_min}, {cfg.z_max}) trained the edge bins",
              flush=True)

    write_predictions(out / "predictions.h5", {
        "object_id": pred["object_id"], "z_spec": z_spec, "ebv": pred["ebv"].astype(np.float64),
        "z_mean": estimates["mean"], "z_median": estimates["median"], "z_mode": estimates["mode"],
        "pdf": pdf.astype(np.float32), "bin_edges": edges,
    }, {"protocol": cfg.protocol, "ckpt": cfg.ckpt, "label_fraction": cfg.label_fraction, "seed": cfg.seed})
    plots = plot_photoz(out / "plots", z_spec, estimates["mean"], pdf, edges, metrics,
                        title=f"{cfg.protocol}, {run.n_train} labels") if cfg.plots else []

    result = {
        "task": "specz", "protocol": cfg.protocol, "label_fraction": cfg.label_fraction, "seed": cfg.seed,
        "n_train_labels": run.n_train, "n_val": len(run.splits.val), "n_test": len(z_spec), "ckpt": cfg.ckpt,
        "ckpt_sha256": file_sha256(cfg.ckpt) if cfg.ckpt else None,
        **metrics, "point_estimate": "mean", "by_estimate": by_estimate, "median_z_baseline": baseline,
        "n_bins": cfg.n_bins, "z_range": [cfg.z_min, cfg.z_max], "outlier_threshold": OUTLIER_THRESHOLD,
        "arch": run.backbone.arch, "stem": run.backbone.stem, "encoder_source": run.backbone.source,
        "best_epoch": run.best_epoch, "epochs_run": run.epochs_run, "train_time_s": run.train_time_s,
        "prior_only": prior_only, "warnings": warnings,
        "history": run.history, "plots": [str(p) for p in plots], "config": config_to_dict(cfg),
    }
    write_json(result, out / METRICS_FILE)
    clear_train_state(out)
    print(f"eval-specz: {cfg.protocol} with {run.n_train} labels on {len(z_spec)} test galaxies: "
          f"sigma_MAD {metrics['sigma_mad']:.4f}, bias {metrics['bias']:+.4f}, eta {metrics['eta']:.3f}, "
          f"CRPS {metrics['crps']:.4f} (median-z baseline sigma_MAD {baseline['sigma_mad']:.4f}) -> {out}",
          flush=True)
    print_warnings("eval-specz", warnings)
    return result


# ---------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no display, no global state).
# ---------------------------------------------------------------------------


def _metrics_label(metrics: dict) -> str:
    return (f"$\\sigma_{{MAD}}$ = {metrics['sigma_mad']:.4f}\nbias = {metrics['bias']:+.4f}\n"
            f"$\\eta$ = {metrics['eta']:.3f}\nN = {metrics['n']}")


def plot_photoz(folder: Path, z_spec: np.ndarray, z_phot: np.ndarray, pdf: np.ndarray, edges: np.ndarray,
                metrics: dict, title: str = "", n_examples: int = 9) -> list[Path]:
    """z_phot vs z_spec density, Δz histogram and example PDFs as PNGs in ``folder``; returns the paths."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = float(edges[0]), float(edges[-1])
    paths = []

    fig = Figure(figsize=(5.2, 5))
    ax = fig.add_subplot()
    if len(z_spec) >= 500:
        *_, image = ax.hist2d(z_spec, z_phot, bins=80, range=[[lo, hi], [lo, hi]], cmap="viridis", norm=LogNorm(),
                              cmin=1)
        fig.colorbar(image, ax=ax, label="galaxies per cell")
    else:
        ax.scatter(z_spec, z_phot, s=8, alpha=0.7, color="C0")
    grid = np.linspace(lo, hi, 50)
    ax.plot(grid, grid, "k-", lw=0.8, label=_metrics_label(metrics))
    for sign in (1, -1):
        ax.plot(grid, grid + sign * OUTLIER_THRESHOLD * (1 + grid), "k--", lw=0.6)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="$z_{spec}$", ylabel="$z_{phot}$ (PDF mean)", title=title)
    ax.legend(loc="upper left", handlelength=0, frameon=True, fontsize=9)
    paths.append(folder / "zphot_vs_zspec.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot()
    dz = delta_z(z_phot, z_spec)
    span = max(0.15, float(np.quantile(np.abs(dz), 0.99)) if len(dz) else 0.15)
    ax.hist(np.clip(dz, -span, span), bins=60, range=(-span, span), color="C0", label=_metrics_label(metrics))
    for sign in (1, -1):
        ax.axvline(sign * OUTLIER_THRESHOLD, color="k", ls="--", lw=0.6)
    ax.set(xlabel="$\\Delta z = (z_{phot} - z_{spec}) / (1 + z_{spec})$", ylabel="galaxies", title=title)
    ax.legend(loc="upper right", handlelength=0, fontsize=9)
    paths.append(folder / "delta_z_hist.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    n = min(n_examples, len(z_spec))
    cols = 3
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.2 * cols, 2.3 * rows))
    picks = np.argsort(z_spec)[np.linspace(0, len(z_spec) - 1, n).astype(int)] if n else []  # spread in z_spec
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = np.diff(edges)
    for j, i in enumerate(picks):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.step(centres, pdf[i] / width, where="mid", color="C0", lw=1)
        ax.axvline(z_spec[i], color="C3", lw=1, label=f"$z_{{spec}}$ {z_spec[i]:.3f}")
        ax.axvline(z_phot[i], color="k", ls="--", lw=1, label=f"mean {z_phot[i]:.3f}")
        ax.set(xlim=(lo, hi), yticks=[])
        ax.legend(fontsize=7, loc="upper right")
        if j >= n - cols:
            ax.set_xlabel("z")
    fig.suptitle(f"example PDFs ({title})" if title else "example PDFs")
    paths.append(folder / "example_pdfs.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths
