"""A frame's signature: what a DeepLab's first BatchNorm sees, in units of its running statistics.

Per channel of the stem convolution's output, the frame's mean and log standard deviation,

    v = ((μ_frame − μ_run) / σ_run,  log(σ_frame / σ_run))

Weather and lighting move it a lot, scene content less: the condition bank of on-device
adaptation (`tta.bank`) routes frames by it, and the export calibrates home on it
(`export.source_stats`). Distances are root mean squares over the 2·channels values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class SignatureProbe:
    """Frames → signatures (see the module docstring), from a copy of the source model's stem
    convolution and its first BatchNorm's running statistics, so adapting never moves them."""

    def __init__(self, stem: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        assert bn.running_mean is not None and bn.running_var is not None
        self.stem = copy.deepcopy(stem).eval().requires_grad_(False)
        self.mean = bn.running_mean.detach().clone()
        self.var = bn.running_var.detach().clone()
        self.eps = bn.eps

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The signatures (N, 2·channels) float32, on the CPU, of network inputs (N, 3, h, w)."""
        y = self.stem(x).float()
        var, mean = torch.var_mean(y, dim=(2, 3), unbiased=False)
        shift = (mean - self.mean) / (self.var + self.eps).sqrt()
        scale = 0.5 * torch.log((var + self.eps) / (self.var + self.eps))
        return torch.cat([shift, scale], dim=1).cpu()


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference of two signatures."""
    return float((a - b).pow(2).mean().sqrt())
