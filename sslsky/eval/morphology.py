"""Morphology from images: the catalog's ``morph_class`` (Galaxy10-DECaLS-style classes) or vote fractions.

    sslsky eval-morph --config config/eval_morph.yaml ckpt=runs/sdss/encoder.pt data.path=packed protocol=knn
    sslsky eval-morph --config config/eval_morph.yaml ckpt=runs/sdss/encoder.pt data.path=packed target=votes

``run_morph(cfg) -> dict``. ``cfg.target`` picks what is predicted:

- ``class`` (default): protocols ``linear``, ``finetune``, ``scratch`` train with
  :func:`sslsky.eval.supervised.train_supervised` (cross-entropy over the classes; see that module). ``knn``
  trains nothing: the frozen encoder's features (eval mode, centred crop) are L2-normalised, each test galaxy
  takes its ``knn.k`` (default 15) nearest labelled train galaxies by cosine similarity, and the class is a
  **plain majority vote** (ties go to the class with the larger summed similarity); with ``knn.weighted=true``
  each neighbour votes with weight exp(cos / 0.07) instead (Wu et al. 2018). The kNN "probabilities" saved
  are the vote shares. Rows with ``morph_class`` = -1 (unknown) are never used.
  ``cluster`` trains nothing and uses no label to form its partition: k-means (``cluster.k`` clusters, default
  the number of classes) on the frozen, L2-normalised features of the test galaxies, scored against their
  classes by NMI, ARI and the Hungarian-matched cluster accuracy (:mod:`sslsky.eval.clustering`; the metrics of
  Wei et al. 2022). ``metrics.json`` then holds ``nmi``, ``ari``, ``cluster_accuracy``, ``n_clusters``,
  ``cluster`` (k, n_init, inertia) and the same baseline of a random partition, instead of the accuracy keys;
  ``predictions.h5`` holds ``object_id``, ``true_class`` and ``cluster``.
  ``zeroshot`` trains nothing and uses no train label (:func:`zeroshot_predictions`): the ``encoder.pt`` of a
  ``method: align`` run (another method's file is a config error, exit 2) embeds the test galaxies (eval view,
  ``embed_image``, L2-normalised) and each takes the class whose prototype is nearest by cosine: its text
  prototype (mean of the class's caption embeddings), its symbol prototype (mean of its symbol variants), and
  the combination (the mean of the two cosines). The data's classes are matched to the run's ``class_names`` by
  name (a test class the run lacks is a config error naming it); the class indices of ``metrics.json`` and
  ``predictions.h5`` are the run's. ``metrics.json``: the combination's class keys below (``accuracy``,
  ``macro_f1``, ...), ``accuracy_text``, ``macro_f1_text``, ``accuracy_symbol``, ``macro_f1_symbol``,
  ``zeroshot`` (``text`` and ``symbol``: their full class metrics; ``combination``), ``chance_accuracy``
  (1 / classes) instead of ``majority_baseline``; ``predictions.h5``: ``pred_class`` (combination),
  ``pred_class_text``, ``pred_class_symbol`` and ``probs`` = the combined cosines (N, K), not probabilities.
- ``votes``: Galaxy-Zoo vote fractions of the decision trees of ``cfg.votes.campaigns`` (declared as in
  pretraining; default the GZ2-like tree of the mock), as regression of the counts (Walmsley et al. 2022).
  Rows = galaxies with at least one vote in those columns (the train rows thinned by ``label_fraction`` in
  the same nested, seeded way as classes). The trained protocols' head gives A Dirichlet concentrations in
  (1, 101) (the hybrid pretraining's vote head: ``CONCENTRATION_MIN + CONCENTRATION_RANGE * sigmoid``); the
  loss is the Dirichlet-multinomial NLL summed over the questions, averaged over galaxies; early stopping on
  the val NLL. The predicted fraction of an answer is its expected value alpha_a / sum_q alpha. ``knn``
  predicts the mean observed fractions of the k neighbours asked each question (exp(cos / 0.07)-weighted with
  ``knn.weighted``; the train-mean fractions where none of them was asked) and has no NLL.

Contract (the label-fraction sweep relies on it):

- **Idempotent**: if ``cfg.out/metrics.json`` exists and was made with the same resolved config (ignoring
  ``progress`` and ``data.num_workers``) and the same checkpoint bytes (``ckpt_sha256``), it is returned
  without training; ``metrics.json`` is written last.
- ``cfg.out/config.yaml``: the resolved config, written before training (once the data and the encoder are
  open). A bad ``out`` (a file, not writable) is refused before any work.
- ``cfg.out/metrics.json`` keys, both targets: ``task`` ("morph"), ``target`` ("class" | "votes"),
  ``protocol``, ``label_fraction``, ``seed``, ``n_train_labels``, ``n_val``, ``n_test``, ``ckpt``,
  ``ckpt_sha256``; ``knn`` (k, weighting; null for the trained protocols); ``history``, ``best_epoch``,
  ``epochs_run``, ``config``; ``prior_only``: null, or with ``optim.allow_prior`` why the kept model is only
  the prior (epoch 0; classes: or one class for every val galaxy). Without it such a model is refused: no
  metrics.json, exit status 4, ``cfg.out/metrics.prior_only.json`` (:func:`sslsky.eval.results.refuse_prior_only`).
  ``warnings``: why the test split is too small to mean anything (:func:`sslsky.eval.metrics.small_test_warnings`:
  fewer than 20 labelled test galaxies; classes: a train class with no test galaxy; also printed), [] when
  it is not.

  - class: test-split ``accuracy``, ``macro_f1``, ``recall`` (class name -> recall, null for a class absent
    from the test split), ``precision``, ``f1``, ``support``, ``confusion_matrix`` (rows true, columns
    predicted), ``classes``; ``majority_baseline`` (accuracy and macro-F1 of always predicting the most
    common train class).
  - votes (:func:`vote_metrics`): ``vote_mae`` (mean over questions of the per-question MAE: mean
    |predicted - observed fraction| over the answers and the test galaxies asked the question, i.e. with
    at least one vote on it), ``vote_nll`` (mean test Dirichlet-multinomial NLL per galaxy; null for knn),
    ``most_voted_accuracy`` (mean over questions of the per-question accuracy of the most-voted answer:
    argmax predicted vs argmax observed, over galaxies with >= 3 votes on the question and no tie for the
    most votes), ``per_question`` (question -> ``vote_mae``, ``n_asked``, ``most_voted_accuracy``,
    ``n_most_voted``), ``questions``, ``vote_columns``; ``train_mean_baseline`` (the same MAE and accuracy of
    predicting the train-mean observed fractions for every galaxy, with its ``fractions``).
- ``cfg.out/predictions.h5`` (atomic), per test galaxy: class: ``object_id``, ``true_class``, ``pred_class`` (N,)
  and ``probs`` (N, K), attribute ``classes``; votes: ``object_id`` (N,), ``votes`` (N, A) observed counts,
  ``pred_fractions`` (N, A) and (trained protocols) ``concentrations`` (N, A), attributes ``vote_columns``,
  ``questions``, ``question_slices`` (Q, 2).
- ``cfg.out/plots/``: class: ``confusion_matrix.png`` (row-normalised colours, counts written in the cells);
  votes: ``vote_fractions.png`` (predicted against observed fraction, one panel per question).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sslsky.config import ConfigError, EvalMorphConfig, config_to_dict, write_config
from sslsky.devices import autocast_dtype, resolve_device
from sslsky.eval.backbone import build_backbone
from sslsky.eval.clustering import cluster_metrics, kmeans_clusters
from sslsky.eval.features import extract_features
from sslsky.eval.metrics import classification_metrics, small_test_warnings, small_train_warnings
from sslsky.eval.photoz import write_predictions
from sslsky.eval.results import (
    METRICS_FILE,
    checkpoint_sha256,
    clear_train_state,
    finished_metrics,
    print_warnings,
    refuse_prior_only,
    write_json,
)
from sslsky.eval.supervised import train_supervised
from sslsky.eval.task import PROTOCOLS, Task, check_config, error_score, label_values, open_splits
from sslsky.locks import OutputLock, run_evaluation_locked
from sslsky.losses import dirichlet_multinomial_nll
from sslsky.methods.votes import CONCENTRATION_MIN, CONCENTRATION_RANGE
from sslsky.models.heads import init_prior
from sslsky.outputs import output_dir
from sslsky.vocabulary import MORPH_CLASSES, VoteSchema, class_names

MORPH_PROTOCOLS = (*PROTOCOLS, "knn", "cluster", "zeroshot")
MORPH_TARGETS = ("class", "votes")
#: The most-voted answer of a question is scored on galaxies with at least this many votes on it.
MOST_VOTED_MIN_VOTES = 3
#: Temperature of the similarity-weighted kNN vote, exp(cos / T) (Wu et al. 2018; Caron et al. 2021).
KNN_TEMPERATURE = 0.07


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


def knn_vote_fractions(train_features: np.ndarray, train_fractions: np.ndarray, query_features: np.ndarray,
                       fallback: np.ndarray, k: int = 15, weighted: bool = False, chunk: int = 4096) -> np.ndarray:
    """kNN vote fractions by cosine similarity: ``(Q, A)`` for ``query_features`` (Q, D).

    ``train_fractions`` (N, A): observed fractions, NaN over the questions a galaxy was not asked. Each
    answer's prediction is the mean (weighted: exp(cos / KNN_TEMPERATURE)) over the k neighbours asked its
    question; ``fallback`` (A,) where none of them was.
    """
    train = torch.nn.functional.normalize(torch.as_tensor(train_features, dtype=torch.float32), dim=1)
    asked = np.isfinite(train_fractions)
    values = np.where(asked, train_fractions, 0.0)
    k = min(k, len(train))
    out = []
    for start in range(0, len(query_features), chunk):
        q = torch.nn.functional.normalize(torch.as_tensor(query_features[start:start + chunk], dtype=torch.float32),
                                          dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        sim, idx = sim.double().numpy(), idx.numpy()
        weight = np.exp(sim / KNN_TEMPERATURE) if weighted else np.ones_like(sim)  # (q, k)
        total = np.einsum("qk,qka->qa", weight, values[idx])
        norm = np.einsum("qk,qka->qa", weight, asked[idx].astype(np.float64))
        out.append(np.where(norm > 0, total / np.where(norm > 0, norm, 1.0), fallback[None, :]))
    return np.concatenate(out) if out else np.zeros((0, train_fractions.shape[1]))


def _knn_features(cfg: EvalMorphConfig, label: str, vote_columns=None) -> tuple:
    """(splits, backbone, train features, test features, t0) of the frozen encoder for the kNN protocol;
    ``cfg.out/config.yaml`` is written once the data and the encoder are open."""
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    splits = open_splits(cfg, label, vote_columns)
    backbone = build_backbone(cfg, splits.attrs, device)
    write_config(cfg, output_dir(cfg.out, "out") / "config.yaml")
    t0 = time.perf_counter()
    train = extract_features(backbone.encoder, backbone.transform, splits.train, cfg, device, amp)
    test = extract_features(backbone.encoder, backbone.transform, splits.test, cfg, device, amp)
    return splits, backbone, train, test, t0


def _knn_message(cfg: EvalMorphConfig, splits, backbone, elapsed: float, vote: str) -> None:
    print(f"eval-morph: knn (k={min(cfg.knn.k, len(splits.train))}, cosine, {vote}) | {backbone.arch} "
          f"({backbone.source}) | {len(splits.train)} labelled train, {len(splits.test)} test | {elapsed:.1f} s",
          flush=True)


def _knn(cfg: EvalMorphConfig, n_classes: int) -> dict:
    splits, backbone, train, test, t0 = _knn_features(cfg, "morph_class")
    pred, probs = knn_classify(train["features"], train["morph_class"], test["features"], n_classes, cfg.knn.k,
                               cfg.knn.weighted)
    elapsed = time.perf_counter() - t0
    _knn_message(cfg, splits, backbone, elapsed, "similarity-weighted vote" if cfg.knn.weighted else "majority vote")
    return {"splits": splits, "backbone": backbone, "pred": pred, "probs": probs, "object_id": test["object_id"],
            "true": test["morph_class"].astype(np.int64), "history": [], "best_epoch": 0, "epochs_run": 0,
            "train_time_s": elapsed}


def _run_cluster(cfg: EvalMorphConfig, names: list[str], out: Path) -> dict:
    """Protocol ``cluster``: k-means of the frozen test features, scored against the test classes."""
    if cfg.target != "class":
        raise ConfigError("protocol=cluster scores clusters against classes: use target=class")
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    splits = open_splits(cfg, "morph_class")
    backbone = build_backbone(cfg, splits.attrs, device)
    k = cfg.cluster.k or len(names)
    if len(splits.test) < k:
        raise ConfigError(f"protocol=cluster with k={k} needs at least {k} labelled test galaxies; "
                          f"{cfg.data.path} has {len(splits.test)}: set cluster.k lower or use more data")
    write_config(cfg, output_dir(cfg.out, "out") / "config.yaml")
    t0 = time.perf_counter()
    test = extract_features(backbone.encoder, backbone.transform, splits.test, cfg, device, amp)
    true = test["morph_class"].astype(np.int64)
    clusters, inertia = kmeans_clusters(test["features"], k, cfg.seed, cfg.cluster.n_init)
    scores = cluster_metrics(true, clusters)
    chance = cluster_metrics(true, np.random.default_rng(cfg.seed).integers(0, k, len(true)))
    elapsed = time.perf_counter() - t0
    warnings = small_test_warnings(len(true))
    write_predictions(out / "predictions.h5", {"object_id": test["object_id"], "true_class": true,
                                               "cluster": clusters},
                      {"protocol": cfg.protocol, "ckpt": cfg.ckpt, "seed": cfg.seed, "classes": names})
    result = {
        "task": "morph", "target": "class", "protocol": "cluster", "label_fraction": cfg.label_fraction,
        "seed": cfg.seed, "n_train_labels": 0, "n_val": len(splits.val), "n_test": len(true),
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None, **scores,
        "classes": names, "cluster": {"k": k, "n_init": cfg.cluster.n_init, "inertia": inertia,
                                      "features": "L2-normalised, test split"},
        "random_partition_baseline": {key: chance[key] for key in ("nmi", "ari", "cluster_accuracy")},
        "arch": backbone.arch, "stem": backbone.stem, "encoder_source": backbone.source, "best_epoch": 0,
        "epochs_run": 0, "train_time_s": elapsed, "prior_only": None, "warnings": warnings, "history": [],
        "plots": [], "config": config_to_dict(cfg),
    }
    write_json(result, out / METRICS_FILE)
    print(f"eval-morph: cluster (k-means, k={k}) | {backbone.arch} ({backbone.source}) | {len(true)} test "
          f"galaxies: NMI {scores['nmi']:.3f}, ARI {scores['ari']:.3f}, cluster accuracy "
          f"{scores['cluster_accuracy']:.3f} (random partition: NMI {chance['nmi']:.3f}, ARI {chance['ari']:.3f}) "
          f"| {elapsed:.1f} s -> {out}", flush=True)
    print_warnings("eval-morph", warnings)
    return result


def zeroshot_predictions(images: np.ndarray, prototypes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Nearest class prototype by cosine: ``{"text", "symbol", "combined"}`` -> (N,) class indices, and
    ``"similarity"`` -> (N, K) the combined score.

    Args:
        images: (N, D) image embeddings (normalised here).
        prototypes: ``"text"``, ``"symbol"`` -> (K, D) class prototypes (normalised here).
    The combination scores each class by the mean of its text and symbol cosines.
    """
    x = torch.nn.functional.normalize(torch.as_tensor(images, dtype=torch.float32), dim=1)
    cos = {kind: (x @ torch.nn.functional.normalize(torch.as_tensor(p, dtype=torch.float32), dim=1).T).numpy()
           for kind, p in prototypes.items()}  # (N, K) each
    combined = (cos["text"] + cos["symbol"]) / 2
    return {"text": cos["text"].argmax(axis=1), "symbol": cos["symbol"].argmax(axis=1),
            "combined": combined.argmax(axis=1), "similarity": combined}


