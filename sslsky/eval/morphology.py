"""Morphology classification from images: the catalog's ``morph_class`` (Galaxy10-DECaLS-style classes).

    sslsky eval-morph --config config/eval_morph.yaml ckpt=runs/sdss/encoder.pt data.path=packed protocol=knn

``run_morph(cfg) -> dict``. Protocols ``linear``, ``finetune``, ``scratch`` train with
:func:`sslsky.train.finetune.train_supervised` (cross-entropy over the classes; see that module). ``knn``
trains nothing: the frozen encoder's features (eval mode, centred crop) are L2-normalised, each test galaxy
takes its ``knn.k`` (default 15) nearest labelled train galaxies by cosine similarity, and the class is a
**plain majority vote** (ties go to the class with the larger summed similarity); with ``knn.weighted=true``
each neighbour votes with weight exp(cos / 0.07) instead (Wu et al. 2018). The kNN "probabilities" saved are
the vote shares. Rows with ``morph_class`` = -1 (unknown) are never used.

Contract (the label-fraction sweep relies on it):

- **Idempotent**: if ``cfg.out/metrics.json`` exists and was made with the same resolved config (ignoring
  ``progress`` and ``data.num_workers``) and the same checkpoint bytes (``ckpt_sha256``), it is returned
  without training; ``metrics.json`` is written last.
- ``cfg.out/config.yaml``: the resolved config, written before training.
- ``cfg.out/metrics.json`` keys: ``task`` ("morph"), ``protocol``, ``label_fraction``, ``seed``,
  ``n_train_labels``, ``n_val``, ``n_test``, ``ckpt``, ``ckpt_sha256``; test-split ``accuracy``,
  ``macro_f1``, ``recall`` (class name -> recall, null for a class absent from the test split),
  ``precision``, ``f1``, ``support``, ``confusion_matrix`` (rows true, columns predicted), ``classes``;
  ``majority_baseline`` (accuracy and macro-F1 of always predicting the most common train class); ``knn``
  (k, weighting; null for the trained protocols); ``history``, ``best_epoch``, ``epochs_run``, ``config``.
- ``cfg.out/predictions.h5`` (atomic): per test galaxy ``object_id``, ``true_class``, ``pred_class`` (N,) and
  ``probs`` (N, K); attribute ``classes``.
- ``cfg.out/plots/confusion_matrix.png`` (row-normalised colours, counts written in the cells).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sslsky.config import ConfigError, EvalMorphConfig, config_to_dict, write_config
from sslsky.data.votes import MORPH_CLASSES
from sslsky.eval.metrics import classification_metrics
from sslsky.eval.photoz import write_predictions
from sslsky.train.finetune import (
    METRICS_FILE,
    PROTOCOLS,
    Task,
    autocast_dtype,
    build_backbone,
    check_config,
    clear_train_state,
    extract_features,
    file_sha256,
    finished_metrics,
    open_splits,
    resolve_device,
    train_supervised,
    write_json,
)

MORPH_PROTOCOLS = (*PROTOCOLS, "knn")
#: Temperature of the similarity-weighted kNN vote, exp(cos / T) (Wu et al. 2018; Caron et al. 2021).
KNN_TEMPERATURE = 0.07


def class_names(max_class: int) -> list[str]:
    """MORPH_CLASSES, extended with the bare numbers of any class beyond them."""
    names = list(MORPH_CLASSES)
    return names + [str(k) for k in range(len(names), max_class + 1)]


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray, query_features: np.ndarray, n_classes: int,
                 k: int = 15, weighted: bool = False, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """kNN by cosine similarity: ``(pred (Q,), vote shares (Q, K))`` for ``query_features`` (Q, D).

    ``train_features`` (N, D), ``train_labels`` (N,) in [0, K). Unweighted: one vote per neighbour, ties
    broken by the summed cosine similarity; weighted: votes exp(cos / KNN_TEMPERATURE).
    """
    train = torch.nn.functional.normalize(torch.as_tensor(train_features, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.int64)
    k = min(k, len(train))
    preds, shares = [], []
    for start in range(0, len(query_features), chunk):
        q = torch.nn.functional.normalize(torch.as_tensor(query_features[start:start + chunk], dtype=torch.float32),
                                          dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        neigh = labels[idx]  # (q, k)
        weight = torch.exp(sim / KNN_TEMPERATURE) if weighted else torch.ones_like(sim)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, neigh, weight)
        score = votes
        if not weighted:  # a summed similarity in (-1/2, 1/2) only breaks ties between equal counts
            summed = torch.zeros(len(q), n_classes).scatter_add_(1, neigh, sim)
            score = votes + summed / (2 * k + 1)
        preds.append(score.argmax(dim=1).numpy())
        shares.append((votes / votes.sum(dim=1, keepdim=True)).double().numpy())
    return np.concatenate(preds), np.concatenate(shares)


def _knn(cfg: EvalMorphConfig, n_classes: int) -> dict:
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    splits = open_splits(cfg, "morph_class")
    if cfg.knn.k < 1:
        raise ConfigError(f"knn.k={cfg.knn.k} must be at least 1")
    backbone = build_backbone(cfg, splits.attrs, device)
    t0 = time.perf_counter()
    train = extract_features(backbone.encoder, backbone.transform, splits.train, cfg, device, amp)
    test = extract_features(backbone.encoder, backbone.transform, splits.test, cfg, device, amp)
    pred, probs = knn_classify(train["features"], train["morph_class"], test["features"], n_classes, cfg.knn.k,
                               cfg.knn.weighted)
    elapsed = time.perf_counter() - t0
    vote = "similarity-weighted" if cfg.knn.weighted else "majority"
    print(f"eval-morph: knn (k={min(cfg.knn.k, len(splits.train))}, cosine, {vote} vote) | {backbone.arch} "
          f"({backbone.source}) | {len(splits.train)} labelled train, {len(splits.test)} test | {elapsed:.1f} s",
          flush=True)
    return {"splits": splits, "backbone": backbone, "pred": pred, "probs": probs, "object_id": test["object_id"],
            "true": test["morph_class"].astype(np.int64), "history": [], "best_epoch": 0, "epochs_run": 0,
            "train_time_s": elapsed}


def run_morph(cfg: EvalMorphConfig) -> dict:
    """Train (or kNN) and score a morphology classifier as configured; returns the metrics (module docstring)."""
    out = Path(cfg.out)
    done = finished_metrics(out, cfg)
    if done is not None:
        print(f"eval-morph: {out / METRICS_FILE} exists for this config; not training again", flush=True)
        return done
    check_config(cfg, MORPH_PROTOCOLS)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out / "config.yaml")
    probe = open_splits(cfg, "morph_class")
    labels = probe.train.index.columns["morph_class"]
    names = class_names(int(labels.max()) if len(labels) else len(MORPH_CLASSES) - 1)
    n_classes = len(names)

    if cfg.protocol == "knn":
        r = _knn(cfg, n_classes)
    else:
        task = Task("morphology", "morph_class", n_classes, lambda c: np.asarray(c, dtype=np.int64))
        run = train_supervised(cfg, task)
        pred_cols = run.predict_test()
        r = {"splits": run.splits, "backbone": run.backbone, "probs": pred_cols["probs"],
             "pred": pred_cols["probs"].argmax(axis=1), "object_id": pred_cols["object_id"],
             "true": pred_cols["morph_class"].astype(np.int64), "history": run.history,
             "best_epoch": run.best_epoch, "epochs_run": run.epochs_run, "train_time_s": run.train_time_s}
    splits, backbone = r["splits"], r["backbone"]
    metrics = classification_metrics(r["true"], r["pred"], n_classes, names)
    train_classes = splits.train.index.columns["morph_class"][splits.train.indices]
    majority = int(np.bincount(train_classes, minlength=n_classes).argmax())
    base = classification_metrics(r["true"], np.full(len(r["true"]), majority), n_classes, names)

    write_predictions(out / "predictions.h5", {
        "object_id": r["object_id"].astype(np.int64), "true_class": r["true"], "pred_class": r["pred"].astype(np.int64),
        "probs": r["probs"].astype(np.float32),
    }, {"protocol": cfg.protocol, "ckpt": cfg.ckpt, "label_fraction": cfg.label_fraction, "seed": cfg.seed,
        "classes": names})
    n_train = len(splits.train)
    plots = [plot_confusion(out / "plots" / "confusion_matrix.png", np.asarray(metrics["confusion_matrix"]), names,
                            f"{cfg.protocol}, {n_train} labels, accuracy {metrics['accuracy']:.3f}")] \
        if cfg.plots else []
    result = {
        "task": "morph", "protocol": cfg.protocol, "label_fraction": cfg.label_fraction, "seed": cfg.seed,
        "n_train_labels": n_train, "n_val": len(splits.val), "n_test": len(r["true"]), "ckpt": cfg.ckpt,
        "ckpt_sha256": file_sha256(cfg.ckpt) if cfg.ckpt else None,
        **metrics, "classes": names,
        "majority_baseline": {"class": names[majority], "accuracy": base["accuracy"], "macro_f1": base["macro_f1"]},
        "knn": ({"k": min(cfg.knn.k, n_train), "weighted": cfg.knn.weighted, "metric": "cosine"}
                if cfg.protocol == "knn" else None),
        "arch": backbone.arch, "stem": backbone.stem, "encoder_source": backbone.source,
        "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "train_time_s": r["train_time_s"],
        "history": r["history"], "plots": [str(p) for p in plots], "config": config_to_dict(cfg),
    }
    write_json(result, out / METRICS_FILE)
    clear_train_state(out)
    print(f"eval-morph: {cfg.protocol} with {n_train} labels on {len(r['true'])} test galaxies: accuracy "
          f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (majority class "
          f"{base['accuracy']:.3f}) -> {out}", flush=True)
    return result


def plot_confusion(path: Path, cm: np.ndarray, names: list[str], title: str = "") -> Path:
    """Confusion matrix PNG: colours = fraction of each true class, numbers = counts."""
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    totals = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
    size = 1.0 + 0.75 * len(names)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
