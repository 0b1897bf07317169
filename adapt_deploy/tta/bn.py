"""BatchNorm statistics mixed between the source and the test stream, safe at one frame a step.

A deployed engine normalizes with fixed statistics (BN is folded into the convs), so test-time
normalization cannot use each frame's own batch statistics as TENT does. Instead every BN
layer keeps an average of the test frames' statistics (starting from the source's) and
normalizes with

    mean = λ · source_mean + (1 − λ) · test_mean        (the same for the variance)

where λ (`prior`) anchors the network to the statistics it was trained with. While adapting,
the current frame enters the average and the gradient flows through its share, so one frame
(batch size 1) is enough. The n-th frame since the average (re)started weighs 1/n (the
average is the plain mean of the frames) until that falls to `momentum`; later frames weigh
`momentum` each. One frame's statistics are a noisy estimate of its condition's, though on
bench/tta's drive, with the adapter's defaults, every frame weighing 0.5 scores the same 17.6
mIoU (bench/results/tta.md, tta_ablation.md; the averages were chosen when every layer
adapted, see the issue-20 notes). `num_batches_tracked` counts the frames, so the count
travels with the state dict. `deployed_statistics` gives the fixed statistics the runtime
receives.
"""

from __future__ import annotations

import torch
from torch import nn


class MixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are the test-stream average (see the module doc).

    The state dict is a plain BatchNorm2d's: `running_mean` / `running_var` hold the test
    average, the source statistics are non-persistent buffers.
    """

    def __init__(self, bn: nn.BatchNorm2d, prior: float, momentum: float) -> None:
        super().__init__(bn.num_features, bn.eps, affine=True, track_running_stats=True)
        self.load_state_dict(bn.state_dict())
        self.weight.requires_grad_(bn.weight.requires_grad)
        self.bias.requires_grad_(bn.bias.requires_grad)
        self.register_buffer("source_mean", bn.running_mean.detach().clone(), persistent=False)
        self.register_buffer("source_var", bn.running_var.detach().clone(), persistent=False)
        self.prior = prior
        self.test_momentum = momentum
        self.adapting = False  # True: this forward's frame updates the test average
        self.num_batches_tracked.zero_()  # counts the frames in the test average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapting:
            # in fp32 whatever the input's type (bf16 under the student's autocast)
            batch_var, batch_mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
            # the n-th frame weighs 1/n (the mean of the frames so far) until that falls to
            # `test_momentum`: kept on the device, no sync
            m = (1.0 / (self.num_batches_tracked + 1)).clamp(min=self.test_momentum)
            test_mean = self.running_mean + m * (batch_mean - self.running_mean)
            test_var = self.running_var + m * (batch_var - self.running_var)
            with torch.no_grad():
                self.running_mean.copy_(test_mean)
                self.running_var.copy_(test_var)
                self.num_batches_tracked.add_(1)
        else:
            test_mean, test_var = self.running_mean, self.running_var
        mean = self.prior * self.source_mean + (1 - self.prior) * test_mean
        var = self.prior * self.source_var + (1 - self.prior) * test_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def deployed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, var) a fixed-statistics BN must use to equal this layer in eval."""
        mean = self.prior * self.source_mean + (1 - self.prior) * self.running_mean
        var = self.prior * self.source_var + (1 - self.prior) * self.running_var
        return mean.detach().clone(), var.detach().clone()

    def reset_statistics(self) -> None:
        """Forget the test stream: the test average restarts at the source statistics."""
        with torch.no_grad():
            self.running_mean.copy_(self.source_mean)
            self.running_var.copy_(self.source_var)
            self.num_batches_tracked.zero_()

    def restart(self) -> None:
        """The next frame replaces the test average (a shift: the frames so far are stale)."""
        self.num_batches_tracked.zero_()


def mix_batchnorms(model: nn.Module, prior: float, momentum: float) -> list[MixedBatchNorm2d]:
    """Replace every BatchNorm2d of `model` in place by a MixedBatchNorm2d; returns them."""
    mixed = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                layer = MixedBatchNorm2d(child, prior, momentum).to(child.weight.device)
                setattr(parent, name, layer)
                mixed.append(layer)
    return mixed


def set_adapting(layers: list[MixedBatchNorm2d], adapting: bool) -> None:
    """Whether the next forward passes update the test averages."""
    for layer in layers:
        layer.adapting = adapting


def deployed_statistics(layers: dict[str, MixedBatchNorm2d]) -> dict[str, torch.Tensor]:
    """{'<bn>.running_mean' / '<bn>.running_var': tensor} for a plain model's state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        mean, var = layer.deployed()
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean, var
    return out
