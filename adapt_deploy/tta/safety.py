"""What keeps online adaptation from drifting away: EMA teacher, stochastic restore, collapse
detection and reset rules.

- The teacher (the weights the runtime gets) is an exponential moving average of the student,
  so one bad update moves it by (1 − ema) of that update only (CoTTA).
- Stochastic restore sets a random share of the student's trainable weights back to the
  source's at every update, so knowledge the stream does not exercise is not forgotten (CoTTA).
- The collapse monitor watches the teacher's predictions: a model that collapses predicts
  fewer and fewer classes with ever more confidence (RDumb, SAR). Against the source's own
  statistics (computed at export, `SourceStats`), a smoothed class count or mean entropy that
  falls far below the source's, or a non-finite loss or weight, calls for a reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], ema: float) -> None:
    """teacher ← ema · teacher + (1 − ema) · student, tensor by tensor."""
    torch._foreach_lerp_(teacher, student, 1.0 - ema)


@torch.no_grad()
def stochastic_restore(
    params: list[nn.Parameter], source: list[torch.Tensor], share: float, generator: torch.Generator
) -> None:
    """Set each element of `params` back to `source` with probability `share`."""
    if share <= 0:
        return
    for param, original in zip(params, source, strict=True):
        mask = torch.rand(param.shape, generator=generator, device="cpu") < share
        param.copy_(torch.where(mask.to(param.device), original, param))


@dataclass
class Observation:
    """The teacher's view of one adapted frame."""

    entropy: float  # mean normalized pixel entropy
    predicted_classes: int  # classes holding at least 0.1% of the argmax pixels
    present_classes: int  # pseudo-weak labels marked present


class CollapseMonitor:
    """Smoothed teacher statistics against the source's; `check` says why it collapsed, if so."""

    def __init__(
        self,
        source_entropy: float,
        source_classes: float,
        entropy_share: float = 0.25,
        classes_share: float = 0.5,
        smoothing: float = 0.8,
        warmup: int = 4,
    ) -> None:
        self.source_entropy = source_entropy
        self.source_classes = source_classes
        self.entropy_share = entropy_share
        self.classes_share = classes_share
        self.smoothing = smoothing
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        self.entropy: float | None = None
        self.classes: float | None = None
        self.seen = 0

    def observe(self, obs: Observation) -> None:
        s = self.smoothing
        self.seen += 1
        if self.entropy is None or self.classes is None:
            self.entropy, self.classes = obs.entropy, float(obs.predicted_classes)
        else:
            self.entropy = s * self.entropy + (1 - s) * obs.entropy
            self.classes = s * self.classes + (1 - s) * obs.predicted_classes

    def check(self, loss: float, weights_finite: bool) -> str | None:
        """The collapse reason, or None while healthy."""
        if not math.isfinite(loss) or not weights_finite:
            return "non-finite loss or weights"
        if self.seen < self.warmup or self.entropy is None or self.classes is None:
            return None
        if self.classes < self.classes_share * self.source_classes:
            return (
                f"predicted classes {self.classes:.1f} < {self.classes_share:g} x source "
                f"{self.source_classes:.1f}"
            )
        if self.entropy < self.entropy_share * self.source_entropy:
            return (
                f"mean entropy {self.entropy:.3f} < {self.entropy_share:g} x source "
                f"{self.source_entropy:.3f}"
            )
        return None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
