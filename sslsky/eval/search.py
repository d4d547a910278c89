"""``sslsky search``: the nearest neighbours of a galaxy in an embeddings file, and the retrieval quality.

``--query OBJECT_ID`` prints the ``k`` nearest neighbours by cosine similarity (:func:`search`: exact and chunked,
or FAISS HNSW; :mod:`sslsky.eval.neighbours`) with their redshift and class, and with ``--png`` draws them
(:func:`sslsky.eval.plots.neighbour_grid`, cutouts read from the shards); ``--evaluate`` prints
:func:`sslsky.eval.retrieval.evaluate_retrieval`.

In a file of ``space=aligned`` (``sslsky embed space=aligned`` of an align run's ``encoder.pt``) the galaxies can
also be found from words: ``--text "edge-on disk with a dust lane"`` is embedded by the run's text tower
(``embed_text``; a word it was not trained on is a ConfigError naming it and the words it knows) and
``--symbol "edge-on disk"`` (a class name) is that class's symbol prototype (mean of its symbol variants through the
symbol tower); both give the ``k`` nearest galaxies (:func:`search_vector`), and ``--evaluate`` adds text -> image
and symbol -> image retrieval. The towers come from the checkpoint in the file's attributes (``ckpt``, or the
``ckpt=`` override), which must have the bytes it was embedded with (``ckpt_sha256``): other towers are another
space (:func:`aligned_model`). Rows skipped for NaN/inf (or non-unit) embeddings are named in
a warning; a damaged file is an :class:`~sslsky.eval.embeddings.EmbeddingsError` naming it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from sslsky.config import ConfigError, SearchConfig
from sslsky.data.ids import id_text
from sslsky.data.rgb import SURVEY_RGB_BANDS
from sslsky.data.schema import RGB_BANDS
from sslsky.devices import resolve_device
from sslsky.errors import is_no_space
from sslsky.eval.embeddings import Embeddings, EmbeddingsError, morph_class_name
from sslsky.eval.neighbours import as_unit, topk_cosine, topk_faiss, usable_rows
from sslsky.eval.plots import neighbour_grid
from sslsky.eval.results import checkpoint_sha256
from sslsky.eval.retrieval import evaluate_retrieval
from sslsky.outputs import output_file, write_text_atomic


def search(emb: Embeddings, object_id: int | str, cfg: SearchConfig,
           skipped: set[int] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores (k,), rows (k,), query row) of the ``cfg.k`` nearest neighbours of ``object_id``.

    A query whose embedding holds NaN/inf is an :class:`EmbeddingsError`; such database rows are skipped
    (added to ``skipped``).
    """
    row = emb.rows_of([object_id])
    query = np.asarray(emb.vectors[int(row[0]):int(row[0]) + 1], dtype=np.float32)  # (1, F)
    if not usable_rows(as_unit(query, emb.normalized), True).all():
        what = "a non-finite embedding (NaN/inf)" if not np.isfinite(query).all() else \
            f"an embedding of norm {float(np.linalg.norm(query)):.3g}, not a unit vector"
        raise EmbeddingsError(f"object_id {object_id} (row {int(row[0])}) has {what} in "
                              f"{emb.path}, so it has no neighbours; the file was written by an older sslsky embed or "
                              f"changed since: embed the shards again (sslsky embed now refuses such rows and says "
                              f"why)")
    try:
        if cfg.index == "faiss":
            scores, rows = topk_faiss(query, emb.vectors, cfg.k, exclude=row, hnsw_m=cfg.faiss_m,
                                      ef_search=cfg.faiss_ef_search, chunk_size=cfg.chunk_size, skipped=skipped)
        else:
            scores, rows = topk_cosine(query, emb.vectors, cfg.k, cfg.chunk_size, exclude=row,
                                       device=resolve_device(cfg.device), skipped=skipped, unit_norm=emb.normalized,
                                       cosine=not emb.normalized)
    except EmbeddingsError as err:
        raise EmbeddingsError(f"{emb.path}: {err}") from None
    return scores[0], rows[0], int(row[0])


