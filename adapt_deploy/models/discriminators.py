"""Discriminators: AdaptSegNet's output-space FCDiscriminator and WDA's category-wise MLPs.

Both keep the parameter layout and initialisation of the official code (sujoyp/weak-da-seg,
wasidennis/AdaptSegNet) so that their checkpoints load and their numbers reproduce; the
category-wise discriminators are stored stacked and run as batched matmuls, never a class loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapt_deploy.models.batched_linear import batched_linear


class FCDiscriminator(nn.Module):
    """Output-space discriminator: five 4x4 stride-2 convs, LeakyReLU(0.2) between them.

    Takes the softmax of the (upsampled) segmentation logits, (N, C, H, W), and returns one
    logit per patch, (N, 1, ~H/32, ~W/32). Attribute names match the official checkpoints.
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Patch logits (N, 1, h, w) for class-probability maps (N, C, H, W)."""
        x = probs
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)


class CategoryDiscriminators(nn.Module):
    """WDA's C category-wise discriminators, one MLP in_dim→hidden→ReLU→hidden→ReLU→1 per class.

    The official code keeps C ``nn.Sequential`` (Linear, ReLU, Linear, ReLU, Linear) and loops
    over them; here layer k of all classes is one stacked weight ``weight{k}`` of shape
    (C, in, out) with bias (C, out), and each layer is one batched matmul whose weight gradient
    reuses its memory from step to step on CPU (models/batched_linear.py). Initialisation is
    ``nn.Linear``'s default (uniform ±1/sqrt(fan_in) for weight and bias), as in the official code.
    Input: the attention-pooled features (N, C, in_dim); output: logits (N, C). Run the source and
    target features through one call (concatenated on N) to read the weights once.
    """

    def __init__(self, num_classes: int, in_dim: int = 2048, hidden: int = 2048) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_dim = in_dim
        self.hidden = hidden
        dims = ((in_dim, hidden), (hidden, hidden), (hidden, 1))
        for k, (fan_in, fan_out) in enumerate(dims, start=1):
            self.register_parameter(
                f"weight{k}", nn.Parameter(torch.empty(num_classes, fan_in, fan_out))
            )
            self.register_parameter(f"bias{k}", nn.Parameter(torch.empty(num_classes, fan_out)))
        self.reset_parameters()

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (weight (C, in, out), bias (C, out)) pairs, first layer first."""
        return [(getattr(self, f"weight{k}"), getattr(self, f"bias{k}")) for k in (1, 2, 3)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init per class: weight and bias uniform in ±1/sqrt(fan_in)."""
        for weight, bias in self.layers():
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound)
            bias.uniform_(-bound, bound)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-class logits (N, C) for pooled features (N, C, in_dim)."""
        if pooled.dim() != 3 or pooled.shape[1:] != (self.num_classes, self.in_dim):
            raise ValueError(
                f"expected pooled features (N, {self.num_classes}, {self.in_dim}), "
                f"got {tuple(pooled.shape)}"
            )
        x = pooled.transpose(0, 1)  # (C, N, in): the class is the matmul batch
        layers = self.layers()
        for i, (weight, bias) in enumerate(layers):
            x = batched_linear(x, weight, bias)
            if i < len(layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1).transpose(0, 1)

    def to_sequentials(self) -> nn.ModuleList:
        """The official layout: C ``nn.Sequential`` MLPs holding copies of these weights."""
        models = nn.ModuleList()
        for c in range(self.num_classes):
            mlp = _official_mlp(self.in_dim, self.hidden)
            linears = [m for m in mlp if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for linear, (weight, bias) in zip(linears, self.layers(), strict=True):
                    linear.weight.copy_(weight[c].t())
                    linear.bias.copy_(bias[c])
            models.append(mlp.to(device=self.weight1.device, dtype=self.weight1.dtype))
        return models

    @classmethod
    def from_sequentials(cls, models: Sequence[nn.Module]) -> CategoryDiscriminators:
        """Stack C per-class MLPs (Linear, ReLU, Linear, ReLU, Linear) into one module."""
        linears = [[m for m in mlp.modules() if isinstance(m, nn.Linear)] for mlp in models]
        if not linears or any(len(ls) != 3 for ls in linears):
            raise ValueError("expected per-class MLPs with exactly three nn.Linear layers")
        first = linears[0]
        out = cls(len(models), in_dim=first[0].in_features, hidden=first[0].out_features)
        out.load_official_state_dict(
            {
                f"models.{c}.{2 * k}.{name}": getattr(linear, name)
                for c, ls in enumerate(linears)
                for k, linear in enumerate(ls)
                for name in ("weight", "bias")
            }
        )
        return out.to(device=first[0].weight.device, dtype=first[0].weight.dtype)

    @torch.no_grad()
    def load_official_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weak-da-seg's ``CWDiscriminator`` keys (``[module.]models.{c}.{0,2,4}.*``)."""
        pattern = re.compile(r"^(?:module\.)?models\.(\d+)\.([024])\.(weight|bias)$")
        found: dict[tuple[int, int, str], torch.Tensor] = {}
        for key, value in state.items():
            match = pattern.match(key)
            if match is None:
                raise KeyError(f"unexpected key in a category-discriminator state dict: {key!r}")
            found[int(match[1]), int(match[2]) // 2, match[3]] = value
        expected = {
            (c, k, n) for c in range(self.num_classes) for k in range(3) for n in ("weight", "bias")
        }
        if set(found) != expected:
            missing = sorted(expected - set(found))[:3]
            extra = sorted(set(found) - expected)[:3]
            raise KeyError(f"category-discriminator keys: missing {missing}, unexpected {extra}")
        for k, (weight, bias) in enumerate(self.layers()):
            weight.copy_(torch.stack([found[c, k, "weight"].t() for c in range(self.num_classes)]))
            bias.copy_(torch.stack([found[c, k, "bias"] for c in range(self.num_classes)]))


def _official_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """One class's discriminator exactly as weak-da-seg builds it."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )
