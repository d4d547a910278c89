"""The method contract (:mod:`sslsky.methods.base`) end to end.

- Files written before the contract (sslsky c90244a) still load and resume: the layout of real ones is in
  ``tests/data/legacy_v1_layout.json``; files of exactly that layout are rebuilt here with seeded random weights
  and go through ``load_encoder`` and ``sslsky pretrain`` (the real files themselves: a manual check on the
  machine that has them, :func:`test_real_legacy_files`).
- A method defined in this file, registered for the test, goes through the real trainer: its metrics logged,
  ``after_step`` called once per step (an exact resume), its encoder exported and loadable.
- Config: another method's (or encoder's) section set is an error; a flat key of the old layout names its new
  key; stored old configs are migrated.
- SimCLR: two gloo ranks on half batches = one process on the whole batch; CLI runs with each encoder; exact
  resume.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from conftest import REPO, gloo_group, spawn_gloo, tiny_pretrain_args
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslsky.cli import main
from sslsky.config import ConfigError, PretrainConfig, config_from_dict, config_to_dict, load_config, migrate_config
from sslsky.data.schema import MANIFEST_NAME
from sslsky.methods import METHODS, SimCLR, check_sections
from sslsky.methods.base import Method, check_views
from sslsky.models.encoders import build_encoder
from sslsky.models.loading import CheckpointError, load_encoder
from sslsky.train.checkpoint import load_checkpoint

LAYOUT_FILE = Path(__file__).parent / "data" / "legacy_v1_layout.json"
LEGACY_METHODS = ("moco", "byol", "hybrid", "votes")
#: Where each old method kept its encoder in the training checkpoint's model state dict.
LEGACY_PREFIX = {"moco": "encoder_q.", "byol": "online_encoder.", "hybrid": "online_encoder.",
                 "votes": "online_encoder."}
#: The new-style overrides equivalent to the old runs' model.queue_size=48 model.byol_hidden=32 (model.dim=64 from
#: pretrain_tiny.yaml was shared by MoCo and BYOL).
NEW_STYLE = {"moco": ["model.moco.queue_size=48"],
             "byol": ["model.moco={}", "model.byol.dim=64", "model.byol.hidden=32"],
             "hybrid": ["model.moco={}", "model.byol.dim=64", "model.byol.hidden=32"],
             "votes": ["model.moco={}"]}
#: The old runs' schedule (4 steps, checkpoints at 2 and 4) and loggers.
OLD_SCHEDULE = ["data.batch_size=8", "optim.total_steps=4", "checkpoint_every=2", "log_every=1", "tensorboard=false"]
#: BatchNorm forwards of the encoder per training step (MoCo: queries; the others: both views).
ENCODER_FORWARDS = {"moco": 1, "byol": 2, "hybrid": 2, "votes": 2}
REBUILT_QUEUE_PTR = 16  # a multiple of the batch of 8, below K = 48
REBUILT_BATCHES_TRACKED = 7

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------
# Files of the old layout.
# ---------------------------------------------------------------------------


def describe(value):
    """A checkpoint with every tensor replaced by ``{"tensor": shape, "dtype": ...}`` (the layout file's form)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


def random_tensor(name: str, spec: dict, gen: torch.Generator) -> torch.Tensor:
    """A tensor of the recorded shape and dtype that the old code could have written under ``name``."""
    shape, dtype = tuple(spec["tensor"]), spec["dtype"]
    if dtype == "uint8":  # an RNG state: a real one of the recorded size (random bytes are no valid state)
        state = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen))).get_state()
        assert tuple(state.shape) == shape, f"{name}: this torch's RNG state is {tuple(state.shape)}, not {shape}"
        return state
    if dtype == "int64":
        if name == "queue_ptr":
            return torch.full(shape, REBUILT_QUEUE_PTR, dtype=torch.int64)
        if name.endswith("num_batches_tracked"):
            return torch.full(shape, REBUILT_BATCHES_TRACKED, dtype=torch.int64)
        raise AssertionError(f"{name}: an int64 tensor the rebuild does not know")
    assert dtype == "float32", f"{name}: dtype {dtype}"
    if name.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    return 0.05 * torch.randn(shape, generator=gen)