def search_vector(emb: Embeddings, query: np.ndarray, cfg: SearchConfig,
                  skipped: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (k,), rows (k,)) of the ``cfg.k`` rows nearest to ``query`` (F,), a unit vector that is no row of
    the file (a text or symbol query: nothing excluded)."""
    query = np.asarray(query, dtype=np.float32)[None, :]  # (1, F)
    try:
        if cfg.index == "faiss":
            scores, rows = topk_faiss(query, emb.vectors, cfg.k, hnsw_m=cfg.faiss_m, ef_search=cfg.faiss_ef_search,
                                      chunk_size=cfg.chunk_size, skipped=skipped)
        else:
            scores, rows = topk_cosine(query, emb.vectors, cfg.k, cfg.chunk_size, device=resolve_device(cfg.device),
                                       skipped=skipped, unit_norm=emb.normalized, cosine=not emb.normalized)
    except EmbeddingsError as err:
        raise EmbeddingsError(f"{emb.path}: {err}") from None
    return scores[0], rows[0]


def aligned_model(emb: Embeddings, cfg: SearchConfig, why: str):
    """The align towers (:func:`sslsky.methods.align.load_aligned`, eval mode on ``cfg.device``) whose image tower
    made ``emb``: the checkpoint ``cfg.ckpt``, else the file's ``ckpt`` attribute. An EmbeddingsError for a file of
    encoder features, a missing checkpoint, other bytes than were embedded, or another embedding size."""
    from sslsky.methods.align import load_aligned
    from sslsky.models.loading import CheckpointError

    space = str(emb.attrs.get("space") or "features")
    if space != "aligned":
        raise EmbeddingsError(f"{why} needs embeddings in an align run's shared space, but {emb.path} holds encoder "
                              f"{space} (space={space}); embed with `sslsky embed --ckpt ALIGN_RUN/encoder.pt "
                              f"--data {emb.attrs.get('data') or 'SHARDS'} --out FILE space=aligned`")
    ckpt = cfg.ckpt or str(emb.attrs.get("ckpt") or "")
    where = "ckpt=" if cfg.ckpt else f"the checkpoint {emb.path} was embedded with,"
    if not ckpt or not Path(ckpt).is_file():
        raise EmbeddingsError(f"{why} needs the align run's text and symbol towers: {where} {ckpt or '(none)'}, is "
                              f"not a file; give ckpt=PATH of the encoder.pt the file was embedded with")
    recorded = str(emb.attrs.get("ckpt_sha256") or "")
    if recorded and checkpoint_sha256(ckpt) != recorded:
        raise EmbeddingsError(f"{ckpt} is not the checkpoint {emb.path} was embedded with (its SHA-256 differs): "
                              f"its towers map to another space; embed again with it (space=aligned) or give ckpt= "
                              f"of the original")
    try:
        model, _ = load_aligned(ckpt, resolve_device(cfg.device))
    except CheckpointError as err:
        raise EmbeddingsError(str(err)) from None
    dim = int(model.image_projection.out_features)
    if dim != emb.feature_dim:
        raise EmbeddingsError(f"{ckpt} embeds into {dim} dimensions but {emb.path} holds {emb.feature_dim}: not the "
                              f"checkpoint it was embedded with")
    return model


def text_query(model, text: str) -> np.ndarray:
    """``(D,)`` unit vector of ``text`` through the text tower; a ConfigError naming unknown words."""
    import torch

    from sslsky.data.captions import words

    if not any(w[0].isalnum() for w in words(text)):  # punctuation alone says nothing either
        raise ConfigError(f"--text {text!r} has no words; give a description, e.g. --text 'an edge-on disk galaxy'")
    try:
        tokens = model.tokenizer.encode([text], model.text_tower.context, strict=True)
    except ValueError as err:
        raise ConfigError(f"--text: {err}") from None
    with torch.no_grad():
        vector = model.embed_text(tokens.to(model.logit_scale.device)).float()
    return torch.nn.functional.normalize(vector, dim=1)[0].cpu().numpy()


def symbol_query(model, name: str) -> np.ndarray:
    """``(D,)`` symbol prototype of the class ``name`` (any case); a ConfigError listing the classes."""
    names = [n.lower() for n in model.class_names]
    if name.strip().lower() not in names:
        raise ConfigError(f"--symbol {name!r} is not a class of the align run; choose one of: "
                          f"{', '.join(model.class_names)}")
    return model.prototypes()["symbol"][names.index(name.strip().lower())].cpu().numpy()


def _warn_skipped(emb: Embeddings, skipped: set[int]) -> None:
    """Say how many rows (and which object ids) a search skipped for NaN/inf embeddings."""
    if not skipped:
        return
    rows = np.sort(np.fromiter(skipped, np.int64, len(skipped)))
    ids = ", ".join(id_text(i) for i in emb.columns["object_id"][rows[:5]])
    more = f" and {rows.size - 5} more" if rows.size > 5 else ""
    print(f"sslsky search: warning: skipped {rows.size} of {len(emb)} rows of {emb.path} whose embeddings hold "
          f"NaN/inf{' or are not unit vectors' if emb.normalized else ''} (object_id {ids}{more}): they are never "
          f"neighbours. The file was written by an older sslsky embed or changed since; embed the shards again to "
          f"search them", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _reading(emb: Embeddings):
    """A read error of the (streamed) embeddings becomes an :class:`EmbeddingsError` naming the file."""
    try:
        yield
    except OSError as err:
        if is_no_space(err):
            raise
        raise EmbeddingsError(f"cannot read {emb.path} ({err}): the file is damaged; make it again with "
                              f"`sslsky embed`") from None


def _images(emb: Embeddings, rows: list[int], data: str) -> tuple[list[np.ndarray], str, str]:
    """Cutouts ``(C, H, W)`` of embedding rows from the shards, checked by object_id; and bands, survey."""
    from sslsky.data.shards import ShardDataset

    try:
        dataset = ShardDataset(data)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise EmbeddingsError(f"cannot read the shards for the images (--data {data}): {err}") from None
    ids = dataset.index.columns["object_id"]
    images = []
    by_id = None
    index = emb.columns.get("index")  # absent in hand-made files: found by object_id below
    for r in rows:
        oid, g = emb.columns["object_id"][r].item(), int(index[r]) if index is not None else -1
        if not (0 <= g < len(ids) and ids[g].item() == oid):  # other shards than were embedded: find by id
            if by_id is None:
                by_id = {v: i for i, v in enumerate(ids.tolist())}
            if oid not in by_id:
                raise EmbeddingsError(f"object_id {oid} is not in the shards {data}; pass the --data that was embedded "
                                      f"({emb.attrs.get('data')})")
            g = by_id[oid]
        images.append(dataset.read_image(g))
    dataset.close()
    bands = dataset.attrs.get("bands") or emb.attrs.get("bands") or ""
    bands = "".join(bands) if isinstance(bands, (list, tuple)) else str(bands)
    survey = str(dataset.attrs.get("survey") or emb.attrs.get("survey") or "")
    return images, bands, survey


def run_search(cfg: SearchConfig) -> int:
    """``sslsky search``: neighbours of ``cfg.query`` (printed, optional PNG grid) and/or ``cfg.evaluate``."""
    if not cfg.embeddings:
        raise ConfigError("sslsky search needs --embeddings FILE (made by `sslsky embed`)")
    asked = [flag for flag, value in (("--query", cfg.query is not None), ("--text", cfg.text),
                                      ("--symbol", cfg.symbol)) if value]
    if not asked and not cfg.evaluate:
        raise ConfigError("give --query OBJECT_ID, --text CAPTION or --symbol CLASS (aligned embeddings), or "
                          "--evaluate for the retrieval quality over all labelled rows")
    if len(asked) > 1:
        raise ConfigError(f"give one of {' and '.join(asked)} at a time")
    if cfg.k < 1 or cfg.chunk_size < 1 or cfg.query_batch < 1:
        raise ConfigError(f"k={cfg.k}, chunk_size={cfg.chunk_size} and query_batch={cfg.query_batch} must be >= 1")
    if cfg.index not in ("exact", "faiss"):
        raise ConfigError(f"index={cfg.index!r}: choose exact (chunked, default) or faiss (optional package)")
    resolve_device(cfg.device)  # a device not to be had: refused before the file is opened
    for key, example in (("png", "grid.png"), ("eval_json", "retrieval.json")):  # refused before the search
        path = getattr(cfg, key)
        if path and Path(path).is_dir():
            raise ConfigError(f"{key}={path!r} is a folder: give a file name, e.g. {Path(path) / example}")
        if path:
            output_file(path, key)
    with Embeddings(cfg.embeddings, cfg.cache_mb) as emb:
        most = len(emb) - (1 if cfg.query is not None or cfg.evaluate else 0)  # the query row excluded
        if cfg.k > most:
            raise ConfigError(f"k={cfg.k} but {emb.path} holds {len(emb)} rows ({most} neighbours at most)")
        skipped: set[int] = set()  # rows with NaN/inf embeddings, found by the searches
        model = None
        if cfg.text or cfg.symbol:
            model = aligned_model(emb, cfg, "--text" if cfg.text else "--symbol")
        elif cfg.evaluate and str(emb.attrs.get("space") or "features") == "aligned":
            model = aligned_model(emb, cfg, "--evaluate of aligned embeddings (text -> image)")
        try:
            if cfg.query is not None:
                _print_neighbours(emb, cfg, skipped)
            if cfg.text or cfg.symbol:
                _print_word_neighbours(emb, cfg, skipped, model)
            if cfg.evaluate:
                _print_evaluation(emb, cfg, skipped, model)
        finally:
            _warn_skipped(emb, skipped)
    return 0


def _print_neighbours(emb: Embeddings, cfg: SearchConfig, skipped: set[int]) -> None:
    started = time.perf_counter()
    with _reading(emb):
        scores, rows, qrow = search(emb, cfg.query, cfg, skipped)
    seconds = time.perf_counter() - started
    cols = emb.columns
    query_class = morph_class_name(int(cols["morph_class"][qrow]), emb.attrs)
    print(f"query {cfg.query} (row {qrow}): z={cols['z'][qrow]:.4f} class={query_class}")
    _print_table(emb, scores, rows)
    summary = (f"sslsky search: {cfg.k} neighbours of {cfg.query} among {len(emb)} embeddings "
               f"({'exact cosine, chunks of ' + str(cfg.chunk_size) if cfg.index == 'exact' else 'FAISS HNSW'}) "
               f"in {seconds:.3f} s")
    if cfg.png:
        data = cfg.data or str(emb.attrs.get("data") or "")
        if not data:
            raise ConfigError("--png needs --data SHARDS (the embeddings file does not say which shards it came from)")
        images, bands, survey = _images(emb, [qrow, *rows.tolist()], data)
        names = [morph_class_name(int(cols["morph_class"][r]), emb.attrs) for r in [qrow, *rows.tolist()]]
        titles = [f"query {cfg.query}\nz={cols['z'][qrow]:.3f}\n{names[0]}"]
        titles += [f"{i}. {id_text(cols['object_id'][r])}\ncos={s:.3f} z={cols['z'][r]:.3f}\n{names[i]}"
                   for i, (s, r) in enumerate(zip(scores, rows), 1)]
        summary += _write_grid(cfg, images, titles, bands, survey)
    print(summary, flush=True)


def _print_word_neighbours(emb: Embeddings, cfg: SearchConfig, skipped: set[int], model) -> None:
    """``--text`` / ``--symbol``: the k galaxies nearest to the caption's embedding or the class's symbol
    prototype, printed as for ``--query`` (and the PNG grid: a blank first panel titled with the query)."""
    started = time.perf_counter()
    if cfg.text:
        what, vector = f"text {cfg.text!r}", text_query(model, cfg.text)
    else:
        what, vector = f"symbol {cfg.symbol!r}", symbol_query(model, cfg.symbol)
    with _reading(emb):
        scores, rows = search_vector(emb, vector, cfg, skipped)
    seconds = time.perf_counter() - started
    cols = emb.columns
    print(f"query {what} ({'text' if cfg.text else 'symbol'} tower of {cfg.ckpt or emb.attrs.get('ckpt')})")
    _print_table(emb, scores, rows)
    summary = (f"sslsky search: {cfg.k} galaxies nearest to {what} among {len(emb)} aligned embeddings in "
               f"{seconds:.3f} s")
    if cfg.png:
        data = cfg.data or str(emb.attrs.get("data") or "")
        if not data:
            raise ConfigError("--png needs --data SHARDS (the embeddings file does not say which shards it came from)")
        images, bands, survey = _images(emb, rows.tolist(), data)
        titles = [f"query\n{what}"]
        titles += [f"{i}. {id_text(cols['object_id'][r])}\ncos={s:.3f} z={cols['z'][r]:.3f}\n"
                   f"{morph_class_name(int(cols['morph_class'][r]), emb.attrs)}"
                   for i, (s, r) in enumerate(zip(scores, rows), 1)]
        blank = np.full_like(images[0], 1e-6)  # a dark panel that holds the query's title (0 flux would be 0/0)
        summary += _write_grid(cfg, [blank, *images], titles, bands, survey)
    print(summary, flush=True)


def _print_table(emb: Embeddings, scores: np.ndarray, rows: np.ndarray) -> None:
    cols = emb.columns
    print(f"{'rank':>4}  {'object_id':>19}  {'cosine':>7}  {'z':>7}  class")
    for i, (score, r) in enumerate(zip(scores, rows), 1):
        print(f"{i:>4}  {id_text(cols['object_id'][r]):>19}  {score:7.4f}  {cols['z'][r]:7.4f}  "
              f"{morph_class_name(int(cols['morph_class'][r]), emb.attrs)}")


def _write_grid(cfg: SearchConfig, images: list[np.ndarray], titles: list[str], bands: str, survey: str) -> str:
    """The PNG grid of ``images`` (the query panel first); the summary's words about it."""
    rgb = RGB_BANDS if bands == RGB_BANDS else (
        cfg.rgb_bands or SURVEY_RGB_BANDS.get(survey, bands[-1:-4:-1] if len(bands) >= 3 else ""))
    try:
        path = neighbour_grid(images, titles, bands, rgb, cfg.png, cfg.grid_columns, cfg.rgb_stretch, cfg.rgb_q)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return f"; grid ({rgb} as RGB) -> {path}"