def _zeroshot_test_split(cfg: EvalMorphConfig):
    """The labelled test rows (no train split is needed: no label is learnt from)."""
    from sslsky.data.shards import ShardDataset

    try:
        test = ShardDataset(cfg.data.path, split="test", label="morph_class")
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise ConfigError(f"data.path={cfg.data.path!r} (label 'morph_class'): {err}") from None
    if len(test) == 0:
        raise ConfigError(f"{cfg.data.path}: the test split has no galaxy with a morph_class label, so zero-shot "
                          f"predictions cannot be scored; pack a catalog with a morph_class (or --label-column)")
    return test


def _run_zeroshot(cfg: EvalMorphConfig, out: Path) -> dict:
    """Protocol ``zeroshot``: nearest text / symbol prototype of an align run, scored on the test split."""
    from sslsky.methods.align import load_aligned
    from sslsky.models.loading import CheckpointError

    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.amp, device)
    test = _zeroshot_test_split(cfg)
    try:
        model, loaded = load_aligned(cfg.ckpt, device)
    except CheckpointError as err:
        raise ConfigError(f"ckpt: {err}") from None
    if model.label != "morph_class":
        raise ConfigError(f"ckpt {cfg.ckpt} was aligned with vote paths (model.align.labels={model.label}), not "
                          f"classes; zero-shot classification needs an align run with model.align.labels=morph_class")
    bands = len(test.attrs.get("bands") or "") or None
    if bands is not None and loaded.in_channels != bands:
        raise ConfigError(f"ckpt {cfg.ckpt} takes {loaded.in_channels} bands but the data in {cfg.data.path} have "
                          f"{bands} ({test.attrs.get('bands')})")
    labels = test.index.columns["morph_class"][test.indices]
    data_names = class_names(int(labels.max()), test.attrs)
    names = list(model.class_names)
    missing = sorted({data_names[c] for c in np.unique(labels)} - set(names))
    if missing:
        raise ConfigError(f"the test split of {cfg.data.path} has class(es) {', '.join(map(repr, missing))} that the "
                          f"align run {cfg.ckpt} has no prototype for (its classes: {', '.join(names)}); align on "
                          f"data with these classes, or leave them out of the test split")
    to_model = np.array([names.index(n) if n in names else -1 for n in data_names])  # data class -> run's class
    write_config(cfg, output_dir(cfg.out, "out") / "config.yaml")
    t0 = time.perf_counter()

    class ImageTower(torch.nn.Module):  # extract_features' encoder: the eval view -> the shared space
        def forward(self, x: Tensor) -> Tensor:
            return model.embed_image(x)

    features = extract_features(ImageTower(), loaded.transform.to(device), test, cfg, device, amp)
    prototypes = {kind: v.cpu().numpy() for kind, v in model.prototypes().items()}
    pred = zeroshot_predictions(features["features"], prototypes)
    true = to_model[features["morph_class"].astype(np.int64)]
    n_classes = len(names)
    scores = {kind: classification_metrics(true, pred[kind], n_classes, names) for kind in ("text", "symbol")}
    metrics = classification_metrics(true, pred["combined"], n_classes, names)
    elapsed = time.perf_counter() - t0
    warnings = small_test_warnings(len(true))
    write_predictions(out / "predictions.h5", {
        "object_id": features["object_id"], "true_class": true, "pred_class": pred["combined"].astype(np.int64),
        "pred_class_text": pred["text"].astype(np.int64), "pred_class_symbol": pred["symbol"].astype(np.int64),
        "probs": pred["similarity"].astype(np.float32),
    }, {"protocol": cfg.protocol, "ckpt": cfg.ckpt, "seed": cfg.seed, "classes": names,
        "probs": "mean of the text and symbol cosine similarities, not probabilities"})
    plots = [plot_confusion(out / "plots" / "confusion_matrix.png", np.asarray(metrics["confusion_matrix"]), names,
                            f"zero-shot (text + symbol), accuracy {metrics['accuracy']:.3f}")] if cfg.plots else []
    result = {
        "task": "morph", "target": "class", "protocol": "zeroshot", "label_fraction": cfg.label_fraction,
        "seed": cfg.seed, "n_train_labels": 0, "n_val": 0, "n_test": len(true),
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt), **metrics, "classes": names,
        "accuracy_text": scores["text"]["accuracy"], "macro_f1_text": scores["text"]["macro_f1"],
        "accuracy_symbol": scores["symbol"]["accuracy"], "macro_f1_symbol": scores["symbol"]["macro_f1"],
        "zeroshot": {**scores, "combination": "mean of the text and symbol cosine similarities",
                     "embed_dim": int(prototypes["text"].shape[1]), "symbol_tower": model.stage()["symbol_tower"]},
        "chance_accuracy": 1.0 / n_classes,
        "knn": None, "arch": loaded.arch, "stem": loaded.stem, "encoder_source": loaded.source, "best_epoch": 0,
        "epochs_run": 0, "train_time_s": elapsed, "prior_only": None, "warnings": warnings, "history": [],
        "plots": [str(p) for p in plots], "config": config_to_dict(cfg),
    }
    write_json(result, out / METRICS_FILE)
    print(f"eval-morph: zeroshot ({loaded.arch}, align run {cfg.ckpt}) on {len(true)} test galaxies: accuracy "
          f"{metrics['accuracy']:.3f} (text {scores['text']['accuracy']:.3f}, symbol "
          f"{scores['symbol']['accuracy']:.3f}), macro-F1 {metrics['macro_f1']:.3f} (chance {1.0 / n_classes:.3f}) "
          f"| {elapsed:.1f} s -> {out}", flush=True)
    print_warnings("eval-morph", warnings)
    return result


