"""README "Your own data": the Galaxy Zoo block runs exactly as written, on the Galaxy-Zoo-shaped mock.

The block is read out of README.md (the fenced bash block after ``<!-- own-data: galaxy-zoo -->``) and run
with bash in a scratch folder holding the repository's config/, at a small N, STEPS and EPOCHS. Then its
outputs are checked: text ids from the catalog all the way to the neighbour list.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.table import Table

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- own-data: galaxy-zoo -->"


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    assert marker in text, f"README.md has no {marker}"
    match = re.search(r"```bash\n(.*?)```", text[text.index(marker):], flags=re.S)
    assert match, f"no bash block after {marker}"
    return match.group(1)


@pytest.mark.slow
def test_galaxy_zoo_block_runs_as_written(tmp_path):
    (tmp_path / "config").symlink_to(REPO / "config")
    env = dict(os.environ, N="100", STEPS="4", EPOCHS="2", MIN_STEPS="0", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    script = "set -euo pipefail\n" + readme_block(MARKER)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    catalog = Table.read(tmp_path / "gz" / "catalog.fits")
    names = set(catalog["id_str"].astype(str))
    manifest = json.loads((tmp_path / "gz_packed" / "manifest.json").read_text())
    assert manifest["photometric"] is False and manifest["dtype"] == "uint8"
    assert manifest["image_shape"] == [3, 72, 72] and manifest["id_column"] == "id_str"
    assert manifest["label_names"] == {"0": "smooth", "1": "featured"}
    label_of = dict(zip(catalog["id_str"].astype(str), np.asarray(catalog["label"])))
    for protocol in ("knn", "finetune"):
        metrics = json.loads((tmp_path / "runs" / f"gz_{protocol}" / "metrics.json").read_text())
        assert metrics["classes"] == ["smooth", "featured"]  # the pack's label names, not the 7 morphology classes
        with h5py.File(tmp_path / "runs" / f"gz_{protocol}" / "predictions.h5", "r") as f:
            ids = f["object_id"].asstr()[()]
            true = f["true_class"][()]
        assert set(ids) <= names and len(ids) > 0  # the catalog's names, kept exactly
        assert [label_of[i] for i in ids] == true.tolist()
    with h5py.File(tmp_path / "runs" / "gz" / "embeddings.h5", "r") as f:
        assert sorted(f["object_id"].asstr()[()]) == sorted(names)
    query = str(catalog["id_str"][0])
    assert f"query {query}" in done.stdout
    listed = re.findall(r"^\s+\d+\s+(J\S+)\s", done.stdout, flags=re.M)
    assert len(listed) == 10 and query not in listed and set(listed) <= names
    assert (tmp_path / "runs" / "gz" / "neighbours.png").stat().st_size > 10_000
