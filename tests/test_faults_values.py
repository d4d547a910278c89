"""Bad values where they enter (issue 11): every command refuses a value out of its declared range, a non-finite
number, a wrong type or an unusable output folder with a message naming the key (exit status 2) before it does
any work or writes anything; and an evaluation on a test split too small to mean anything says so, loudly and in
its metrics.json (and the sweep's results.csv).

The probes run the real command line in-process (``sslsky.cli.main``). Value errors need no data: the config is
refused before any file is opened, so most probes point ``data.path`` at an empty folder.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from sslsky.cli import main
from sslsky.config import SCHEMAS, ConfigError, EvalSpeczConfig, check_values, checked, load_config
from sslsky.eval.metrics import MIN_TEST_GALAXIES, MIN_TRAIN_GALAXIES, small_test_warnings, small_train_warnings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTINEL = "sentinel: an earlier run's config\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder that already holds an earlier run's config.yaml (it must survive a refused start)."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.yaml").write_text(SENTINEL)
    return folder


def command(name: str, out: Path, data: Path) -> list[str]:
    """Arguments of one command with valid settings, the output in ``out``; bad values are appended."""
    if name == "eval-morph":
        return ["eval-morph", "--config", str(REPO / "config" / "eval_morph.yaml"), f"data.path={data}", f"out={out}",
                "protocol=scratch", "ckpt=", "device=cpu", "progress=false", "optim.min_steps=0"]
    if name == "eval-specz":
        return ["eval-specz", "--config", str(REPO / "config" / "eval_specz.yaml"), f"data.path={data}", f"out={out}",
                "protocol=scratch", "ckpt=", "device=cpu", "progress=false", "optim.min_steps=0"]
    if name == "mock":
        return ["mock", "--n", "3", "--out", str(out), "progress=false"]
    if name == "pack":
        return ["pack", "--catalog", str(data / "catalog.fits"), "--out", str(out), "progress=false"]
    if name == "pretrain":
        return ["pretrain", "--config", str(REPO / "config" / "pretrain_tiny.yaml"), f"data.path={data}",
                f"run_dir={out}", "progress=false"]
    if name == "sweep":
        return ["sweep", f"data_path={data}", f"out={out}", "ckpt=encoder.pt", "tasks=[morph]", "protocols=[knn]",
                f"morph_config={REPO / 'config' / 'eval_morph.yaml'}", "executor=local", "label_fractions=[1.0]",
                "seeds=[0]"]
    if name == "embed":
        return ["embed", "--ckpt", "encoder.pt", "--data", str(data), "--out", str(out / "embeddings.h5")]
    raise ValueError(name)


BAD_VALUES = [  # (command, overrides, the key the message must name)
    ("eval-morph", ["optim.lr=-1"], "optim.lr"),
    ("eval-morph", ["optim.lr=0"], "optim.lr"),
    ("eval-morph", ["optim.lr=nan"], "optim.lr"),
    ("eval-morph", ["optim.lr=.inf"], "optim.lr"),
    ("eval-morph", ["optim.lr=fast"], "optim.lr"),
    ("eval-morph", ["data.batch_size=1"], "data.batch_size"),
    ("eval-morph", ["data.batch_size=-5"], "data.batch_size"),
    ("eval-morph", ["data.num_workers=-1"], "data.num_workers"),
    ("eval-morph", ["optim.epochs=0"], "optim.epochs"),
    ("eval-morph", ["optim.patience=-1"], "optim.patience"),
    ("eval-morph", ["optim.weight_decay=-1e-4"], "optim.weight_decay"),
    ("eval-morph", ["optim.head_warmup_epochs=-1"], "optim.head_warmup_epochs"),
    ("eval-morph", ["label_fraction=0"], "label_fraction"),
    ("eval-morph", ["label_fraction=1.5"], "label_fraction"),
    ("eval-morph", ["knn.k=0", "protocol=knn"], "knn.k"),
    ("eval-morph", ["head.dropout=1"], "head.dropout"),
    ("eval-morph", ["seed=-1"], "seed"),
    ("eval-morph", ["data.batch_size=2.5"], "data.batch_size"),
    ("eval-specz", ["n_bins=0"], "n_bins"),
    ("eval-specz", ["z_min=0.5", "z_max=0.1"], "z_min"),
    ("eval-specz", ["z_max=nan"], "z_max"),
    ("eval-specz", ["z_min=-0.1"], "z_min"),
    ("mock", ["n=0"], "n="),
    ("mock", ["specz_fraction=1.5"], "specz_fraction"),
    ("mock", ["unlabelled_fraction=-0.1"], "unlabelled_fraction"),
    ("mock", ["r_limit=nan"], "r_limit"),
    ("mock", ["seed=-1"], "seed"),
    ("mock", ["z_min=0.3", "z_max=0.2"], "z_min"),
    ("pack", ["shard_size=0"], "shard_size"),
    ("pack", ["max_bad_fraction=2"], "max_bad_fraction"),
    ("pretrain", ["optim.base_lr=-1"], "optim.base_lr"),
    ("pretrain", ["optim.base_lr=nan"], "optim.base_lr"),
    ("pretrain", ["optim.total_steps=0"], "optim.total_steps"),
    ("pretrain", ["optim.warmup_steps=-1"], "optim.warmup_steps"),
    ("pretrain", ["optim.momentum=1"], "optim.momentum"),
    ("pretrain", ["data.batch_size=0"], "data.batch_size"),
    ("pretrain", ["model.moco.temperature=0"], "model.moco.temperature"),
    ("pretrain", ["model.moco.momentum=1.5"], "model.moco.momentum"),
    ("pretrain", ["model.simclr.temperature=0"], "model.simclr.temperature"),
    ("pretrain", ["model.vit.depth=0"], "model.vit.depth"),
    ("pretrain", ["model.moco.queue_size=0"], "model.moco.queue_size"),
    ("pretrain", ["keep_checkpoints=0"], "keep_checkpoints"),
    ("pretrain", ["augment.geometry.scale_min=2"], "augment.geometry.scale_min"),
    ("sweep", ["label_fractions=[0.1, 0]"], "label_fractions[1]"),
    ("sweep", ["seeds=[-1]"], "seeds[0]"),
    ("sweep", ["slurm.time_min=0"], "slurm.time_min"),
    ("sweep", ["overrides=[optim.lr=-1]"], "optim.lr"),
    ("embed", ["batch_size=0"], "batch_size"),
]


@pytest.mark.parametrize(("name", "overrides", "key"), BAD_VALUES,
                         ids=[f"{n}:{' '.join(o)}" for n, o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_before_anything_is_written(name, overrides, key, out, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    before = snapshot(out)
    assert main([*command(name, out, data), *overrides]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and key in err and "Traceback" not in err, err
    assert snapshot(out) == before  # the earlier config.yaml is untouched, nothing else appeared


@pytest.mark.parametrize("name", ["eval-morph", "eval-specz", "mock", "sweep"])
def test_an_out_that_is_a_file_is_refused_before_any_work(name, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    target = tmp_path / "results"
    target.write_text("not a folder")
    assert main(command(name, target, data)) == 2
    err = capsys.readouterr().err
    assert f"out={str(target)!r} is a file" in err and "Traceback" not in err, err
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.path=/nonexistent/packed"], "data.path='/nonexistent/packed' does not exist"),
    (["data.path="], "data.path is empty"),
    (["protocol=linear", "ckpt={folder}"], "is a folder: give the checkpoint file"),
    (["arch=resnet18", "crop_size=1000"], "set crop_size to at most the cutout size"),
])
def test_unusable_inputs_of_an_evaluation_are_messages(overrides, message, out, tmp_path, packed_mock, capsys):
    folder = tmp_path / "ckpt_dir"
    folder.mkdir()
    before = snapshot(out)
    args = [*command("eval-morph", out, packed_mock), *(o.format(folder=folder) for o in overrides)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert snapshot(out) == before


def test_every_schema_default_is_allowed():
    for schema in SCHEMAS.values():
        assert check_values(schema()) == [], schema.__name__


def test_every_broken_rule_is_listed_in_one_message():
    with pytest.raises(ConfigError) as caught:
        load_config(EvalSpeczConfig, None, ["z_min=0.3", "z_max=0.3", "optim.lr=-1", "label_fraction=0"])
    text = str(caught.value)
    assert "optim.lr=-1.0 must be > 0" in text and "label_fraction=0.0 must be in (0, 1]" in text
    assert "z_min=0.3, z_max=0.3: z_min must be less than z_max" in text
    with pytest.raises(ValueError, match="config rule"):
        checked(1, "positive")  # a rule outside the vocabulary fails where the schema is defined


# ---------------------------------------------------------------------------
# A test split too small to mean anything.
# ---------------------------------------------------------------------------


def test_small_test_warnings_threshold_and_missing_classes():
    assert small_test_warnings(MIN_TEST_GALAXIES) == []
    assert "fewer than 20" in small_test_warnings(MIN_TEST_GALAXIES - 1)[0]
    assert small_test_warnings(50, [0, 1, 2], [0, 1, 2, 2]) == []
    (text,) = small_test_warnings(50, [0, 1, 2], [0, 0, 1], ["round", "disk", "bar"])
    assert "1 class(es)" in text and "(bar)" in text


def test_a_tiny_test_split_is_flagged_in_the_output_and_the_sweep(packed_mock, tmp_path, capsys):
    # The 128-galaxy mock has 13 labelled test galaxies: metrics of that are noise and must say so.
    sweep = tmp_path / "sweep"
    cell = sweep / "morph" / "scratch" / "frac1" / "seed0"
    args = [*command("eval-morph", cell, packed_mock), "arch=resnet18", "crop_size=16", "optim.epochs=1",
            "optim.head_warmup_epochs=0", "optim.allow_prior=true", "data.batch_size=32", "data.num_workers=0",
            "plots=false"]
    assert main(args) == 0
    err = capsys.readouterr().err
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["n_test"] < MIN_TEST_GALAXIES
    assert any("fewer than 20" in w for w in metrics["warnings"])
    assert "WARNING: only" in err and "!" * 100 in err

    specz = tmp_path / "specz"
    args = [*command("eval-specz", specz, packed_mock), "arch=resnet18", "crop_size=16", "optim.epochs=1",
            "optim.allow_prior=true", "data.batch_size=32", "data.num_workers=0", "plots=false", "n_bins=20"]
    assert main(args) == 0
    assert "WARNING: only" in capsys.readouterr().err
    specz_metrics = json.loads((specz / "metrics.json").read_text())
    assert specz_metrics["n_test"] < MIN_TEST_GALAXIES and len(specz_metrics["warnings"]) == 1

    # The sweep's results.csv carries the warning in its own column, next to the task.
    shutil.copytree(specz, sweep / "specz" / "scratch" / "frac1" / "seed0")
    from sslsky.eval.sweep import collect

    collect(sweep)
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all("fewer than 20" in row["warnings"] for row in rows)


def test_config_files_and_overrides_that_are_not_what_they_seem(tmp_path, capsys):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 2)
    cases = [
        (["pretrain", "--config", str(binary)], "is not a text (UTF-8) file"),
        (["pretrain", "--config", str(tmp_path)], "is a folder: name the YAML file"),
        (["embed", "--ckpt", "e.pt", "--data", "d", "--out", str(tmp_path / "e.h5"), "data.num_workers=0"],
         "did you mean num_workers=...?"),
        (["pretrain", "--config", str(REPO / "config" / "pretrain_tiny.yaml"), "optim.base_lr.x=1"],
         "optim.base_lr is a single value here"),
        (["pretrain", "--config", str(REPO / "config" / "pretrain_tiny.yaml"),
          "optim.total_steps=99999999999999999999999"], "must be in [1, 1e12]"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)


def test_small_train_warnings_threshold_and_unlearnable_classes():
    assert small_train_warnings(MIN_TRAIN_GALAXIES) == []
    assert "fewer than 20" in small_train_warnings(MIN_TRAIN_GALAXIES - 1)[0]
    assert small_train_warnings(50, [0, 1, 2], [0, 1]) == []
    (text,) = small_train_warnings(50, [0, 1], [0, 1, 2], ["round", "disk", "bar"])
    assert "1 class(es) of the test split have no labelled train galaxy (bar)" in text
