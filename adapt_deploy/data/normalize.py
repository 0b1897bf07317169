"""Pixel normalization as a checkpoint records it: channel order, mean and std in 0-255 units."""

from __future__ import annotations

import torch

from adapt_deploy.config import InputConfig


def normalize(images: torch.Tensor, spec: InputConfig) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB → float32 network input: reorder, subtract mean, divide by std."""
    x = images.float()
    if spec.color_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