# ---------------------------------------------------------------------------
# Vote fractions (target=votes).
# ---------------------------------------------------------------------------


def vote_schema(cfg: EvalMorphConfig) -> VoteSchema:
    """The vote columns of ``cfg.votes.campaigns``, grouped per question (ConfigError on a malformed tree)."""
    try:
        return VoteSchema.from_campaigns(cfg.votes.campaigns)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def vote_concentrations(outputs: Tensor) -> Tensor:
    """(B, A) head outputs -> Dirichlet concentrations in (1, 101), as the hybrid pretraining's vote head."""
    return CONCENTRATION_MIN + CONCENTRATION_RANGE * torch.sigmoid(outputs)


def vote_task(schema: VoteSchema) -> Task:
    """The vote-fraction regression for :func:`sslsky.eval.supervised.train_supervised`: a head of A outputs,
    the Dirichlet-multinomial NLL per galaxy (summed over questions) as the loss, concentrations as output."""
    def loss(outputs: Tensor, counts: Tensor) -> Tensor:  # (B, A), (B, A) -> (B,)
        return dirichlet_multinomial_nll(vote_concentrations(outputs), counts, schema.slices, reduction="none")

    def init_head(head: torch.nn.Sequential, counts: np.ndarray) -> None:
        # init_prior sets the last bias to log(prior): prior = p / (1 - p) gives logit(p), the sigmoid's inverse.
        p = (vote_prior_concentrations(counts, schema.slices) - CONCENTRATION_MIN) / CONCENTRATION_RANGE
        init_prior(head, torch.from_numpy(p / (1.0 - p)))

    return Task("vote fractions", "votes", schema.n_answers, lambda v: np.asarray(v, dtype=np.float32), loss=loss,
                output=vote_concentrations, output_name="concentrations", target_dtype=np.float32,
                vote_columns=schema.columns, init_head=init_head)


