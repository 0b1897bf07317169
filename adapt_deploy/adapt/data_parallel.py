"""What the methods' computations need from data-parallel training. The engine sets it while N
processes train (engine/distributed.py `method_collectives`); one process needs none of it.

Each process sees its shard of every global batch and DDP averages the gradients. Two things
would then make N processes differ from one process on the whole batch:

- a loss averaged over a varying number of pixels (labelled, pseudo-labelled, pointed) divided
  by the shard's own count weighs a process with few such pixels as much as one with many:
  `mean_count` gives the mean count per process over all processes instead (adapt/losses.py);
- a draw from a generator seeded per iteration would start over in every process:
  `earlier_shards` tells a process how many draws the shards before it took, so it skips them
  (ClassMix's classes, adapt/teacher.py), and `batch_rows` where its shard lies in the global
  batch (dropout masks drawn for the whole batch, adapt/seeded_dropout.py).

`mean_count` and `earlier_shards` are collectives: every process must call them in the same
order, whatever its data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Collectives:
    """The engine's collectives over the training processes."""

    mean: Callable[[torch.Tensor], torch.Tensor]  # a tensor's mean over the processes
    earlier: Callable[[list[int]], list[int]]  # the values of the shards before this one
    rank: int = 0  # this process
    size: int = 1  # the processes


_active: Collectives | None = None


@contextmanager
def collectives(active: Collectives) -> Iterator[None]:
    """Within the block the methods' computations use `active` (see the module docstring)."""
    global _active
    previous, _active = _active, active
    try:
        yield
    finally:
        _active = previous


def active() -> bool:
    """Whether N processes are training (the collectives are set)."""
    return _active is not None


def mean_count(count: torch.Tensor) -> torch.Tensor | None:
    """The mean of `count` over the processes while N processes train, else None."""
    if _active is None:
        return None
    return _active.mean(count.detach().to(torch.float64))


def earlier_shards(values: list[int]) -> list[int]:
    """The per-image `values` of the shards before this process's, in batch order; [] for
    one process."""
    return [] if _active is None else _active.earlier(values)


def batch_rows(rows: int) -> tuple[int, int]:
    """(first row of this process's shard of `rows` rows, rows in the global batch); the shards
    are equal and in rank order (engine/sampling.batch_shard)."""
    if _active is None:
        return 0, rows
    return _active.rank * rows, _active.size * rows
