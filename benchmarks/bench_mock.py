"""Mock-survey throughput: galaxies/s per core for SDSS (5x107x107) and DECaLS (3x152x152).

    python benchmarks/bench_mock.py [--n 300] [--ranks 2] [--no-mpi]

Part 1 times :func:`render_galaxy` in this process (one core, after a warm-up
that pays GalSim's one-off Sersic set-up), rendering plus noise, no file I/O.
Part 2 runs the whole ``sslsky mock`` (population, rendering, FITS writing)
with one process and with ``mpirun -n RANKS`` and reads the galaxies/s per core
from its summary line. Target: >= 30 galaxies/s per core for SDSS.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sslsky.config import MockConfig
from sslsky.data.mock import draw_population, render_galaxy
from sslsky.surveys import SURVEYS

SUMMARY = re.compile(r"; ([\d.]+) s on (\d+) rank\(s\), ([\d.]+) galaxies/s per core")
TARGET_SDSS = 30.0


def render_rate(survey_name: str, n: int, seed: int = 0) -> float:
    """Galaxies/s of render_galaxy on one core (after rendering 30 galaxies to warm up)."""
    survey = SURVEYS[survey_name]
    table = draw_population(MockConfig(survey=survey_name, n=n + 30, seed=seed), survey, np.random.default_rng(seed))
    columns = {name: np.asarray(table[name]) for name in table.colnames}
    rows = [{name: col[i] for name, col in columns.items()} for i in range(len(table))]
    for i, row in enumerate(rows[:30]):
        render_galaxy(row, survey, np.random.default_rng([seed, i]))
    start = time.perf_counter()
    for i, row in enumerate(rows[30:]):
        render_galaxy(row, survey, np.random.default_rng([seed, i]))
    return n / (time.perf_counter() - start)


def run_cli(command: list[str], label: str) -> tuple[float, float]:
    """Run ``sslsky mock``; returns (total seconds it reports, galaxies/s per core)."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{label}: sslsky mock failed ({result.returncode})\n{result.stdout}{result.stderr}")
    match = SUMMARY.search(result.stdout)
    if match is None:
        raise SystemExit(f"{label}: no summary line in the output:\n{result.stdout}")
    seconds, ranks, per_core = float(match.group(1)), int(match.group(2)), float(match.group(3))
    print(f"{label:>10}: {seconds:6.1f} s in the command, wall {wall:6.1f} s, {per_core:6.1f} galaxies/s per core "
          f"({per_core * ranks:6.1f} in all)")
    return seconds, per_core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="galaxies per measurement")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks of the parallel run")
    parser.add_argument("--no-mpi", action="store_true", help="skip the sslsky mock / mpirun comparison")
    args = parser.parse_args()

    for name in ("sdss", "decals"):
        survey = SURVEYS[name]
        rate = render_rate(name, args.n)
        note = f" (target >= {TARGET_SDSS:g})" if name == "sdss" else ""
        print(f"render_galaxy {name:>6} {survey.n_bands}x{survey.cutout_size}x{survey.cutout_size}: "
              f"{rate:6.1f} galaxies/s on one core{note}")
    if args.no_mpi:
        return
    sslsky = Path(sys.executable).with_name("sslsky")
    sslsky_cmd = str(sslsky) if sslsky.exists() else "sslsky"
    root = Path(tempfile.mkdtemp(prefix="bench_mock_"))
    try:
        common = ["mock", "--survey", "sdss", "--n", str(args.n), "--seed", "0", "progress=false"]
        one_s, _ = run_cli([sslsky_cmd, *common, "--out", str(root / "one")], "1 rank")
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            print("mpirun not found: no parallel run (apt-get install openmpi-bin)")
            return
        many_s, _ = run_cli([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(args.ranks), sslsky_cmd,
                             *common, "--out", str(root / "many")], f"{args.ranks} ranks")
        print(f"speed-up with {args.ranks} ranks: {one_s / many_s:.2f}x (this machine has {os.cpu_count()} cores)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
