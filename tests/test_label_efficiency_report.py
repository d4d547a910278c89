"""benchmarks/label_efficiency.py's table from sweep cells on disk: values and intervals from each cell's
predictions.h5 (as sslsky.eval.intervals computes them), missing seeds, test sets that disagree."""

from __future__ import annotations

import importlib.util
import json
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO

from sslsky.eval import intervals


@pytest.fixture(scope="module")
def le():
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_efficiency"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("label_efficiency", None)


N_TEST = 40
LABELS = {0.1: 20, 1.0: 200}


def write_cell(work, task, protocol, fraction, seed, rng, skill, ids=None):
    folder = work / "sweep" / task / protocol / f"frac{fraction:g}" / f"seed{seed}"
    folder.mkdir(parents=True)
    ids = np.arange(N_TEST)[::-1] if ids is None else ids  # not sorted: the report sorts by object id
    truth_rng = np.random.default_rng(7)  # the same test galaxies in every cell
    with h5py.File(folder / "predictions.h5", "w") as f:
        f["object_id"] = ids
        if task == "specz":
            z = truth_rng.uniform(0.02, 0.3, N_TEST)
            f["z_spec"] = z
            f["z_mean"] = z + rng.normal(0, 0.05 * (1 - skill), N_TEST) * (1 + z)
        else:
            true = truth_rng.integers(0, 3, N_TEST)
            f["true_class"] = true
            f["pred_class"] = np.where(rng.random(N_TEST) < skill, true, (true + 1) % 3)
    (folder / "metrics.json").write_text(json.dumps({"task": task, "n_train_labels": LABELS[fraction],
                                                     "best_epoch": 3, "epochs_run": 5, "prior_only": None}))


@pytest.fixture
def work(tmp_path):
    rng = np.random.default_rng(0)
    for task in ("specz", "morph"):
        for protocol, base in (("linear", 0.4), ("finetune", 0.6), ("scratch", 0.3)):
            for fraction in LABELS:
                for seed in (0, 1, 2):
                    write_cell(tmp_path, task, protocol, fraction, seed, rng, base + 0.3 * (fraction == 1.0))
    return tmp_path


def test_table_values_are_the_cells_means_and_intervals(le, work):
    tables = le.task_tables(work, sorted(LABELS), [0, 1, 2], 100)
    morph = tables["morph"]
    assert len(morph.truth) == N_TEST and set(morph.cells) == {(p, f) for p in ("linear", "finetune", "scratch")
                                                               for f in LABELS}
    cell = morph.cells[("finetune", 0.1)]
    assert cell.n_labels == 20 and cell.predictions.shape == (3, N_TEST)
    lines, saving = le.build_report(tables, sorted(LABELS), 100)
    row = next(line for line in lines if line.startswith("| 20 | finetune |"))
    point = intervals.cell_value(cell, morph.truth, "accuracy")
    assert f"{point:.3f} [" in row.split("|")[5]
    low, high = (float(x) for x in row.split("|")[5].split("[")[1].rstrip("] ").split(","))
    assert low <= point <= high
    # by hand: the mean over seeds of the accuracy, in object-id order
    with h5py.File(work / "sweep/morph/finetune/frac0.1/seed0/predictions.h5", "r") as f:
        order = np.argsort(f["object_id"][:])
        assert np.array_equal(cell.predictions[0], f["pred_class"][:][order])
    specz = tables["specz"].cells[("scratch", 1.0)]
    zrow = next(line for line in lines if line.startswith("| 200 | scratch |"))
    assert f"{intervals.cell_value(specz, tables['specz'].truth, 'sigma_mad'):.4f} [" in zrow.split("|")[3]
    # the saving factor is quoted at finetune's counts below scratch's largest, for every metric
    assert [line.split("|")[1:3] for line in saving[2:]] == [[" σ_MAD ", " 20 "], [" η ", " 20 "],
                                                            [" accuracy ", " 20 "]]


def test_a_cell_missing_a_seed_is_left_out_and_other_test_sets_are_refused(le, work):
    (work / "sweep/morph/scratch/frac0.1/seed2/predictions.h5").unlink()
    tables = le.task_tables(work, sorted(LABELS), [0, 1, 2], 100)
    assert ("scratch", 0.1) not in tables["morph"].cells and ("scratch", 1.0) in tables["morph"].cells
    lines, _ = le.build_report(tables, sorted(LABELS), 100)
    row = next(line for line in lines if line.startswith("| 20 | scratch |"))
    assert row.split("|")[5].strip() == "–"  # no morphology value; photo-z's is there
    rng = np.random.default_rng(1)
    other = work / "sweep/morph/knn/frac0.1"
    for seed in (0, 1, 2):
        write_cell(work, "morph", "knn", 0.1, seed, rng, 0.5, ids=np.arange(N_TEST) + 1000)
    with pytest.raises(SystemExit, match="different test galaxies"):
        le.task_tables(work, sorted(LABELS), [0, 1, 2], 100)
    assert other.is_dir()


def test_saving_factor_row_matches_intervals(le, work):
    tables = le.task_tables(work, sorted(LABELS), [0, 1, 2], 100)
    t = tables["morph"]
    ft = [c for (p, _), c in t.cells.items() if p == "finetune"]
    sc = [c for (p, _), c in t.cells.items() if p == "scratch"]
    kind, n = intervals.matching_labels([(c.n_labels, intervals.cell_value(c, t.truth, "accuracy"))
                                         for c in sorted(sc, key=lambda c: c.n_labels)],
                                        intervals.cell_value(min(ft, key=lambda c: c.n_labels), t.truth,
                                                             "accuracy"), lower_better=False)
    _, saving = le.build_report(tables, sorted(LABELS), 100)
    row = next(line for line in saving if line.startswith("| accuracy | 20 |"))
    expected = {"=": f"{n:.0f}", "<=": f"≤ {n:.0f}", ">": f"> {n:.0f}"}[kind]
    assert row.split("|")[3].strip() == expected
