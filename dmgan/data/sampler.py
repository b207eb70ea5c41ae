"""A resumable, shardable batch order: the same indices on every run for a (seed, epoch), and
the data loader that draws batches in it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dmgan.data.dataset import Batch, collate


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


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``dataset`` in :class:`EpochSampler`'s order for this rank (drop_last)."""
    sampler = EpochSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    # Its own generator: creating an iterator must not draw from the global RNG (resume equality).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator[Batch]:
    """The batches of ``epoch``, the first ``skip`` left out (a resumed epoch)."""
    loader.sampler.set_epoch(epoch, skip)  # type: ignore[union-attr]
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    yield from loader