def rebuild(spec, gen: torch.Generator, name: str = "", parent: str = ""):
    """A file of exactly the layout ``spec`` (a layout-file entry) with seeded random tensors."""
    if isinstance(spec, dict) and set(spec) == {"tensor", "dtype"}:
        return random_tensor(name, spec, gen)
    if isinstance(spec, dict):
        # JSON made the optimizer's integer parameter ids strings; torch's optimizer wants them back as int
        int_keys = name == "state" and parent == "optimizer"
        return {(int(k) if int_keys else k): rebuild(v, gen, k, name) for k, v in spec.items()}
    if isinstance(spec, list):
        return [rebuild(v, gen, name, parent) for v in spec]
    return spec


@pytest.fixture(scope="module")
def layout() -> dict:
    return json.loads(LAYOUT_FILE.read_text())


def test_layout_file_is_what_it_says(layout):
    assert "c90244a" in layout["made_by"]
    for method in LEGACY_METHODS:
        ckpt, enc = layout[method]["checkpoint"], layout[method]["encoder"]
        assert ckpt["config"]["method"] == method and enc["method"] == method
        assert "queue_size" in ckpt["config"]["model"] and "encoder_prefix" not in ckpt  # the old layout
        assert enc["format"] == "sslsky-encoder-v1" and "encoder_args" not in enc
        assert sum(k.startswith(LEGACY_PREFIX[method]) for k in ckpt["model"]) == len(enc["encoder"])


class Legacy:
    """One method's rebuilt old files in ``folder``: ``encoder.pt`` and ``checkpoints/step-00000002.pt``."""

    def __init__(self, method: str, layout: dict, folder: Path):
        self.method, self.folder = method, folder
        gen = torch.Generator().manual_seed(LEGACY_METHODS.index(method))
        self.encoder_state = rebuild(layout[method]["encoder"], gen)
        self.checkpoint_state = rebuild(layout[method]["checkpoint"], gen)
        self.checkpoint_state["step"] = 2
        self.encoder_path = folder / "encoder.pt"
        self.checkpoint_path = folder / "checkpoints" / "step-00000002.pt"
        self.checkpoint_path.parent.mkdir(parents=True)
        torch.save(self.encoder_state, self.encoder_path)
        torch.save(self.checkpoint_state, self.checkpoint_path)


@pytest.fixture(scope="module", params=LEGACY_METHODS)
def legacy(request, layout, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"legacy_{request.param}")
    yield Legacy(request.param, layout, folder)
    shutil.rmtree(folder)  # 90-140 MB a method


def reference_features(weights: dict, images: torch.Tensor) -> torch.Tensor:
    """Features of a plain ResNet-18 (ImageNet stem, 5 bands) holding ``weights``: the old runs' encoder."""
    encoder = build_encoder("resnet18", 5, "imagenet")
    encoder.load_state_dict(weights)  # strict
    with torch.no_grad():
        return encoder.eval()(images)


def numpy_eval_view(cutouts: np.ndarray, stats: dict, crop: int) -> np.ndarray:
    """The old runs' eval view: the centred ``crop`` of the cutouts, asinh(x / sigma_mad) per band."""
    start = (cutouts.shape[-1] - crop) // 2
    x = cutouts[..., start:start + crop, start:start + crop]
    return np.arcsinh(x / np.asarray(stats["sigma_mad"])[:, None, None]).astype(np.float32)