def vote_prior_concentrations(counts: np.ndarray, slices, n_grid: int = 64) -> np.ndarray:
    """(A,) concentrations of the head before training: per question the train-mean fractions times the total
    concentration that maximises the Dirichlet-multinomial likelihood of the train counts (N, A) while every
    alpha stays in the head's range (1, 101) -- so epoch 0 predicts the train-mean fractions with a fitted
    spread (if no total fits, e.g. an answer nobody chose, the alphas are clipped to the range)."""
    lo, hi = CONCENTRATION_MIN * (1 + 1e-3), (CONCENTRATION_MIN + CONCENTRATION_RANGE) * (1 - 1e-3)
    mean = train_mean_fractions(counts, slices)
    out = np.empty(counts.shape[1])
    k = torch.as_tensor(counts, dtype=torch.float64)
    for start, stop in slices:
        f = np.maximum(mean[start:stop], 1e-6)
        smallest, largest = sorted((lo / f.min(), hi / f.max()))  # totals that keep every alpha in range
        totals = np.geomspace(smallest, largest, n_grid)  # (G,) sums of the question's alphas
        alphas = np.clip(totals[:, None] * f[None, :], lo, hi)  # (G, A_q)
        nll = [float(dirichlet_multinomial_nll(torch.as_tensor(a).expand(len(k), -1), k[:, start:stop],
                                               [(0, stop - start)]).item()) for a in alphas]
        out[start:stop] = alphas[int(np.argmin(nll))]
    return out


