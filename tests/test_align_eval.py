"""Evaluation of aligned encoders (issue 13, item 4): zero-shot classification (``eval-morph protocol=zeroshot``),
``sslsky embed space=aligned``, ``sslsky search --text / --symbol`` and precision@k / mAP@k in ``--evaluate``.

One tiny align run (6 CPU steps, two stages: symbols through the image tower, then their own tower) serves the
module. Every number is checked against an independent NumPy computation from the exported towers (prototypes
rebuilt here from the captions and symbol variants, nearest prototype and brute-force rankings in NumPy), never
against a threshold the tiny model might or might not reach.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from astropy.table import Table
from conftest import make_survey, pack_args, tiny_pretrain_args

from sslsky.cli import main
from sslsky.config import SweepConfig, load_config
from sslsky.data.shards import ShardDataset
from sslsky.eval.retrieval import ranked_precision
from sslsky.eval.sweep import cells
from sslsky.methods.align import load_aligned
from sslsky.vocabulary import class_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALIGN = ["method=align", "optim.total_steps=6", "model.align.stages=[{steps: 3}, {steps: 3, symbol_tower: own, "
         "image_symbol: 1.0}]", "model.align.text_depth=1", "model.align.text_width=32", "model.align.embed_dim=16",
         "val_every=3", "checkpoint_every=3"]
MORPH = ["data.num_workers=0", "device=cpu", "progress=false"]


@pytest.fixture(scope="module")
def aligned(packed_mock, tmp_path_factory) -> dict:
    """The align run's encoder.pt, its towers, and its embeddings of packed_mock (space=aligned)."""
    root = tmp_path_factory.mktemp("align_eval")
    assert main(tiny_pretrain_args(packed_mock, root / "run", *ALIGN)) == 0
    ckpt = root / "run" / "encoder.pt"
    emb = root / "aligned.h5"
    assert main(["embed", "--ckpt", str(ckpt), "--data", str(packed_mock), "--out", str(emb), "--space", "aligned",
                 "num_workers=0", "batch_size=16", "progress=false"]) == 0
    model, loaded = load_aligned(ckpt)
    return {"root": root, "ckpt": ckpt, "emb": emb, "model": model, "loaded": loaded}


def numpy_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_prototypes(model) -> dict[str, np.ndarray]:
    """Class prototypes from the towers, written out: the mean of the unit embeddings of each class's captions
    (text) and symbol variants (the run ended in a stage with the symbol tower of its own), renormalised."""
    text, symbol = [], []
    with torch.no_grad():
        for captions in model.captions:
            tokens = model.tokenizer.encode(captions, model.text_tower.context)
            e = model.text_projection(model.text_tower(tokens)).numpy()
            text.append(numpy_unit(e).mean(axis=0))
        for variants in model.symbols:  # (V, C, S, S)
            e = model.symbol_projection(model.symbol_tower(variants)).numpy()
            symbol.append(numpy_unit(e).mean(axis=0))
    return {"text": numpy_unit(np.stack(text)), "symbol": numpy_unit(np.stack(symbol))}


