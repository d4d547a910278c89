"""`sbatch slurm_scripts/pack.sh` on the real local SLURM cluster: 2 MPI ranks equal one process."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import pack_args, read_packed, run_sbatch

from sslsky.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")]


def test_sbatch_pack_two_ranks_equals_one_process(survey, tmp_path, slurm_env):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(pack_args(survey, one, "--shard-size", "8")) == 0
    args = pack_args(survey, two, "--shard-size", "8")[1:]  # drop the subcommand name: the script adds it
    status = run_sbatch(slurm_env, "slurm_scripts/pack.sh", args, ["--nodes=1", "--ntasks-per-node=2"],
                        tmp_path / "job.log")
    log = (tmp_path / "job.log").read_text()
    assert status == 0, log
    assert "2 ranks" in log and "finished with status 0" in log
    a, b = read_packed(one), read_packed(two)
    assert b["manifest"]["ranks"] == 2
    for name in ("object_id", "images", "z", "ebv", "votes"):
        np.testing.assert_array_equal(a[name], b[name])
    assert a["manifest"]["stats"] == b["manifest"]["stats"]
