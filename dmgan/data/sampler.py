"""A resumable, shardable batch order: the same indices on every run for a (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank: a permutation seeded by (seed, epoch), cut to a whole
    number of global batches (drop_last), dealt round-robin to ``world_size`` ranks, and
    optionally started ``skip_batches`` batches in (to resume mid-epoch).

    >>> s = EpochSampler(10, batch_size=2, shuffle=False, rank=1, world_size=2)
    >>> list(s)
    [1, 3, 5, 7]
    >>> s.set_epoch(0, skip_batches=1); list(s)
    [5, 7]
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size < batch_size * world_size:
            raise ValueError(
                f"dataset of {size} items is smaller than one global batch ({world_size} x {batch_size})"
            )
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.skip_batches * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size