def check_loads_like_a_plain_resnet(path: Path, weights: dict, source: str, stats: dict) -> None:
    loaded = load_encoder(path)  # no flags: the file says everything
    assert (loaded.source, loaded.arch, loaded.stem, loaded.in_channels, loaded.feature_dim) == \
        (source, "resnet18", "imagenet", 5, 512)
    cutouts = np.random.default_rng(3).normal(0.0, 0.1, (3, 5, 107, 107)).astype(np.float32)
    want = reference_features(weights, torch.from_numpy(numpy_eval_view(cutouts, stats, 32)))
    with torch.no_grad():
        got = loaded.encoder(loaded.transform(torch.from_numpy(cutouts)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 1e-3  # not all zeros


def strip(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def test_old_encoder_files_and_checkpoints_load(legacy):
    stats = legacy.encoder_state["stats"]
    check_loads_like_a_plain_resnet(legacy.encoder_path, legacy.encoder_state["encoder"], "sslsky", stats)
    weights = strip(legacy.checkpoint_state["model"], LEGACY_PREFIX[legacy.method])
    check_loads_like_a_plain_resnet(legacy.checkpoint_path, weights, "sslsky-checkpoint",
                                    legacy.checkpoint_state["data_info"]["stats"])


def point_at(state: dict, packed: Path) -> dict:
    """A copy of an old checkpoint whose run trained on ``packed``: data.path and data_info (the resolved folder,
    the shards' sha256 from its manifest) rewritten."""
    state = copy.copy(state)
    state["config"] = {**state["config"], "data": {**state["config"]["data"], "path": str(packed)}}
    shards = json.loads((packed / MANIFEST_NAME).read_text())["shards"]
    state["data_info"] = {**state["data_info"], "path": os.path.realpath(packed),
                          "shard_sha256": [s["sha256"] for s in shards]}
    return state


def resume_args(packed: Path, run_dir: Path, method: str) -> list[str]:
    """The new-style command that continues an old run of ``method``."""
    return tiny_pretrain_args(packed, run_dir, f"method={method}", *NEW_STYLE[method], *OLD_SCHEDULE, "val_every=0")


@pytest.fixture(scope="module")
def resumed(legacy, packed_mock):
    """The rebuilt step-2 checkpoint (pointed at ``packed_mock``) resumed to step 4 by the new-style command, a
    checkpoint after every step: ``(run_dir, the old state as resumed from, stdout)``."""
    run_dir = legacy.folder / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    old = point_at(legacy.checkpoint_state, packed_mock)
    torch.save(old, run_dir / "checkpoints" / "step-00000002.pt")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(resume_args(packed_mock, run_dir, legacy.method) + ["checkpoint_every=1", "keep_checkpoints=3"])
    assert code == 0, out.getvalue()
    return run_dir, old, out.getvalue()


def test_old_checkpoint_resumes(legacy, resumed):
    run_dir, old, out = resumed
    assert "resumed from step 2" in out and "allowed change" not in out

    prefix = LEGACY_PREFIX[legacy.method]
    new = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    assert new["step"] == 4 and new["encoder_prefix"] == prefix
    assert set(new["model"]) == set(old["model"])
    # the old state went on: BN counters and the MoCo queue pointer continue from the rebuilt values
    tracked = new["model"][f"{prefix}bn1.num_batches_tracked"].item()
    assert tracked == REBUILT_BATCHES_TRACKED + 2 * ENCODER_FORWARDS[legacy.method]
    if legacy.method == "moco":
        assert new["model"]["queue_ptr"].item() == (REBUILT_QUEUE_PTR + 2 * 8) % 48
        assert torch.equal(new["model"]["queue"][:, :REBUILT_QUEUE_PTR], old["model"]["queue"][:, :REBUILT_QUEUE_PTR])
    weights = strip(new["model"], prefix)
    assert not torch.equal(weights["conv1.weight"], strip(old["model"], prefix)["conv1.weight"])  # trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 4]

    exported = load_encoder(run_dir / "encoder.pt")
    assert (exported.arch, exported.stem, exported.feature_dim) == ("resnet18", "imagenet", 512)
    for name, tensor in exported.encoder.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


#: The momentum copy of the encoder, and the momentum of its EMA after ``step`` of 4 steps (MoCo: constant 0.99
#: of pretrain_tiny.yaml; BYOL: 1 - (1 - 0.99) (1 + cos(pi step / 4)) / 2, Grill et al. 2020).
TARGET_PREFIX = {"moco": "encoder_k.", "byol": "target_encoder.", "hybrid": "target_encoder."}


def ema_momentum(method: str, step: int) -> float:
    return 0.99 if method == "moco" else 1.0 - 0.01 * 0.5 * (1.0 + math.cos(math.pi * step / 4))


def test_old_checkpoint_resume_keeps_the_pending_ema(legacy, resumed):
    """The old trainer applied the EMA of step k at the start of step k + 1, so its step-2 checkpoint still owes the
    EMA with the online weights after step 2: a resume applies it, then those after steps 3 and 4, as a run of the
    new code does (target_4 = EMA(m4, o4) . EMA(m3, o3) . EMA(m2, o2) of target_2, float64 here)."""
    if legacy.method not in TARGET_PREFIX:
        pytest.skip(f"{legacy.method} has no momentum encoder")
    run_dir, old, _ = resumed
    online, target = LEGACY_PREFIX[legacy.method], TARGET_PREFIX[legacy.method]
    states = {2: old["model"], **{s: load_checkpoint(run_dir / "checkpoints" / f"step-0000000{s}.pt")["model"]
                                  for s in (3, 4)}}
    names = [name for name, _ in build_encoder("resnet18", 5, "imagenet").named_parameters()]
    worst = 0.0
    for name in names:
        want = states[2][target + name].double()
        for step in (2, 3, 4):
            m = ema_momentum(legacy.method, step)
            want = m * want + (1 - m) * states[step][online + name].double()
        worst = max(worst, (states[4][target + name].double() - want).abs().max().item())
    assert worst < 1e-6, f"the momentum encoder after the resume is off by up to {worst:.2e}"


# ---- the real old files (on the machine that made them) --------------------------------------------------

LEGACY_ROOT = Path(os.environ.get("SSLSKY_LEGACY_DIR", "/tmp/legacy"))


def without_lr(tree):
    """A layout with the optimizer's learning rates dropped (they differ between the step-2 and step-4 files)."""
    tree = copy.deepcopy(tree)
    for group in tree["optimizer"]["param_groups"]:
        group.pop("lr")
    return tree


@pytest.mark.parametrize("method", LEGACY_METHODS)
def test_real_legacy_files(method, layout, tmp_path, capsys):
    """Manual check: the real files of sslsky c90244a load, resume, and the resumed run continues the old one.

    Set SSLSKY_LEGACY_DIR to their folder (default /tmp/legacy: run_<method>/{encoder.pt, checkpoints/}, packed/).
    """
    run = LEGACY_ROOT / f"run_{method}"
    if not (run / "checkpoints" / "step-00000002.pt").is_file() or not (LEGACY_ROOT / "packed").is_dir():
        pytest.skip(f"the real pre-contract files are not here ({run}, {LEGACY_ROOT / 'packed'}): they are "
                    f"made by sslsky c90244a (see {LAYOUT_FILE.name}'s made_by) and are not in git")
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    step2 = torch.load(run / "checkpoints" / "step-00000002.pt", weights_only=True)
    step4 = torch.load(run / "checkpoints" / "step-00000004.pt", weights_only=True)
    # the layout file describes these files exactly
    assert describe(encoder) == layout[method]["encoder"]
    assert describe(step4) == layout[method]["checkpoint"]
    assert without_lr({**describe(step2), "step": 4}) == without_lr(layout[method]["checkpoint"])

    prefix = LEGACY_PREFIX[method]
    check_loads_like_a_plain_resnet(run / "encoder.pt", encoder["encoder"], "sslsky", encoder["stats"])
    check_loads_like_a_plain_resnet(run / "checkpoints" / "step-00000002.pt", strip(step2["model"], prefix),
                                    "sslsky-checkpoint", step2["data_info"]["stats"])

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step-00000002.pt", run_dir / "checkpoints")
    assert main(resume_args(Path(step2["config"]["data"]["path"]), run_dir, method)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    new = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    # steps 3 and 4 of the new code continue the old run exactly: the trained encoder is the old step 4's
    differ = [k for k, v in strip(step4["model"], prefix).items() if not torch.equal(v, new["model"][prefix + k])]
    assert not differ, f"{len(differ)} encoder tensor(s) differ from the old run's step 4, e.g. {differ[:3]}"


# ---------------------------------------------------------------------------
# A method written here goes through the real trainer.
# ---------------------------------------------------------------------------


class Dummy(Method):
    """Mean squared distance between the two views' normalised features; counts its after-step calls."""

    section = None
    calls: ClassVar[list[tuple[int, int]]] = []  # (step, total_steps) of every after_step call in this process

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.backbone = encoder
        self.feature_dim = encoder.feature_dim
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg, encoder, votes=None, data=None) -> Dummy:
        return cls(encoder)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, batch):
        view1, view2 = check_views(batch)
        z1, z2 = F.normalize(self.backbone(view1), dim=1), F.normalize(self.backbone(view2), dim=1)  # (B, F)
        distance = (z1 - z2).pow(2).sum(dim=1).mean()
        with torch.no_grad():
            acc = ((z1 @ z2.T).argmax(dim=1) == torch.arange(len(z1))).float().mean()
        return distance, {"acc": acc, "dummy_term": distance.detach()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen += 1
        Dummy.calls.append((step, total_steps))


DUMMY_ARGS = ("method=dummy", "optim.total_steps=4", "checkpoint_every=2", "val_every=4", "log_every=1",
              "augment.geometry.crop_size=16", "data.val_batches=1")


@pytest.fixture(scope="module")
def dummy_runs(packed_mock, tmp_path_factory):
    """The dummy method 4 steps in one go, and again from the first run's step-2 checkpoint."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "dummy", Dummy)
        whole = tmp_path_factory.mktemp("dummy") / "whole"
        Dummy.calls.clear()
        assert main(tiny_pretrain_args(packed_mock, whole, *DUMMY_ARGS)) == 0
        calls_whole = list(Dummy.calls)
        split = whole.parent / "split"
        (split / "checkpoints").mkdir(parents=True)
        shutil.copy(whole / "checkpoints" / "step-00000002.pt", split / "checkpoints")
        Dummy.calls.clear()
        assert main(tiny_pretrain_args(packed_mock, split, *DUMMY_ARGS)) == 0
        calls_split = list(Dummy.calls)
    return {"whole": whole, "split": split, "calls_whole": calls_whole, "calls_split": calls_split}


def test_dummy_method_metrics_and_after_step(dummy_runs):
    records = [json.loads(line) for line in (dummy_runs["whole"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert r["dummy_term"] == pytest.approx(r["loss"], rel=1e-6) and 0.0 < r["loss"] <= 4.0
        assert r["acc"] * 8 == pytest.approx(round(r["acc"] * 8))  # a fraction of the batch of 8
    assert [r["step"] for r in records if "val_top1" in r] == [0, 4]  # the default held_out
    assert dummy_runs["calls_whole"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert dummy_runs["calls_split"] == [(3, 4), (4, 4)]
    whole = dummy_runs["whole"] / "checkpoints"
    assert load_checkpoint(whole / "step-00000002.pt")["model"]["steps_seen"].item() == 2
    assert load_checkpoint(whole / "step-00000004.pt")["model"]["steps_seen"].item() == 4


def test_dummy_method_resumes_bit_identically(dummy_runs):
    a = load_checkpoint(dummy_runs["whole"] / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(dummy_runs["split"] / "checkpoints" / "step-00000004.pt")
    assert set(a["model"]) == set(b["model"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert b["model"]["steps_seen"].item() == 4


def test_dummy_method_export_loads_without_flags(dummy_runs):
    state = load_checkpoint(dummy_runs["whole"] / "checkpoints" / "step-00000004.pt")
    assert state["encoder_prefix"] == "backbone."
    assert state["encoder_args"]["arch"] == "resnet18" and state["encoder_args"]["stem"] == "imagenet"
    exported = load_encoder(dummy_runs["whole"] / "encoder.pt")
    from_ckpt = load_encoder(dummy_runs["whole"] / "checkpoints" / "step-00000004.pt")  # no method needed
    assert exported.info["method"] == "dummy" and exported.build_args == state["encoder_args"]
    plain = build_encoder(**state["encoder_args"])
    plain.load_state_dict(strip(state["model"], "backbone."))
    images = torch.randn(4, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain.eval()(images)
        assert torch.equal(exported.encoder(images), want)
        assert torch.equal(from_ckpt.encoder(images), want)


# ---------------------------------------------------------------------------
# Config: sections.
# ---------------------------------------------------------------------------


def test_another_methods_section_is_refused(packed_mock, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "method=byol", "model.moco.queue_size=96")) == 2
    err = capsys.readouterr().err
    assert "model.moco.queue_size=96" in err and "method=moco" in err and "method=byol" in err
    assert not run_dir.exists()  # refused before anything is written


def test_another_encoders_section_is_refused(packed_mock, tmp_path, capsys):
    assert main(tiny_pretrain_args(packed_mock, tmp_path / "run", "model.vit.depth=2")) == 2
    err = capsys.readouterr().err
    assert "model.vit.depth=2" in err and "model.arch=vit" in err and "model.arch=resnet18" in err


def test_an_empty_section_resets_it():
    tiny = REPO / "config" / "pretrain_tiny.yaml"
    cfg = load_config(PretrainConfig, tiny, ["method=byol"])  # the file's model.moco section is set
    with pytest.raises(ConfigError, match=r"model\.moco\.queue_size=512.*model\.moco=\{\}"):
        check_sections(cfg)
    reset = load_config(PretrainConfig, tiny, ["method=byol", "model.moco={}"])
    check_sections(reset)
    assert reset.model.moco == type(reset.model.moco)() and reset.model.moco != cfg.model.moco


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_flat_key_of_the_old_layout_names_its_new_key(where, packed_mock, tmp_path, capsys):
    args = tiny_pretrain_args(packed_mock, tmp_path / "run")
    if where == "override":
        args.append("model.queue_size=48")
    else:  # the user's own YAML file in the old layout: pretrain_tiny.yaml with model.moco.* flat in model
        tree = yaml.safe_load((REPO / "config" / "pretrain_tiny.yaml").read_text())
        tree["model"]["queue_size"] = tree["model"]["moco"].pop("queue_size")
        config = tmp_path / "old.yaml"
        config.write_text(yaml.safe_dump(tree))
        args = [a for a in args if not a.startswith("model.moco")]
        args[args.index("--config") + 1] = str(config)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.queue_size" in err and "model.moco.queue_size" in err, err


def test_migrated_old_config_is_the_new_style_config(layout):
    old = layout["moco"]["checkpoint"]["config"]
    migrated = migrate_config(old)
    assert "queue_size" not in migrated["model"] and "queue_size" in old["model"]  # a copy; the old one untouched
    cfg = config_from_dict(PretrainConfig, migrated)
    new = load_config(PretrainConfig, REPO / "config" / "pretrain_tiny.yaml", [
        f"data.path={old['data']['path']}", f"run_dir={old['run_dir']}", "data.batch_size=8",
        "model.moco.queue_size=48", "model.byol.dim=64", "model.byol.hidden=32", "optim.total_steps=4",
        "checkpoint_every=2", "val_every=2", "log_every=1", "progress=false", "tensorboard=false"])
    assert config_to_dict(cfg) == config_to_dict(new)
    assert migrate_config(config_to_dict(new)) == config_to_dict(new)  # a new config comes back equal


# ---------------------------------------------------------------------------
# SimCLR.
# ---------------------------------------------------------------------------

SIMCLR_BATCH = 8  # global


def simclr_model() -> SimCLR:
    torch.manual_seed(0)
    encoder = build_encoder("vit", 3, image_size=16, patch_size=4, depth=2, width=32, heads=2)
    return SimCLR(encoder, dim=16, temperature=0.5)


def simclr_views() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(SIMCLR_BATCH, 3, 16, 16, generator=gen)
    return base + 0.3 * torch.randn(base.shape, generator=gen), base + 0.3 * torch.randn(base.shape, generator=gen)


def simclr_sgd_step(net: nn.Module, model: SimCLR, view1: torch.Tensor, view2: torch.Tensor) -> dict:
    optimizer = torch.optim.SGD(model.parameters_to_optimize(), lr=0.5)
    loss, metrics = net({"view1": view1, "view2": view2})
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "acc": metrics["acc"],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def simclr_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        half = SIMCLR_BATCH // world
        view1, view2 = (v[rank * half:(rank + 1) * half] for v in simclr_views())
        model = simclr_model()
        torch.save(simclr_sgd_step(DistributedDataParallel(model), model, view1, view2), f"{out_dir}/rank{rank}.pt")


def test_simclr_two_gloo_ranks_equal_one_process(tmp_path):
    ranks = spawn_gloo(simclr_worker, tmp_path)
    model = simclr_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = simclr_sgd_step(model, model, *simclr_views())
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / len(ranks), ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["acc"] for r in ranks) / len(ranks), ref["acc"])
    moved = max((ref["state"][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # the step changed the weights far beyond the tolerance below
    for r in ranks:
        for name, tensor in ref["state"].items():
            torch.testing.assert_close(r["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


SIMCLR_STEPS = ("method=simclr", "optim.total_steps=4", "checkpoint_every=2", "val_every=4", "log_every=2",
                "augment.geometry.crop_size=16", "data.val_batches=1", "model.simclr.dim=16")
VIT_TINY = ("model.arch=vit", "model.stem=hayat", "model.vit.patch_size=4", "model.vit.depth=1",
            "model.vit.width=32", "model.vit.heads=2")
FUSION_TINY = ("model.arch=fusion", "model.fusion.patch_size=4", "model.fusion.depth=1", "model.fusion.width=32",
               "model.fusion.heads=2", "model.fusion.vit_dim=32")
#: arch -> (overrides, feature_dim: ResNet-18 512; the ViT's width; fusion: ResNet-18 layer3 256 + vit_dim).
SIMCLR_ARCHS = {"resnet18": ((), 512), "vit": (VIT_TINY, 32), "fusion": (FUSION_TINY, 256 + 32)}


@pytest.fixture(scope="module", params=list(SIMCLR_ARCHS))
def simclr_run(request, packed_mock, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"simclr_{request.param}") / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, *SIMCLR_STEPS, *SIMCLR_ARCHS[request.param][0])) == 0
    return request.param, run_dir


def test_simclr_runs_and_exports_each_encoder(simclr_run, packed_mock, tmp_path):
    arch, run_dir = simclr_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["acc"] <= 1.0 for r in records if "loss" in r)
    loaded = load_encoder(run_dir / "encoder.pt")  # no flags
    assert (loaded.arch, loaded.feature_dim, loaded.info["method"]) == (arch, SIMCLR_ARCHS[arch][1], "simclr")
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    assert state["encoder_prefix"] == "backbone."
    for name, tensor in loaded.encoder.state_dict().items():
        assert torch.equal(tensor, state["model"][f"backbone.{name}"]), name
    images = torch.randn(2, 5, 107, 107)
    with torch.no_grad():
        assert loaded.encoder(loaded.transform(images)).shape == (2, SIMCLR_ARCHS[arch][1])
    if arch == "vit":
        from test_eval_morph import morph_args, numpy_knn

        out = tmp_path / "knn"
        assert main(morph_args(packed_mock, out, f"ckpt={run_dir / 'encoder.pt'}", "protocol=knn")) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        want_pred, want_true = numpy_knn(packed_mock, run_dir / "encoder.pt", 15)
        assert metrics["accuracy"] == pytest.approx(np.mean(want_pred == want_true))


def test_simclr_resumes_bit_identically(simclr_run, packed_mock, tmp_path, capsys):
    arch, whole = simclr_run
    if arch != "resnet18":
        pytest.skip("one resume: the resnet18 run (BatchNorm buffers too); the others resume through the same code")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step-00000002.pt", run_dir / "checkpoints")
    assert main(tiny_pretrain_args(packed_mock, run_dir, *SIMCLR_STEPS)) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a = load_checkpoint(whole / "checkpoints" / "step-00000004.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    assert set(a["model"]) == set(b["model"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key


# ---- what the hostile pass on issue 12 found ------------------------------------------------------------------


def test_a_vit_encoder_embeds_and_refuses_files_that_contradict_themselves(simclr_run, packed_mock, tmp_path,
                                                                          capsys):
    """A vit has no stem: embed writes its file all the same. A copy of its encoder.pt whose encoder_args or crop
    no longer fit its weights is a message naming the file, never a traceback."""
    arch, run_dir = simclr_run
    if arch != "vit":
        pytest.skip("the vit run")
    out = tmp_path / "emb.h5"
    assert main(["embed", "--ckpt", str(run_dir / "encoder.pt"), "--data", str(packed_mock), "--out", str(out),
                 "num_workers=0", "progress=false"]) == 0
    import h5py

    with h5py.File(out, "r") as handle:
        assert handle.attrs["arch"] == "vit" and handle.attrs["stem"] == ""
    state = torch.load(run_dir / "encoder.pt", weights_only=True)
    for name, edit in (("size", lambda s: s["encoder_args"].update(image_size=64)),
                       ("bands", lambda s: s["encoder_args"].update(in_channels=3)),
                       ("crop", lambda s: s["augment"]["geometry"].update(crop_size=24))):
        bad = copy.deepcopy(state)
        edit(bad)
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=str(path)):
            load_encoder(path)
        assert main(["embed", "--ckpt", str(path), "--data", str(packed_mock), "--out", str(tmp_path / "x.h5"),
                     "num_workers=0", "progress=false"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err


def test_a_vit_fine_tunes_with_layer_wise_learning_rates_over_its_blocks():
    from sslsky.eval.supervised import encoder_blocks

    vit = build_encoder("vit", 3, image_size=16, patch_size=4, depth=3, width=16, heads=2)
    blocks = encoder_blocks(vit)
    assert [name for name, _ in blocks] == ["blocks.2", "blocks.1", "blocks.0", "embed"]
    params = [p for _, group in blocks for p in group]
    assert len(params) == len(list(vit.parameters())) == len({id(p) for p in params})  # each once
    assert any(p is vit.norm.weight for p in blocks[0][1])  # the final norm trains with the top block


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=simclr", "votes.weight=7"], "votes is read only by methods that use vote counts"),
    (["method=votes", "votes.weight=0"], "votes.weight is read only by method=hybrid"),
    (["data.batch_size=1"], "data.batch_size=1 must be >= 2"),
    (["method=simclr", "model.simclr.temperature=1e-30"], "model.simclr.temperature=1e-30 must be >= 0.001"),
])
def test_settings_that_could_only_mislead_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_sections(load_config(PretrainConfig, None, ["model.moco={}", *overrides]))
    check_sections(load_config(PretrainConfig, None, ["method=hybrid", "model.moco={}", "votes.weight=2"]))


def test_a_run_of_one_method_cannot_be_resumed_as_another(packed_mock, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=2", "checkpoint_every=2",
                                   "val_every=0")) == 0
    assert main(tiny_pretrain_args(packed_mock, run_dir, "method=simclr", "optim.total_steps=2")) == 2
    err = capsys.readouterr().err
    assert "holds a method=moco run at step 2" in err and "method=simclr, which cannot resume it" in err
    assert "allow_changes" not in err  # no allowance can turn one method into another
