"""An endless, seeded, resumable stream of index batches: iteration i always sees the same batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

from adapt_deploy.errors import UserError, worker_message

T = TypeVar("T")


def batch_shard(batch_size: int, rank: int, world_size: int) -> slice:
    """Process `rank`'s contiguous part of each global batch of `batch_size`."""
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(
            f"a batch of {batch_size} does not split into {world_size} shards (rank {rank})"
        )
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


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
        self.shard = batch_shard(batch_size, rank, world_size)
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
                yield order[b * self.batch_size : (b + 1) * self.batch_size][self.shard]
                step += 1


class RareClassBatchSampler(Sampler[list[int]]):
    """Rare-class sampling (DAFormer): each image of a batch is drawn by first drawing a class
    with P(c) = softmax((1 - f_c) / temperature), f_c the class's share of the labelled pixels,
    then an image holding at least MIN_SHARE of its pixels of that class (any image with the
    class when none holds that much). Batch i depends only on (seed, i): endless and exactly
    resumable; process `rank` of `world_size` takes its contiguous shard, as EpochBatchSampler.
    """

    MIN_SHARE = 0.003  # DAFormer's 3000 pixels of a 1280x720 GTA5 label

    def __init__(
        self,
        counts: np.ndarray,
        batch_size: int,
        seed: int,
        temperature: float,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shard = batch_shard(batch_size, rank, world_size)
        self.class_probs, self.images = rare_class_table(counts, temperature)
        self.batch_size, self.seed, self.start = batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
            classes = torch.multinomial(
                self.class_probs, self.batch_size, replacement=True, generator=generator
            )
            batch = []
            for c in classes.tolist():
                pool = self.images[c]
                batch.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
            yield batch[self.shard]
            step += 1


class MultiSourceBatchSampler(Sampler[list[int]]):
    """Batches over several sources concatenated as data/multi_source.py does (`sizes`: their
    lengths), each source equally often whatever its size. "alternate": iteration i takes its
    whole batch from source i mod S; "mix": position j of every batch is from source j mod S,
    so a batch holds batch_size / S images of each. Every source is read as an endless stream
    of seeded permutations (a new one per pass), so batch i depends only on (seed, i): exactly
    resumable; process `rank` of `world_size` takes its contiguous shard of each global batch,
    as EpochBatchSampler (under "mix" the shard must hold a multiple of S images, so that every
    process sees every source each iteration)."""

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        seed: int,
        mixing: str,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shard = batch_shard(batch_size, rank, world_size)
        if mixing not in ("alternate", "mix"):
            raise ValueError(f"unknown source mixing {mixing!r}; expected 'alternate' or 'mix'")
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"multi-source sampling needs 2 or more non-empty sources: {sizes}")
        if mixing == "mix" and (batch_size // world_size) % len(sizes):
            raise UserError(
                f"data.source_mixing 'mix': each of the {world_size} processes takes "
                f"{batch_size // world_size} images of a batch, not a multiple of the "
                f"{len(sizes)} sources; make train.batch_size a multiple of "
                f"{len(sizes) * world_size}"
            )
        self.sizes, self.batch_size, self.seed, self.mixing = sizes, batch_size, seed, mixing
        self.start = start
        self.offsets = [sum(sizes[:s]) for s in range(len(sizes))]
        self._orders: dict[int, tuple[int, list[int]]] = {}  # source -> (pass, permutation)

    def item(self, source: int, k: int) -> int:
        """The global index of the k-th draw from `source`'s stream."""
        epoch, offset = divmod(k, self.sizes[source])
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            state = np.random.SeedSequence([self.seed, source, epoch]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state[0]))
            cached = (epoch, torch.randperm(self.sizes[source], generator=generator).tolist())
            self._orders[source] = cached
        return self.offsets[source] + cached[1][offset]

    def batch(self, step: int) -> list[int]:
        """The global batch of iteration `step` (all processes' shards together)."""
        count, size = len(self.sizes), self.batch_size
        if self.mixing == "alternate":
            source, k = step % count, (step // count) * size
            return [self.item(source, k + j) for j in range(size)]
        per = size // count  # draws per source and batch
        return [self.item(j % count, step * per + j // count) for j in range(size)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.batch(step)[self.shard]
            step += 1


def rare_class_table(
    counts: np.ndarray, temperature: float
) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """P(class) over the classes present in `counts` (images, classes) and, per class, the
    images to draw from; UserError when no image holds a labelled pixel."""
    totals = counts.sum(axis=0).astype(np.float64)
    if totals.sum() <= 0:
        raise UserError("rare-class sampling: the labelled set holds no labelled pixel")
    present = totals > 0
    share = totals / totals.sum()
    logits = torch.from_numpy((1.0 - share) / temperature)
    logits[~torch.from_numpy(present)] = -torch.inf
    probs = torch.softmax(logits - logits[present].max(), dim=0)
    pixels = counts.sum(axis=1, keepdims=True).clip(min=1)
    images = {}
    for c in np.flatnonzero(present):
        enough = np.flatnonzero(counts[:, c] >= RareClassBatchSampler.MIN_SHARE * pixels[:, 0])
        images[int(c)] = (enough if enough.size else np.flatnonzero(counts[:, c])).tolist()
    return probs, images


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
