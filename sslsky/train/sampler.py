"""A ``DistributedSampler`` that can start mid-epoch, for exact resume."""

from __future__ import annotations

from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start after ``start_batch`` batches.

    The order of an epoch depends only on (seed, epoch), as in the parent, so a
    job resumed at step s sees exactly the batches an uninterrupted job would
    have seen from step s on. Works with one process (no process group needed
    when ``num_replicas`` and ``rank`` are given).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if self.num_samples < batch_size:
            raise ValueError(
                f"{len(dataset)} training images over {num_replicas} ranks leave {self.num_samples} per rank, "
                f"fewer than one batch of {batch_size}; lower the batch size or add data"
            )
        self.batch_size = batch_size
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())[: self.batches_per_epoch * self.batch_size]
        return iter(indices[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