def expected_fractions(concentrations: np.ndarray, slices) -> np.ndarray:
    """(N, A) Dirichlet concentrations -> (N, A) expected vote fractions alpha_a / sum over the question's alpha."""
    out = np.empty(concentrations.shape, dtype=np.float64)
    for start, stop in slices:
        alpha = concentrations[:, start:stop].astype(np.float64)
        out[:, start:stop] = alpha / alpha.sum(axis=1, keepdims=True)
    return out


def observed_fractions(counts: np.ndarray, slices) -> np.ndarray:
    """(N, A) vote counts -> (N, A) fractions per question; NaN over a question a galaxy was not asked."""
    out = np.full(counts.shape, np.nan)
    for start, stop in slices:
        k = counts[:, start:stop].astype(np.float64)
        n = k.sum(axis=1, keepdims=True)
        np.divide(k, n, out=out[:, start:stop], where=n > 0)
    return out


def train_mean_fractions(counts: np.ndarray, slices) -> np.ndarray:
    """(A,) mean observed fractions of each question over the galaxies asked it (uniform if none was)."""
    fractions = observed_fractions(counts, slices)
    out = np.empty(counts.shape[1])
    for start, stop in slices:
        asked = np.isfinite(fractions[:, start])
        out[start:stop] = fractions[asked, start:stop].mean(axis=0) if asked.any() else 1.0 / (stop - start)
    return out


