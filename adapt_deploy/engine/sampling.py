"""An endless, seeded, resumable stream of index batches: iteration i always sees the same batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch.utils.data import Sampler

from adapt_deploy.errors import UserError, worker_message

T = TypeVar("T")


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches, a new permutation each epoch (seeded by seed and epoch), last partial
    batch dropped; starts at batch `start`, so a resumed run continues the same sequence.

    `batch_size` is the global batch. With `world_size` processes, process `rank` gets its own
    contiguous shard of each global batch, so the shards together are the batch one process
    would see, and a run resumes exactly whatever the number of processes before and after.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_items < batch_size:
            raise ValueError(f"dataset has {num_items} items, fewer than batch size {batch_size}")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(
                f"a batch of {batch_size} does not split into {world_size} shards (rank {rank})"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.per_epoch = num_items // batch_size
        self.shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
            for b in range(offset, self.per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size][self.shard]
                step += 1


def without_worker_tracebacks(batches: Iterable[T]) -> Iterator[T]:
    """The items of a DataLoader; a UserError (a bad label file, say) raised in one of its
    worker processes is raised here again as its own one-line message, not as PyTorch's
    "Caught ... in DataLoader worker process" text around the worker's traceback."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            raise type(exc)(worker_message(str(exc))) from None
        yield item
