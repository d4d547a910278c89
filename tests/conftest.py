"""Shared fixtures: a small synthetic survey of FITS cutouts and a catalog, written with astropy.

Independent of the mock simulator (sslsky/data/mock.py): tiny (5, 16, 16)
SDSS-like cubes of noise plus a Gaussian blob, so the pack tests stay fast.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.table import Table

from sslsky.data.fits_io import write_cutout
from sslsky.data.schema import MANIFEST_NAME
from sslsky.surveys import SURVEYS

SIZE = 16  # pixels: tiny cutouts keep the tests fast
N_OBJECTS = 30
SDSS = SURVEYS["sdss"]
BANDS = "".join(SDSS.bands)
VOTE_COLUMNS = ("votes_smooth_yes", "votes_smooth_no")


def galaxy_cube(rng: np.random.Generator, n_bands: int = 5, size: int = SIZE) -> np.ndarray:
    """(C, size, size) float32 nanomaggies: sky noise plus a round Gaussian galaxy."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    radius = rng.uniform(1.5, 3.0)
    profile = np.exp(-0.5 * (x**2 + y**2) / radius**2)
    amplitude = rng.uniform(0.5, 30.0, size=n_bands)[:, None, None]
    noise = rng.normal(0.0, 0.05, size=(n_bands, size, size))
    return (amplitude * profile + noise).astype(np.float32)


def catalog_table(n: int, rng: np.random.Generator) -> Table:
    """Catalog columns of DESIGN.md plus votes and per-band PSF / sky columns; ``file`` left to the caller."""
    table = Table()
    table["object_id"] = np.arange(1000, 1000 + n, dtype=np.int64)
    table["ra"] = rng.uniform(120.0, 240.0, n)
    table["dec"] = rng.uniform(-5.0, 60.0, n)
    z = rng.uniform(0.01, 0.3, n)
    z[::7] = np.nan  # some without a spectroscopic redshift
    table["z"] = z
    table["ebv"] = rng.uniform(0.005, 0.1, n)
    table["morph_class"] = rng.integers(-1, 7, n).astype(np.int16)
    table["morph_name"] = np.array(["galaxy"] * n)
    for name in VOTE_COLUMNS:
        table[name] = rng.integers(0, 40, n).astype(np.int32)
    for i, band in enumerate(BANDS):
        table[f"psf_fwhm_{band}"] = (SDSS.psf_fwhm[i] * rng.uniform(0.8, 1.2, n)).astype(np.float32)
        table[f"sky_sigma_{band}"] = np.full(n, SDSS.sky_sigma[i], dtype=np.float32)
    return table


def make_survey(root: Path, n: int = N_OBJECTS, seed: int = 0) -> Path:
    """Write ``root/cutouts/obj-*.fits`` and ``root/catalog.fits``; return the catalog path."""
    rng = np.random.default_rng(seed)
    (root / "cutouts").mkdir(parents=True, exist_ok=True)
    table = catalog_table(n, rng)
    files = []
    for i in range(n):
        name = f"cutouts/obj-{int(table['object_id'][i])}.fits"
        write_cutout(root / name, galaxy_cube(rng), BANDS, SDSS.pixel_scale, table["ra"][i], table["dec"][i], "sdss")
        files.append(name)
    table["file"] = files
    path = root / "catalog.fits"
    table.write(path, overwrite=True)
    return path


@pytest.fixture(scope="session")
def survey_master(tmp_path_factory) -> Path:
    """A read-only synthetic survey written once per session (copy it before changing anything)."""
    return make_survey(tmp_path_factory.mktemp("survey"))


@pytest.fixture
def survey(tmp_path, survey_master) -> Path:
    """A private copy of the synthetic survey; returns the catalog path."""
    root = tmp_path / "survey"
    shutil.copytree(survey_master.parent, root)
    return root / survey_master.name


