"""The predicted class map of logits, the one reduction evaluation, overlays and the adapter
share."""

from __future__ import annotations

import torch


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """The class of each pixel of `logits` (N, C, H, W) as (N, H, W) int64: the first maximum
    along C, as `argmax(1)` gives it. `max(1).indices` is the same answer and was about 6x
    faster on a 2-core CPU (torch 2.13, one 19 x 256 x 512 map: 23 ms against 3.9 ms, a one-off
    timing, not a bench/ result), where argmax over a strided dimension is slow."""
    return logits.max(dim=1).indices