def _print_evaluation(emb: Embeddings, cfg: SearchConfig, skipped: set[int], model=None) -> None:
    started = time.perf_counter()
    prototypes, names = None, None
    if model is not None and model.label != "morph_class":
        print(f"search: {emb.path} was aligned on vote paths (model.align.labels={model.label}), not classes: text "
              f"and symbol retrieval, scored by class, are left out", flush=True)
    elif model is not None:  # aligned embeddings: the class prototypes as queries too
        prototypes = {kind: v.cpu().numpy() for kind, v in model.prototypes().items()}
        names = list(model.class_names)
    with _reading(emb):
        result = evaluate_retrieval(emb, cfg.k, cfg.chunk_size, cfg.query_batch, cfg.eval_queries, cfg.seed,
                                    resolve_device(cfg.device), progress=cfg.progress, skipped=skipped,
                                    prototypes=prototypes, prototype_names=names)
    result["seconds"] = time.perf_counter() - started
    result["embeddings"] = str(emb.path)
    n, r = result["neighbours"], result["random"]
    skipped_note = f", {result['skipped_rows']} with NaN/inf skipped" if result["skipped_rows"] else ""
    print(f"retrieval quality, k={cfg.k}, {result['queries']} queries among {result['rows']} embeddings"
          f"{skipped_note}:")
    print(f"  {'':22}{'class agreement':>16}  {'median |dz|/(1+z)':>18}")
    print(f"  {'nearest neighbours':22}{n['class_agreement']:16.3f}  {n['median_dz']:18.4f}")
    print(f"  {'random neighbours':22}{r['class_agreement']:16.3f}  {r['median_dz']:18.4f}")
    print(f"  {'chance (class counts)':22}{result['chance_class_agreement']:16.3f}")
    per_class = ", ".join(f"{name} {v:.2f}" for name, v in result["class_agreement_per_class"].items())
    print(f"  class agreement by query class: {per_class}")
    for key, label in (("image_to_image", "image -> image"), ("text_to_image", "text -> image"),
                       ("symbol_to_image", "symbol -> image")):
        if key in result:
            r = result[key]
            note = f", {r['queries_without_relevant']} without a relevant row" if r["queries_without_relevant"] else ""
            print(f"  {label:22}precision@{cfg.k} {r['precision_at_k']:.3f}  mAP@{cfg.k} {r['map_at_k']:.3f}  "
                  f"({r['queries']} queries{note}; relevant = same class)")
            if r.get("classes_not_in_data"):
                print(f"  {'':22}(classes of the align run absent from the file, not queried: "
                      f"{', '.join(r['classes_not_in_data'])})")
    if cfg.eval_json:
        write_text_atomic(cfg.eval_json, json.dumps(result, indent=2), "the evaluation")
    print(f"sslsky search: evaluated {result['queries']} queries in {result['seconds']:.2f} s"
          + (f" -> {cfg.eval_json}" if cfg.eval_json else ""), flush=True)
