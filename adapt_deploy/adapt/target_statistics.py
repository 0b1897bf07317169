"""Self-training methods label the target with the model in eval mode, which normalizes with
BatchNorm's running statistics. When BN trains (model.freeze_bn false), plain training averages
those over source and target passes: statistics of neither domain. With selftrain.bn_stats
"target" the source pass normalizes with its own batch's statistics but leaves the running ones
to the target passes, so the labelling model, the EMA teacher and the saved model normalize a
target image as the target needs (AdaBN's observation, kept up during training).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from adapt_deploy.adapt.base import Batch, Losses
from adapt_deploy.config import ExperimentConfig


class TargetStatistics:
    """Mixin before Method (`class M(TargetStatistics, Method)`): the source pass leaves BN's
    running statistics to the target passes when selftrain.bn_stats is "target"."""

    config: ExperimentConfig
    model: nn.Module

    def source_losses(self, batch: Batch) -> Losses:
        with self.source_pass():
            return super().source_losses(batch)  # type: ignore[misc]

    def source_pass(self) -> AbstractContextManager[None]:
        """The block a source forward pass runs in: one that leaves the running statistics
        alone unless selftrain.bn_stats is "all". A method that writes its own source_losses
        runs its pass in it too."""
        if self.config.selftrain.bn_stats == "all":
            return nullcontext()
        return running_stats_kept(self.model)


@contextmanager
def running_stats_kept(network: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm layers of `network` normalize with the batch's statistics inside
    the block but leave their running statistics as they were (momentum 0 for the block: the
    buffers cannot be put back after the pass, autograd saved them for the backward)."""
    norms = [
        m
        for m in network.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(norms, saved, strict=True):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)
