"""`sslsky sweep`: the label-fraction grid locally and as a real job array on the local 2-node SLURM cluster."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_pretrain_args

from sslsky.cli import main
from sslsky.config import SweepConfig, load_config
from sslsky.eval.sweep import RESULTS_NAME, cells, pending, summarize

#: Every task of these sweeps trains for one epoch of a tiny head on CPU (plumbing: a cell that keeps only the
#: prior is written, marked prior_only, rather than failed).
TINY = ["overrides=[optim.epochs=1, optim.min_steps=0, data.batch_size=16, data.num_workers=0, plots=false, "
        "progress=false, device=cpu, optim.allow_prior=true]"]


@pytest.fixture(scope="module")
def encoder(packed_mock, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sweep_encoder") / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=3", "val_every=0")) == 0
    return run_dir / "encoder.pt"


def sweep_args(encoder: Path, packed: Path, out: Path, *overrides: str) -> list[str]:
    return ["sweep", "--config", str(REPO / "config" / "sweep_labelfrac.yaml"), f"ckpt={encoder}",
            f"data_path={packed}", f"out={out}", f"specz_config={REPO / 'config' / 'eval_specz.yaml'}",
            f"morph_config={REPO / 'config' / 'eval_morph.yaml'}", *TINY, *overrides]


def read_results(out: Path) -> list[dict]:
    with open(out / RESULTS_NAME) as handle:
        return list(csv.DictReader(handle))


def test_grid_skips_knn_for_photoz_and_rejects_bad_cells():
    cfg = load_config(SweepConfig, None, ["protocols=[linear, knn]", "label_fractions=[0.5, 1.0]", "seeds=[0, 1]"])
    grid = cells(cfg)
    assert len(grid) == 2 * 2 + 2 * 2 * 2  # specz: linear only; morph: linear and knn
    assert {(c.task, c.protocol) for c in grid} == {("specz", "linear"), ("morph", "linear"), ("morph", "knn")}
    votes = cells(load_config(SweepConfig, None, ["tasks=[votes]", "protocols=[linear, knn]", "label_fractions=[1.0]",
                                                   "seeds=[0]"]))
    assert [(c.task, c.protocol) for c in votes] == [("votes", "linear"), ("votes", "knn")]
    from sslsky.config import ConfigError

    with pytest.raises(ConfigError, match=r"label_fractions\[0\]=1.5 must be in \(0, 1\]"):
        cells(load_config(SweepConfig, None, ["label_fractions=[1.5]"]))
    with pytest.raises(ConfigError, match="protocol 'probe'"):
        cells(load_config(SweepConfig, None, ["protocols=[probe]"]))


def test_summary_means_and_ranges_over_seeds():
    rows = [{"protocol": "linear", "label_fraction": f, "seed": s, "n_train_labels": n, "accuracy": a}
            for f, s, n, a in [(0.5, 0, 50, 0.4), (0.5, 1, 50, 0.6), (1.0, 0, 100, 0.7), (1.0, 1, 100, 0.9)]]
    assert summarize(rows, "accuracy") == {"linear": [(50, pytest.approx(0.5), 0.4, 0.6),
                                                      (100, pytest.approx(0.8), 0.7, 0.9)]}


def test_local_sweep_runs_every_cell_once_and_collects(encoder, packed_mock, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = sweep_args(encoder, packed_mock, out, "executor=local", "protocols=[linear, knn]",
                      "label_fractions=[0.5, 1.0]", "seeds=[0, 1]")
    assert main(args) == 0
    rows = read_results(out)
    assert len(rows) == 12
    assert {(r["task"], r["protocol"]) for r in rows} == {("specz", "linear"), ("morph", "linear"), ("morph", "knn")}
    for row in rows:  # each row is the cell's own metrics.json
        folder = out / row["task"] / row["protocol"] / f"frac{float(row['label_fraction']):g}" / f"seed{row['seed']}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["protocol"] == row["protocol"] and int(row["n_train_labels"]) == metrics["n_train_labels"]
    # Half the labels is about half the rows of the full labelled set, the same for both seeds' full sets.
    specz = {(float(r["label_fraction"]), int(r["seed"])): int(r["n_train_labels"]) for r in rows
             if r["task"] == "specz"}
    assert specz[(1.0, 0)] == specz[(1.0, 1)] and abs(specz[(0.5, 0)] - specz[(1.0, 0)] / 2) <= 1
    assert (out / "label_efficiency_specz.png").stat().st_size > 0
    assert (out / "label_efficiency_morph.png").stat().st_size > 0
    capsys.readouterr()
    # Idempotent: nothing left to run, the same results.
    assert main(args) == 0
    assert "task(s) to run" not in capsys.readouterr().out
    assert read_results(out) == rows


def test_votes_task_and_stale_cells_run_again_after_a_new_encoder_or_new_overrides(encoder, packed_mock, tmp_path,
                                                                                   capsys):
    import torch

    ckpt = tmp_path / "encoder.pt"
    shutil.copy(encoder, ckpt)
    out = tmp_path / "sweep"
    grid = ["executor=local", "tasks=[morph, votes]", "protocols=[linear]", "label_fractions=[1.0]", "seeds=[0]"]
    args = sweep_args(ckpt, packed_mock, out, *grid)
    assert main(args) == 0
    paths = [out / task / "linear" / "frac1" / "seed0" / "metrics.json" for task in ("morph", "votes")]
    first = [json.loads(path.read_text()) for path in paths]
    assert [(m["target"], m["config"]["target"]) for m in first] == [("class", "class"), ("votes", "votes")]
    rows = {row["task"]: row for row in read_results(out)}  # the folder names the task, not metrics' "morph"
    assert set(rows) == {"morph", "votes"} and float(rows["votes"]["vote_mae"]) == first[1]["vote_mae"]
    assert (out / "label_efficiency_votes.png").stat().st_size > 0

    def sweep_config(*extra: str) -> SweepConfig:
        return load_config(SweepConfig, REPO / "config" / "sweep_labelfrac.yaml", [*args[3:], *extra])

    todo, done = pending(sweep_config(), out)
    assert todo == [] and len(done) == 2
    # The encoder is pretrained again at the same path: the cells are stale and run again.
    state = torch.load(ckpt, weights_only=True)
    weights = state["encoder"]
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 4)
    weights[name] = weights[name] + 0.05
    torch.save(state, ckpt)
    todo, done = pending(sweep_config(), out)
    assert [c.folder(out) / "metrics.json" for c in todo] == paths and done == []
    capsys.readouterr()
    assert main(args) == 0
    assert "2 finished cell(s) were made with another config or checkpoint" in capsys.readouterr().out
    second = [json.loads(path.read_text()) for path in paths]
    for a, b in zip(first, second):
        assert b["ckpt_sha256"] != a["ckpt_sha256"] and b["config"] == a["config"]
    # Other overrides (two epochs): stale again; the rerun records the new config.
    more = ("overrides=[optim.epochs=2, optim.min_steps=0, data.batch_size=16, data.num_workers=0, plots=false, "
            "progress=false, device=cpu, optim.allow_prior=true]")
    assert len(pending(sweep_config(more), out)[0]) == 2
    assert main([*args, more]) == 0
    for path, b in zip(paths, second):
        third = json.loads(path.read_text())
        assert third["config"]["optim"]["epochs"] == 2 and third["ckpt_sha256"] == b["ckpt_sha256"]
    assert pending(sweep_config(more), out)[0] == []


@pytest.mark.slurm
def test_sweep_runs_as_a_job_array_on_slurm(encoder, packed_mock, tmp_path, slurm_env):
    out = tmp_path / "sweep"
    args = sweep_args(encoder, packed_mock, out, "executor=slurm", "tasks=[specz, morph]", "protocols=[linear, knn]",
                      "label_fractions=[0.5, 1.0]", "seeds=[0]", "slurm.cpus_per_task=1", "slurm.gpus_per_task=0",
                      "slurm.time_min=10")
    proc = subprocess.run([sys.executable, "-m", "sslsky", *args], cwd=REPO, env=slurm_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job array" in proc.stdout
    array_id = proc.stdout.split("submitted job array ")[1].split()[0]
    rows = read_results(out)
    assert len(rows) == 2 + 2 * 2
    # Every cell ran as a task of that array: submitit's log folders are named <array>_<task>.
    folders = sorted(p.name for p in (out / "submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert folders == [f"{array_id}_{i}" for i in range(6)], folders