def vote_metrics(pred_fractions: np.ndarray, counts: np.ndarray, schema: VoteSchema,
                 concentrations: np.ndarray | None = None) -> dict:
    """Vote-fraction regression metrics (module docstring): ``vote_mae``, ``most_voted_accuracy``,
    ``per_question``, and ``vote_nll`` (mean over the galaxies with votes) from ``concentrations`` (None
    without them).

    Args:
        pred_fractions: (N, A) predicted fractions, each question's summing to 1.
        counts: (N, A) observed vote counts.
        concentrations: (N, A) Dirichlet concentrations of the prediction, or None.
    """
    per_question = {}
    for name, (start, stop) in zip(schema.questions, schema.slices):
        k = counts[:, start:stop].astype(np.float64)  # (N, A_q)
        n = k.sum(axis=1)
        asked = n > 0
        observed = k[asked] / n[asked, None]
        mae = float(np.abs(pred_fractions[asked, start:stop] - observed).mean()) if asked.any() else None
        top = k.max(axis=1)
        scored = (n >= MOST_VOTED_MIN_VOTES) & ((k == top[:, None]).sum(axis=1) == 1)
        hits = pred_fractions[scored, start:stop].argmax(axis=1) == k[scored].argmax(axis=1)
        per_question[name] = {"vote_mae": mae, "n_asked": int(asked.sum()),
                              "most_voted_accuracy": float(hits.mean()) if scored.any() else None,
                              "n_most_voted": int(scored.sum())}

    def mean_over_questions(key: str) -> float | None:
        values = [q[key] for q in per_question.values() if q[key] is not None]
        return float(np.mean(values)) if values else None

    nll, voted = None, counts.sum(axis=1) > 0
    if concentrations is not None and voted.any():  # mean over the galaxies with votes (the others give 0)
        nll = float(dirichlet_multinomial_nll(torch.as_tensor(concentrations[voted], dtype=torch.float64),
                                              torch.as_tensor(counts[voted]), schema.slices).item())
    return {"vote_mae": mean_over_questions("vote_mae"), "vote_nll": nll,
            "most_voted_accuracy": mean_over_questions("most_voted_accuracy"), "per_question": per_question}


def _knn_votes(cfg: EvalMorphConfig, schema: VoteSchema) -> dict:
    splits, backbone, train, test, t0 = _knn_features(cfg, "votes", schema.columns)
    fallback = train_mean_fractions(train["votes"], schema.slices)
    fractions = knn_vote_fractions(train["features"], observed_fractions(train["votes"], schema.slices),
                                   test["features"], fallback, cfg.knn.k, cfg.knn.weighted)
    elapsed = time.perf_counter() - t0
    _knn_message(cfg, splits, backbone, elapsed, ("similarity-weighted" if cfg.knn.weighted else "plain")
                 + " mean of the neighbours' vote fractions")
    return {"splits": splits, "backbone": backbone, "fractions": fractions, "concentrations": None,
            "counts": test["votes"], "object_id": test["object_id"], "history": [], "best_epoch": 0,
            "epochs_run": 0, "train_time_s": elapsed}


