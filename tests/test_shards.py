"""ShardDataset over packed shards: index mapping, splits, label subsets, workers, DistributedSampler."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from conftest import pack_args
from torch.utils.data import DataLoader, DistributedSampler

from sslsky.cli import main
from sslsky.data.shards import ShardDataset
from sslsky.data.splits import assign_splits


@pytest.fixture
def packed(survey, tmp_path):
    out = tmp_path / "packed"
    assert main(pack_args(survey, out, "--shard-size", "7")) == 0  # 30 rows -> 5 shards, uneven last
    return survey, out


def _fits(survey, name):
    return fits.getdata(survey.parent / name).astype(np.float32)


def test_every_global_index_maps_to_its_shard_row(packed):
    survey, out = packed
    table = Table.read(survey)
    ds = ShardDataset(out)
    assert len(ds) == len(table) and list(ds.index.rows) == [7, 7, 7, 7, 2]
    for g in range(len(ds)):
        shard, row = ds.locate(g)
        assert (shard, row) == (g // 7, g % 7)
        item = ds[g]
        np.testing.assert_array_equal(item["image"].numpy(), _fits(survey, table["file"][g]))
        assert item["object_id"] == table["object_id"][g]
        np.testing.assert_allclose(item["ebv"], table["ebv"][g], rtol=1e-6)
        # per-band PSF carried through from the catalog, band order kept
        np.testing.assert_allclose(item["psf_fwhm"].numpy(), [table[f"psf_fwhm_{b}"][g] for b in "ugriz"], rtol=1e-6)


def test_splits_and_label_subsets(packed):
    survey, out = packed
    table = Table.read(survey)
    codes = assign_splits(table["object_id"])
    parts = {s: ShardDataset(out, split=s) for s in ("train", "val", "test")}
    for code, name in enumerate(("train", "val", "test")):
        ids = sorted(parts[name].index.columns["object_id"][parts[name].indices])
        assert ids == sorted(table["object_id"][codes == code])
    labelled = ShardDataset(out, label="z")
    assert len(labelled) == int(np.isfinite(table["z"]).sum())
    assert all(np.isfinite(labelled[i]["z"]) for i in range(len(labelled)))
    few = ShardDataset(out, label="morph_class", label_fraction=0.25, seed=3)
    n_labelled = int((table["morph_class"] >= 0).sum())
    assert len(few) == round(0.25 * n_labelled)
    assert all(few[i]["morph_class"] >= 0 for i in range(len(few)))
    np.testing.assert_array_equal(few.indices, ShardDataset(out, label="morph_class", label_fraction=0.25,
                                                            seed=3).indices)
    with pytest.raises(ValueError, match="needs label"):
        ShardDataset(out, label_fraction=0.5)


def test_batched_read_equals_item_by_item(packed):
    _, out = packed
    ds = ShardDataset(out, split="train")
    order = [len(ds) - 1, 0, 5, 5, -1, 3]  # unsorted, across shards, repeated, negative
    batch, single = ds.__getitems__(order), [ds[i] for i in order]
    assert len(batch) == len(single)
    for a, b in zip(batch, single):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key])
            else:  # z is NaN where unknown
                assert type(a[key]) is type(b[key]) and (a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]))

def test_dataloader_workers_and_distributed_sampler(packed):
    survey, out = packed
    ds = ShardDataset(out)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
        for batch in loader:
            assert batch["image"].shape[1:] == (5, 16, 16) and batch["image"].dtype == torch.float32
            for image, g in zip(batch["image"], batch["index"]):
                np.testing.assert_array_equal(image.numpy(), ds.read_image(int(g)))
            seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(len(ds)))  # 30 rows over 2 ranks: disjoint, complete


def test_legacy_file_reads_like_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 5)).astype(np.float32)  # (N, H, W, C) as in the original files
    path = tmp_path / "legacy.h5"
    with h5py.File(path, "w") as handle:
        handle["images"] = images
        handle["specz_redshift"] = np.linspace(0.01, 0.3, 6)
        handle["e_bv"] = np.full(6, 0.02)
        handle["ObjID"] = np.arange(10, 16)
        handle["ra"] = np.zeros(6)
        handle["dec"] = np.zeros(6)
    ds = ShardDataset(path)
    item = ds[4]
    np.testing.assert_array_equal(item["image"].numpy(), np.moveaxis(images[4], -1, 0))
    assert item["object_id"] == 14 and item["z"] == pytest.approx(0.01 + 4 * 0.29 / 5)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sslsky pack"):
        ShardDataset(tmp_path)


def test_read_batch_equals_the_default_collated_items(survey, tmp_path):
    from torch.utils.data import DataLoader, SequentialSampler, default_collate

    from sslsky.data.shards import batch_loader

    out = tmp_path / "packed"
    assert main(pack_args(survey, out, "--shard-size", "7")) == 0
    ds = ShardDataset(out, split="train")
    indices = [5, 0, len(ds) - 1, 3, 3, 8]  # unsorted, across shards, repeated
    batch, reference = ds[indices], default_collate([ds[i] for i in indices])
    assert batch.keys() == reference.keys()
    for key in batch:
        assert batch[key].dtype == reference[key].dtype, key
        torch.testing.assert_close(batch[key], reference[key], rtol=0, atol=0, equal_nan=True, msg=key)
    # The batch loader yields the DataLoader's own batches, in the same order.
    ours = list(batch_loader(ds, SequentialSampler(ds), 4, drop_last=False))
    theirs = list(DataLoader(ds, batch_size=4, sampler=SequentialSampler(ds), drop_last=False))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)