def read_packed(out: Path) -> dict:
    """Everything in a packed folder, shards concatenated in manifest order, plus the manifest."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    parts: dict[str, list] = {}
    attrs = []
    for entry in manifest["shards"]:
        with h5py.File(out / entry["path"], "r") as handle:
            for name, dataset in handle.items():
                parts.setdefault(name, []).append(dataset[()])
            attrs.append(dict(handle.attrs))
    data = {name: np.concatenate(values) for name, values in parts.items()}
    data["manifest"] = manifest
    data["attrs"] = attrs
    return data


def pack_args(catalog: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of ``sslsky pack`` for the 16x16 test cutouts; ``extra`` options and key=value in any order.

    argparse wants the key=value overrides together after the options, so they are moved to the end.
    """
    overrides = [item for item in extra if "=" in item and not item.startswith("--")]
    options = [item for item in extra if item not in overrides]
    return ["pack", "--catalog", str(catalog), "--out", str(out), *options, "image_size=16", "progress=false",
            *overrides]


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for SLURM clients of the local 2-node cluster (utils/local_slurm.sh), started once.

    Skips (with the reason) where the cluster cannot run: not root, or SLURM/munge not installed
    (``make test`` installs them).
    """
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (utils/local_slurm.sh)")
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("SLURM or munge not installed: run utils/install_system_deps.sh (make test does)")
    proc = subprocess.run(["bash", str(REPO / "utils" / "local_slurm.sh"), "start"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"local SLURM failed to start:\n{proc.stdout}\n{proc.stderr}")
    conf = proc.stdout.strip().rsplit("SLURM_CONF=", 1)[-1]
    env = dict(os.environ, SLURM_CONF=conf)
    import sys

    env["SSLSKY_VENV"] = sys.prefix
    return env


def run_sbatch(env: dict, script: str, args: list[str], sbatch_options: list[str], log: Path,
               timeout: float = 300) -> int:
    """``sbatch --wait`` a script from the repository root; returns the job's exit status, log on failure."""
    import subprocess

    proc = subprocess.run(["sbatch", "--wait", f"--output={log}", f"--error={log}", *sbatch_options, script, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 3):
        text = log.read_text() if log.exists() else "(no log)"
        raise AssertionError(f"sbatch failed ({proc.returncode}): {proc.stderr}\n--- job log ---\n{text}")
    return proc.returncode


@pytest.fixture(scope="session")
def packed_mock(tmp_path_factory) -> Path:
    """A packed mock SDSS survey (128 galaxies, 107x107 ugriz) for training and evaluation tests."""
    from sslsky.cli import main

    root = tmp_path_factory.mktemp("packed_mock")
    assert main(["mock", "--survey", "sdss", "--n", "128", "--seed", "5", "--out", str(root / "mock"),
                 "progress=false"]) == 0
    assert main(["pack", "--catalog", str(root / "mock" / "catalog.fits"), "--out", str(root / "packed"),
                 "--shard-size", "48", "progress=false"]) == 0
    return root / "packed"


def tiny_pretrain_args(packed: Path, run_dir: Path, *overrides: str) -> list[str]:
    """``sslsky pretrain`` arguments for a few-second CPU run of config/pretrain_tiny.yaml (a MoCo config: for
    another ``method=`` in ``overrides`` its ``model.moco`` section is reset, as a user would)."""
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), "moco")
    own = ["model.moco.queue_size=48"] if method == "moco" else ["model.moco={}"]
    return ["pretrain", "--config", str(REPO / "config" / "pretrain_tiny.yaml"), f"data.path={packed}",
            f"run_dir={run_dir}", "data.batch_size=8", *own, "optim.total_steps=16",
            "checkpoint_every=5", "val_every=8", "log_every=2", "progress=false", *overrides]


@pytest.fixture(scope="session")
def encoder_path(packed_mock, tmp_path_factory) -> Path:
    """encoder.pt of a 6-step tiny pretraining on :func:`packed_mock`, shared by the evaluation tests (the run is
    deterministic, so one serves them all)."""
    from sslsky.cli import main

    run_dir = tmp_path_factory.mktemp("tiny_encoder")
    assert main(tiny_pretrain_args(packed_mock, run_dir, "optim.total_steps=6", "val_every=0")) == 0
    return run_dir / "encoder.pt"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny forwards: one torch thread avoids OpenMP threads waiting on each other when the 2 cores are busy.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; the thread count is restored after.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A real gloo process group for one spawned rank (one torch thread), destroyed on exit."""
    import torch
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def spawn_gloo(worker, folder: Path, world: int = 2) -> list:
    """Run ``worker(rank, world, init_file, out_dir)`` in ``world`` processes; each saves ``out_dir/rank<r>.pt``,
    returned in rank order."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(folder / "init"), str(folder)), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real tmpfs (``mount -t tmpfs -o OPTIONS``, e.g. ``size=200m`` or ``ro,size=64k``) on ``folder``, unmounted
    after: the small full disks and read-only file systems of the fault tests. Skips where mounting is not
    permitted (needs root / CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def untrained_encoder(path: Path, cutout: int = 16, crop: int = 12) -> Path:
    """An sslsky ``encoder.pt`` of a seeded, untrained ResNet-18 for 5-band cutouts of ``cutout`` px cropped to
    ``crop`` px (the tiny surveys of :func:`make_survey`): embed and search tests without a pretraining."""
    import torch

    from sslsky.config import AugmentConfig, config_to_dict
    from sslsky.models.encoders import build_encoder

    augment = AugmentConfig()
    augment.geometry.cutout_size, augment.geometry.crop_size = cutout, crop
    torch.manual_seed(0)
    torch.save({"format": "sslsky-encoder-v1", "encoder": build_encoder("resnet18", 5, "hayat").state_dict(),
                "arch": "resnet18", "stem": "hayat", "survey": "sdss", "bands": list("ugriz"), "stats": {},
                "augment": config_to_dict(augment)}, path)
    return path


@pytest.fixture(scope="session")
def two_class_pack(tmp_path_factory):
    """A mock SDSS survey of 320 galaxies with its classes merged into smooth (0) / featured (1), packed, and the
    encoder.pt of a 30-step tiny MoCo pretraining on it: ``(packed folder, encoder.pt)``."""
    from sslsky.cli import main

    root = tmp_path_factory.mktemp("two_class")
    assert main(["mock", "--survey", "sdss", "--n", "320", "--seed", "11", "--out", str(root / "mock"),
                 "progress=false"]) == 0
    table = Table.read(root / "mock" / "catalog.fits")
    morph = np.asarray(table["morph_class"])
    table["morph_class"] = np.where(morph < 0, -1, (morph > 2).astype(morph.dtype))  # 0-2 smooth, 3-6 featured
    table["morph_name"] = np.where(table["morph_class"] == 0, "smooth", "featured")
    table.write(root / "mock" / "two_class.fits")
    assert main(["pack", "--catalog", str(root / "mock" / "two_class.fits"), "--out", str(root / "packed"),
                 "--dtype", "float32", "progress=false"]) == 0
    run_dir = root / "pretrain"
    assert main(tiny_pretrain_args(root / "packed", run_dir, "optim.total_steps=30", "val_every=0")) == 0
    return root / "packed", run_dir / "encoder.pt"