def _run_votes(cfg: EvalMorphConfig, schema: VoteSchema, out: Path) -> dict:
    """target=votes: train (or kNN), score, write predictions and plots; returns metrics.json's content."""
    if cfg.protocol == "knn":
        r = _knn_votes(cfg, schema)
    else:
        run = train_supervised(cfg, vote_task(schema))
        prior_only = refuse_prior_only(run, "eval-morph")  # raises PriorOnlyError unless optim.allow_prior
        pred = run.predict_test()
        r = {"splits": run.splits, "backbone": run.backbone, "concentrations": pred["concentrations"],
             "fractions": expected_fractions(pred["concentrations"], schema.slices), "counts": pred["votes"],
             "object_id": pred["object_id"], "history": run.history, "best_epoch": run.best_epoch,
             "epochs_run": run.epochs_run, "train_time_s": run.train_time_s, "prior_only": prior_only}
    splits, backbone, counts = r["splits"], r["backbone"], np.asarray(r["counts"], dtype=np.int64)
    metrics = vote_metrics(r["fractions"], counts, schema, r["concentrations"])
    mean = train_mean_fractions(label_values(splits.train, "votes"), schema.slices)
    base = vote_metrics(np.broadcast_to(mean, counts.shape), counts, schema)

    columns = {"object_id": np.asarray(r["object_id"]), "votes": counts.astype(np.int32),
               "pred_fractions": r["fractions"].astype(np.float32)}
    if r["concentrations"] is not None:
        columns["concentrations"] = r["concentrations"].astype(np.float32)
    write_predictions(out / "predictions.h5", columns, {
        "protocol": cfg.protocol, "ckpt": cfg.ckpt, "label_fraction": cfg.label_fraction, "seed": cfg.seed,
        "target": "votes", "vote_columns": list(schema.columns), "questions": list(schema.questions),
        "question_slices": np.asarray(schema.slices, dtype=np.int64)})
    n_train = len(splits.train)
    plots = [plot_vote_fractions(out / "plots" / "vote_fractions.png", r["fractions"], counts, schema,
                                 f"{cfg.protocol}, {n_train} labels")] if cfg.plots else []
    result = {
        "task": "morph", "target": "votes", "protocol": cfg.protocol, "label_fraction": cfg.label_fraction,
        "seed": cfg.seed, "n_train_labels": n_train, "n_val": len(splits.val), "n_test": len(counts),
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None,
        **metrics, "questions": list(schema.questions), "vote_columns": list(schema.columns),
        "train_mean_baseline": {"vote_mae": base["vote_mae"], "most_voted_accuracy": base["most_voted_accuracy"],
                                "per_question": {q: v["vote_mae"] for q, v in base["per_question"].items()},
                                "fractions": dict(zip(schema.columns, mean.tolist()))},
        "knn": ({"k": min(cfg.knn.k, n_train), "weighted": cfg.knn.weighted, "metric": "cosine"}
                if cfg.protocol == "knn" else None),
        "arch": backbone.arch, "stem": backbone.stem, "encoder_source": backbone.source,
        "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "train_time_s": r["train_time_s"],
        "prior_only": r.get("prior_only"),
        "history": r["history"], "plots": [str(p) for p in plots], "config": config_to_dict(cfg),
    }
    result["warnings"] = small_test_warnings(len(counts)) + small_train_warnings(n_train)
    nll = f", NLL {metrics['vote_nll']:.3f}" if metrics["vote_nll"] is not None else ""
    print(f"eval-morph: votes {cfg.protocol} with {n_train} labels on {len(counts)} test galaxies: vote MAE "
          f"{metrics['vote_mae']:.4f}{nll} (train-mean baseline {base['vote_mae']:.4f}) -> {out}", flush=True)
    print_warnings("eval-morph", result["warnings"])
    return result


def run_morph(cfg: EvalMorphConfig) -> dict:
    """Train (or kNN) and score a morphology classifier (or vote-fraction model) as configured; returns the
    metrics (module docstring). One evaluation at a time per out folder: ``OUT/eval.lock`` is held from the
    check of the folder to the end; a second one is refused (ConfigError naming the holder)."""
    return run_evaluation_locked("eval-morph", _run_morph, cfg)


