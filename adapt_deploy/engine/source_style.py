"""FDA in training (data.fda_beta): each source batch takes the style of target train images
drawn by (train.seed, iteration), so a resumed run restyles every batch as the first run did."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from adapt_deploy.data.fda import fda

STREAM = 0xFDA  # keeps the target draws apart from every other seeded stream of the run


class TargetStyle:
    """Restyles source batches with FDA; `shard` is this process's part of each global batch
    (engine/sampling.batch_shard), so the draws do not depend on the number of processes."""

    def __init__(
        self,
        target: Dataset,
        beta: float,
        seed: int,
        batch_size: int,
        shard: slice,
        device: torch.device,
    ) -> None:
        if len(target) == 0:  # type: ignore[arg-type]
            raise ValueError("FDA needs target images; the target split is empty")
        self.target, self.beta, self.seed = target, beta, seed
        self.batch_size, self.shard, self.device = batch_size, shard, device

    def indices(self, iteration: int) -> list[int]:
        """The target images whose style this process's source images take at `iteration`."""
        state = np.random.SeedSequence([self.seed, STREAM, iteration]).generate_state(1)
        generator = torch.Generator().manual_seed(int(state[0]))
        draws = torch.randint(len(self.target), (self.batch_size,), generator=generator)  # type: ignore[arg-type]
        return draws.tolist()[self.shard]

    def __call__(self, batch: dict[str, Any], iteration: int) -> dict[str, Any]:
        """`batch` with its images (uint8, on the device) in the target images' style."""
        style = torch.stack([self.target[i]["image"] for i in self.indices(iteration)])
        images = batch["image"].to(self.device)
        return {**batch, "image": fda(images, style.to(self.device), self.beta)}
