"""Dropout whose masks are the same in a resumed run and in any number of processes.

torch's dropout draws from the process's global generator, whose state the trainer state does
not hold and which differs between processes: a run resumed from iteration k, or trained in N
processes, would draw other masks than one uninterrupted process. Here the generator is seeded
by (train.seed, iteration) before each iteration and the mask is drawn for the whole global
batch, on the CPU; each process keeps its shard's rows (adapt/data_parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from adapt_deploy.adapt import data_parallel

SALT = 0x5EED_D20F  # keeps these draws apart from other generators seeded by (seed, iteration)


class IterationDropout(nn.Module):
    """Zeroes each element with probability `p` and scales the rest by 1 / (1 - p), as
    nn.Dropout does in training; masks from (seed, iteration) via `reseed`."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self.generator = torch.Generator()
        self.reseed(0)

    def reseed(self, iteration: int) -> None:
        """Start the masks of `iteration` (the trainer's before_iteration calls this)."""
        self.generator.manual_seed((self.seed * 1_000_003 + iteration) ^ SALT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        first, rows = data_parallel.batch_rows(x.shape[0])
        draws = torch.rand((rows, *x.shape[1:]), generator=self.generator)
        keep = (draws[first : first + x.shape[0]] >= self.p).to(x.device, x.dtype)
        return x * keep / (1.0 - self.p)
