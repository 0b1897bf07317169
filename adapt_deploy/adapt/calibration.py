"""Pseudo-weak label thresholds calibrated online on the labelled source (an option, not the
paper's recipe).

Eq. 7's global T = 0.2 on sigmoid(LSE) marks every class present in every image on our
benchmark: logits are free in their absolute level, so the pooled scores of present and absent
classes both sit far above T (bench/results/adaptation_2026-11-21.md). The source batches of a WDA
iteration carry true image labels, so each class's cut can be kept where it separates them:
per class, exponential averages of the LSE of source images where the class is present and
where it is absent, and the cut halfway between. A class not yet seen both ways keeps the
global T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SourceCalibratedThresholds:
    """Per-class LSE cuts, updated from every source batch; `labels(lse)` gives y_t."""

    def __init__(self, num_classes: int, threshold: float, momentum: float = 0.05) -> None:
        self.momentum = momentum
        self.default = math.log(threshold / (1 - threshold))  # T on the LSE scale
        self.present = torch.full((num_classes,), math.nan)
        self.absent = torch.full((num_classes,), math.nan)

    def update(self, lse: torch.Tensor, image_labels: torch.Tensor) -> None:
        """Fold in one source batch: LSE (N, C) and its true image labels (N, C)."""
        lse, labels = lse.detach().float().cpu(), image_labels.detach().cpu() > 0.5
        for side, mask in ((self.present, labels), (self.absent, ~labels)):
            count = mask.sum(0)
            mean = torch.where(mask, lse, 0.0).sum(0) / count.clamp(min=1)
            seen = count > 0
            fresh = seen & side.isnan()
            side[fresh] = mean[fresh]
            blend = seen & ~fresh
            side[blend] += self.momentum * (mean[blend] - side[blend])

    def state_dict(self) -> dict[str, Tensor]:
        """The two running averages: what a resumed run needs to keep the same cuts."""
        return {"present": self.present.clone(), "absent": self.absent.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.present.copy_(state["present"])
        self.absent.copy_(state["absent"])

    def cuts(self) -> torch.Tensor:
        """(C,) LSE cut per class: halfway between the two averages, else the global T."""
        both = ~(self.present.isnan() | self.absent.isnan())
        middle = (self.present + self.absent) / 2
        return torch.where(both, middle, torch.full_like(middle, self.default))

    def labels(self, lse: torch.Tensor) -> torch.Tensor:
        """y (N, C) = [LSE > cut] as float, on `lse`'s device."""
        return (lse.detach() > self.cuts().to(lse.device)).float()