def _run_morph(cfg: EvalMorphConfig, lock: OutputLock) -> dict:
    out = Path(cfg.out)
    done = finished_metrics(out, cfg)
    if done is not None:
        print(f"eval-morph: {out / METRICS_FILE} exists for this config; not training again", flush=True)
        print_warnings("eval-morph", done.get("warnings") or [])
        return done
    check_config(cfg, MORPH_PROTOCOLS)
    if cfg.target not in MORPH_TARGETS:
        raise ConfigError(f"target={cfg.target!r}: choose one of {', '.join(MORPH_TARGETS)}")
    if cfg.protocol == "zeroshot" and cfg.target != "class":
        raise ConfigError("protocol=zeroshot predicts classes from the align run's class prototypes: use "
                          "target=class")
    schema = vote_schema(cfg) if cfg.target == "votes" else None
    output_dir(cfg.out, "out")  # a file or a read-only folder: a message now, not after the training
    lock.acquire()  # another evaluation writing this folder: refused, naming it
    if schema is not None:
        result = _run_votes(cfg, schema, out)
        write_json(result, out / METRICS_FILE)
        clear_train_state(out)
        return result
    if cfg.protocol == "zeroshot":
        return _run_zeroshot(cfg, out)
    probe = open_splits(cfg, "morph_class")
    labels = probe.train.index.columns["morph_class"]
    names = class_names(int(labels.max()) if len(labels) else len(MORPH_CLASSES) - 1, probe.attrs)
    n_classes = len(names)

    if cfg.protocol == "cluster":
        return _run_cluster(cfg, names, out)
    if cfg.protocol == "knn":
        r = _knn(cfg, n_classes)
    else:
        task = Task("morphology", "morph_class", n_classes, lambda c: np.asarray(c, dtype=np.int64),
                    val_score=error_score, val_score_name="val_error", one_class_is_prior=True)
        run = train_supervised(cfg, task)
        prior_only = refuse_prior_only(run, "eval-morph")  # raises PriorOnlyError unless optim.allow_prior
        pred_cols = run.predict_test()
        r = {"splits": run.splits, "backbone": run.backbone, "probs": pred_cols["probs"],
             "pred": pred_cols["probs"].argmax(axis=1), "object_id": pred_cols["object_id"],
             "true": pred_cols["morph_class"].astype(np.int64), "history": run.history,
             "best_epoch": run.best_epoch, "epochs_run": run.epochs_run, "train_time_s": run.train_time_s,
             "prior_only": prior_only}
    splits, backbone = r["splits"], r["backbone"]
    metrics = classification_metrics(r["true"], r["pred"], n_classes, names)
    train_classes = splits.train.index.columns["morph_class"][splits.train.indices]
    majority = int(np.bincount(train_classes, minlength=n_classes).argmax())
    base = classification_metrics(r["true"], np.full(len(r["true"]), majority), n_classes, names)
    warnings = small_test_warnings(len(r["true"]), train_classes, r["true"], names)
    warnings += small_train_warnings(len(train_classes), train_classes, r["true"], names)
    if cfg.protocol == "knn" and cfg.knn.k > len(train_classes):
        warnings.append(f"knn.k={cfg.knn.k} but only {len(train_classes)} labelled train galaxies: each test galaxy "
                        f"votes over all of them (k={len(train_classes)})")

    write_predictions(out / "predictions.h5", {
        "object_id": r["object_id"], "true_class": r["true"], "pred_class": r["pred"].astype(np.int64),
        "probs": r["probs"].astype(np.float32),
    }, {"protocol": cfg.protocol, "ckpt": cfg.ckpt, "label_fraction": cfg.label_fraction, "seed": cfg.seed,
        "classes": names})
    n_train = len(splits.train)
    plots = [plot_confusion(out / "plots" / "confusion_matrix.png", np.asarray(metrics["confusion_matrix"]), names,
                            f"{cfg.protocol}, {n_train} labels, accuracy {metrics['accuracy']:.3f}")] \
        if cfg.plots else []
    result = {
        "task": "morph", "target": "class", "protocol": cfg.protocol, "label_fraction": cfg.label_fraction,
        "seed": cfg.seed, "n_train_labels": n_train, "n_val": len(splits.val), "n_test": len(r["true"]),
        "ckpt": cfg.ckpt, "ckpt_sha256": checkpoint_sha256(cfg.ckpt) if cfg.ckpt else None,
        **metrics, "classes": names,
        "majority_baseline": {"class": names[majority], "accuracy": base["accuracy"], "macro_f1": base["macro_f1"]},
        "knn": ({"k": min(cfg.knn.k, n_train), "weighted": cfg.knn.weighted, "metric": "cosine"}
                if cfg.protocol == "knn" else None),
        "arch": backbone.arch, "stem": backbone.stem, "encoder_source": backbone.source,
        "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "train_time_s": r["train_time_s"],
        "prior_only": r.get("prior_only"), "warnings": warnings,
        "history": r["history"], "plots": [str(p) for p in plots], "config": config_to_dict(cfg),
    }
    write_json(result, out / METRICS_FILE)
    clear_train_state(out)
    print(f"eval-morph: {cfg.protocol} with {n_train} labels on {len(r['true'])} test galaxies: accuracy "
          f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (majority class "
          f"{base['accuracy']:.3f}) -> {out}", flush=True)
    print_warnings("eval-morph", warnings)
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


def plot_vote_fractions(path: Path, pred_fractions: np.ndarray, counts: np.ndarray, schema: VoteSchema,
                        title: str = "") -> Path:
    """Predicted against observed vote fraction, one panel per question (galaxies asked it), one colour per
    answer, the question's MAE in the panel title."""
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    observed = observed_fractions(counts, schema.slices)
    n = len(schema.questions)
    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.3 * cols, 3.2 * rows))
    for j, (name, (start, stop)) in enumerate(zip(schema.questions, schema.slices)):
        ax = fig.add_subplot(rows, cols, j + 1)
        asked = np.isfinite(observed[:, start])
        for a in range(start, stop):
            answer = schema.columns[a][len(name) + 1:]
            ax.scatter(observed[asked, a], pred_fractions[asked, a], s=6, alpha=0.6, label=answer)
        ax.plot([0, 1], [0, 1], "k-", lw=0.6)
        mae = np.abs(pred_fractions[asked, start:stop] - observed[asked, start:stop]).mean() if asked.any() else np.nan
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name} (MAE {mae:.3f}, N {int(asked.sum())})")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6, loc="upper left", markerscale=2)
        if j >= n - cols:
            ax.set_xlabel("observed fraction")
        if j % cols == 0:
            ax.set_ylabel("predicted fraction")
    fig.suptitle(f"vote fractions ({title})" if title else "vote fractions")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
