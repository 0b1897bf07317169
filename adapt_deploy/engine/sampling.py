"""An endless, seeded, resumable stream of index batches: iteration i always sees the same batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches, a new permutation each epoch (seeded by seed and epoch), last partial
    batch dropped; starts at batch `start`, so a resumed run continues the same sequence."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0) -> None:
        if num_items < batch_size:
            raise ValueError(f"dataset has {num_items} items, fewer than batch size {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.per_epoch = num_items // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
            for b in range(offset, self.per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]
                step += 1