def numpy_image_embeddings(model, loaded, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        e = model.image_projection(model.image_tower(loaded.transform(torch.from_numpy(images)))).numpy()
    return numpy_unit(e)


def numpy_macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    f1 = []
    for c in np.union1d(true, pred):
        tp = np.sum((true == c) & (pred == c))
        f1.append(2 * tp / (np.sum(true == c) + np.sum(pred == c)))
    return float(np.mean(f1))


def numpy_average_precision(relevant: list[bool], n_relevant: int, k: int) -> float:
    """AP@k by the definition: mean over the relevant ranks i <= k of precision@i, over min(k, n_relevant)."""
    total, hits = 0.0, 0
    for i, rel in enumerate(relevant[:k], 1):
        if rel:
            hits += 1
            total += hits / i
    return total / min(k, n_relevant)


def test_zeroshot_equals_nearest_prototype_in_numpy(aligned, packed_mock, tmp_path, capsys):
    out = tmp_path / "zs"
    args = ["eval-morph", f"data.path={packed_mock}", f"ckpt={aligned['ckpt']}", "protocol=zeroshot", f"out={out}",
            *MORPH]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    model, loaded = aligned["model"], aligned["loaded"]
    test = ShardDataset(packed_mock, split="test", label="morph_class")
    images = np.stack([test.read_image(int(r)) for r in test.indices])
    labels = test.index.columns["morph_class"][test.indices]
    data_names = class_names(int(labels.max()), test.attrs)
    true = np.array([model.class_names.index(data_names[c]) for c in labels])
    x = numpy_image_embeddings(model, loaded, images)
    proto = numpy_prototypes(model)
    cos = {kind: x @ p.T for kind, p in proto.items()}
    pred = {"text": cos["text"].argmax(1), "symbol": cos["symbol"].argmax(1),
            "combined": ((cos["text"] + cos["symbol"]) / 2).argmax(1)}
    assert m["protocol"] == "zeroshot" and m["n_train_labels"] == 0 and m["n_test"] == len(true)
    for kind, suffix in (("text", "_text"), ("symbol", "_symbol"), ("combined", "")):
        assert m["accuracy" + suffix] == pytest.approx(np.mean(pred[kind] == true), abs=1e-12), kind
        assert m["macro_f1" + suffix] == pytest.approx(numpy_macro_f1(true, pred[kind]), abs=1e-12), kind
    with h5py.File(out / "predictions.h5", "r") as handle:
        np.testing.assert_array_equal(handle["object_id"][()], test.index.columns["object_id"][test.indices])
        np.testing.assert_array_equal(handle["true_class"][()], true)
        for kind, name in (("text", "pred_class_text"), ("symbol", "pred_class_symbol"), ("combined", "pred_class")):
            np.testing.assert_array_equal(handle[name][()], pred[kind])
        np.testing.assert_allclose(handle["probs"][()], (cos["text"] + cos["symbol"]) / 2, atol=1e-5)
    assert m["classes"] == model.class_names and m["chance_accuracy"] == pytest.approx(1 / len(model.class_names))
    assert "zeroshot" in capsys.readouterr().out
    assert main(args) == 0  # done for this config and these checkpoint bytes
    assert "exists for this config" in capsys.readouterr().out


def test_zeroshot_refusals_are_messages(aligned, packed_mock, encoder_path, tmp_path, capsys):
    base = ["eval-morph", f"data.path={packed_mock}", "protocol=zeroshot", *MORPH]
    assert main([*base, f"ckpt={encoder_path}", f"out={tmp_path / 'moco'}"]) == 2  # a MoCo export
    err = capsys.readouterr().err
    assert "holds no aligned text and symbol towers" in err and "method 'moco'" in err and "Traceback" not in err
    assert main([*base, f"ckpt={aligned['ckpt']}", "target=votes", f"out={tmp_path / 'v'}"]) == 2
    assert "use target=class" in capsys.readouterr().err

    # an export whose classes lack one the test split has: renamed in the file (captions and vocabulary kept)
    test = ShardDataset(packed_mock, split="test", label="morph_class")
    present = class_names(6, test.attrs)[int(test.index.columns["morph_class"][test.indices][0])]
    state = torch.load(aligned["ckpt"], weights_only=True)
    names = state["method_state"]["names"]
    state["method_state"]["names"] = [("ring galaxy" if n == present else n) for n in names]
    renamed = tmp_path / "renamed.pt"
    torch.save(state, renamed)
    assert main([*base, f"ckpt={renamed}", f"out={tmp_path / 'renamed'}"]) == 2
    err = capsys.readouterr().err
    assert f"'{present}'" in err and "no prototype" in err and "ring galaxy" in err

    # a pack whose test split has no morph_class label at all
    catalog = make_survey(tmp_path / "survey", n=24)
    table = Table.read(catalog)
    table["morph_class"] = -1
    table.write(catalog, overwrite=True)
    assert main(pack_args(catalog, tmp_path / "unlabelled")) == 0
    assert main([*base, f"data.path={tmp_path / 'unlabelled'}", f"ckpt={aligned['ckpt']}",
                 f"out={tmp_path / 'none'}"]) == 2
    assert "no galaxy with a morph_class label" in capsys.readouterr().err
    assert not (tmp_path / "none" / "metrics.json").exists()


def test_sweep_runs_zeroshot_once_per_seed_for_morph_only():
    cfg = load_config(SweepConfig, None, ["tasks=[specz, morph, votes]", "protocols=[linear, zeroshot]",
                                          "label_fractions=[0.1, 1.0]", "seeds=[0, 1]"])
    grid = [(c.task, c.protocol, c.label_fraction, c.seed) for c in cells(cfg)]
    assert [g for g in grid if g[1] == "zeroshot"] == [("morph", "zeroshot", 1.0, 0), ("morph", "zeroshot", 1.0, 1)]


def test_embed_aligned_stores_the_image_tower_projection(aligned, packed_mock, encoder_path, tmp_path, capsys):
    dataset = ShardDataset(packed_mock)
    with h5py.File(aligned["emb"], "r") as handle:
        vectors = handle["embeddings"][()]
        attrs = dict(handle.attrs)
    assert vectors.shape == (len(dataset), 16) and attrs["space"] == "aligned" and attrs["feature_dim"] == 16
    assert attrs["ckpt"] == str(aligned["ckpt"].resolve()) and len(attrs["ckpt_sha256"]) == 64
    rows = [0, 50, len(dataset) - 1]
    expected = numpy_image_embeddings(aligned["model"], aligned["loaded"],
                                      np.stack([dataset.read_image(r) for r in rows]))
    np.testing.assert_allclose(vectors[rows], expected, atol=1e-5)
    out = tmp_path / "moco.h5"
    assert main(["embed", "--ckpt", str(encoder_path), "--data", str(packed_mock), "--out", str(out),
                 "space=aligned", "num_workers=0", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "space=aligned" in err and "method=align" in err and not out.exists()


def test_text_and_symbol_queries_equal_a_numpy_brute_force(aligned, tmp_path, capsys):
    model = aligned["model"]
    with h5py.File(aligned["emb"], "r") as handle:
        vectors, ids = handle["embeddings"][()].astype(np.float64), handle["object_id"][()]
    text = "edge-on disk with a dust lane"
    with torch.no_grad():
        t = model.text_projection(model.text_tower(model.tokenizer.encode([text], model.text_tower.context))).numpy()
    queries = {"--text": (text, numpy_unit(t)[0]),
               "--symbol": ("Edge-On Disk", numpy_prototypes(model)["symbol"][model.class_names.index("edge-on disk")])}
    for flag, (value, vector) in queries.items():
        png = tmp_path / f"{flag[2:]}.png"
        assert main(["search", "--embeddings", str(aligned["emb"]), flag, value, "--k", "5", "--png", str(png)]) == 0
        printed = capsys.readouterr().out
        lines = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
        expected = np.argsort(-(vectors @ vector), kind="stable")[:5]
        assert [int(line[1]) for line in lines] == ids[expected].tolist(), flag
        np.testing.assert_allclose([float(line[2]) for line in lines], (vectors @ vector)[expected], atol=1e-4)
        assert png.stat().st_size > 0


def test_word_query_refusals_are_messages(aligned, packed_mock, encoder_path, tmp_path, capsys):
    search = ["search", "--embeddings", str(aligned["emb"]), "--k", "3"]
    assert main([*search, "--text", "a spiral with a flux capacitor"]) == 2
    err = capsys.readouterr().err
    assert "['flux', 'capacitor']" in err and "edge-on" in err and "Traceback" not in err  # names known words too
    assert main([*search, "--symbol", "blob"]) == 2
    assert "edge-on disk" in capsys.readouterr().err
    assert main([*search, "--text", "a galaxy", "--symbol", "edge-on disk"]) == 2
    assert "one of" in capsys.readouterr().err
    for empty in ("   ", ",,,"):  # no words: refused, never a ranking of the bare <sot> <eot> caption
        assert main([*search, "--text", empty]) == 2
        assert "has no words" in capsys.readouterr().err
    features = tmp_path / "features.h5"
    assert main(["embed", "--ckpt", str(encoder_path), "--data", str(packed_mock), "--out", str(features),
                 "num_workers=0", "progress=false"]) == 0
    assert main(["search", "--embeddings", str(features), "--text", "a galaxy"]) == 2
    assert "space=aligned" in capsys.readouterr().err
    other = tmp_path / "other.pt"  # other bytes than were embedded: another space
    state = torch.load(aligned["ckpt"], weights_only=True)
    state["method_state"]["weights"]["logit_scale"] = state["method_state"]["weights"]["logit_scale"] + 1
    torch.save(state, other)
    assert main([*search, "--text", "a galaxy", f"ckpt={other}"]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err
    assert main([*search, "--text", "a galaxy", f"ckpt={tmp_path / 'gone.pt'}"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_ranked_precision_by_hand():
    relevant = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], bool)
    precision, ap = ranked_precision(relevant, np.array([2, 4, 9, 0]))
    np.testing.assert_allclose(precision, [2 / 3, 0, 1, 1 / 3])
    np.testing.assert_allclose(ap[:3], [(1 + 2 / 3) / 2, 0.0, 1.0])
    assert np.isnan(ap[3])  # no relevant item anywhere: left out of mAP


def test_evaluate_map_and_precision_equal_a_numpy_brute_force(aligned, tmp_path, capsys):
    k = 7
    out = tmp_path / "retrieval.json"
    assert main(["search", "--embeddings", str(aligned["emb"]), "--evaluate", "--k", str(k),
                 f"eval_json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "text -> image" in printed and "mAP@7" in printed
    r = json.loads(out.read_text())
    with h5py.File(aligned["emb"], "r") as handle:
        vectors, morph_class = handle["embeddings"][()].astype(np.float64), handle["morph_class"][()]
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)  # the query itself excluded
    precision, ap = [], []
    for q in np.flatnonzero(morph_class >= 0):
        top = np.argsort(-scores[q], kind="stable")[:k]
        rel = (morph_class[top] == morph_class[q]).tolist()
        n_rel = int(np.sum(morph_class == morph_class[q])) - 1
        precision.append(np.mean(rel))
        if n_rel:
            ap.append(numpy_average_precision(rel, n_rel, k))
    got = r["image_to_image"]
    assert got["queries"] == len(precision) and got["precision_at_k"] == pytest.approx(np.mean(precision), abs=1e-9)
    assert got["map_at_k"] == pytest.approx(np.mean(ap), abs=1e-9)

    model = aligned["model"]
    proto = numpy_prototypes(model)["text"]
    data_names = {class_names(int(c), {})[c]: int(c) for c in np.unique(morph_class[morph_class >= 0])}
    text_ap, text_precision = {}, []
    for j, name in enumerate(model.class_names):
        if name not in data_names:
            continue
        top = np.argsort(-(vectors @ proto[j]), kind="stable")[:k]
        rel = (morph_class[top] == data_names[name]).tolist()
        text_precision.append(np.mean(rel))
        text_ap[name] = numpy_average_precision(rel, int(np.sum(morph_class == data_names[name])), k)
    got = r["text_to_image"]
    assert got["queries"] == len(text_ap) and got["precision_at_k"] == pytest.approx(np.mean(text_precision))
    assert got["map_at_k"] == pytest.approx(np.mean(list(text_ap.values())), abs=1e-9)
    assert {n: v["ap_at_k"] for n, v in got["per_class"].items()} == pytest.approx(text_ap, abs=1e-9)
    assert r["symbol_to_image"]["queries"] == len(text_ap)
