"""What every method is: a loss recipe over the shared DeepLab, source and target batches.

The trainer runs one iteration as the official code does: generator losses on the source batch
(backward), on the target batch (backward) with the discriminators frozen, then the
discriminators' losses on detached outputs (backward), then one step of every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from adapt_deploy.adapt.losses import segmentation_loss
from adapt_deploy.config import ExperimentConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.progress import Reporter

Batch = dict[str, Any]
Losses = dict[str, torch.Tensor]


@dataclass
class RunContext:
    """What the trainer hands a method before the first iteration (`Method.attach`): where the
    run writes, the target train split, the network itself (not its DistributedDataParallel or
    compiled wrapper) and this process's place among the training processes."""

    out: Path
    target: Dataset | None  # the target train split as the method's batches carry it
    network: DeepLab
    start: int  # the first iteration this process runs (a resumed run's saved iteration)
    reporter: Reporter
    primary: bool = True  # rank 0: the one process that writes files
    barrier: Callable[[], None] = lambda: None  # every process waits here for the others


class Method:
    """Source-only training; adaptation methods override the target and discriminator parts."""

    name: ClassVar[str] = "source_only"
    # What the target batches must carry: "" (no target batches), "images", "image_labels"
    # (oracle image-level labels) or "points" (image-level labels and point labels).
    target_needs: ClassVar[str] = ""
    # Whether the source batches must carry image-level labels (category discriminators).
    source_needs_image_labels: ClassVar[bool] = False
    # How source images are drawn: "uniform" (shuffled epochs) or "rare_class" (by class
    # frequency with selftrain.rare_class_temperature; engine/sampling.py).
    source_sampling: ClassVar[str] = "uniform"
    # IntraDA: the labelled batches are the easy target split with its pseudo-labels and the
    # target batches the hard split (selftrain.rank; engine/method_data.py).
    trains_on_ranked_target: ClassVar[bool] = False

    def __init__(self, config: ExperimentConfig, model: DeepLab, device: torch.device) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.discriminators: dict[str, nn.Module] = {}
        # Extra classifiers trained with the segmentation model's SGD at the head lr and saved
        # in its checkpoint under "heads" (LabOR's pixel selector); the model knows none of them.
        self.heads: dict[str, nn.Module] = {}
        self._cache: dict[str, torch.Tensor] = {}
        # channels_last on CUDA (engine/precision.py): the layout of the input batches.
        self.memory_format = torch.contiguous_format

    def input(self, batch: Batch) -> torch.Tensor:
        """The batch's images, normalized as the checkpoint records it, on the device."""
        image = normalize(batch["image"].to(self.device), self.config.input)
        return image.contiguous(memory_format=self.memory_format)

    def source_losses(self, batch: Batch) -> Losses:
        """Weighted generator losses on a labelled batch (the source; the target for oracle)."""
        out = self.model(self.input(batch))
        labels = batch["label"].to(self.device)
        self._remember_source(out, batch, labels)
        return {"seg": segmentation_loss(out["logits"], labels)}

    def _remember_source(self, out: dict[str, torch.Tensor], batch: Batch, labels) -> None:
        """Keep what the discriminator step needs from the source pass (nothing here)."""

    def target_losses(self, batch: Batch) -> Losses:
        """Weighted generator losses on an unlabelled (or weakly labelled) target batch."""
        return {}

    def discriminator_losses(self) -> Losses:
        """The discriminators' losses on detached outputs of this iteration."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam per discriminator, as the official code (betas 0.9, 0.99)."""
        return {
            name: torch.optim.Adam(d.parameters(), lr=self.config.adapt.lr_d, betas=(0.9, 0.99))
            for name, d in self.discriminators.items()
        }

    def attach(self, run: RunContext) -> None:
        """Called once before the first iteration (nothing here; self-training keeps `run`)."""

    def before_iteration(self, iteration: int) -> None:
        """Called before each iteration's batches are used (self-training rounds start here)."""

    def after_step(self, iteration: int) -> None:
        """Called after each iteration's optimizer step (an EMA teacher follows the model)."""

    def extra_state(self) -> dict[str, Any]:
        """State of the method itself (not its modules) that a resumed run must continue from."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned (empty for runs saved without any)."""

    def add_head(self, name: str, module: nn.Module) -> nn.Module:
        """Register an extra classifier trained with the model (moved to the device)."""
        self.heads[name] = module.to(self.device).train()
        return self.heads[name]

    def add_discriminator(self, name: str, module: nn.Module) -> nn.Module:
        """Register a discriminator (moved to the device, in train mode)."""
        self.discriminators[name] = module.to(self.device).train()
        return self.discriminators[name]


class Oracle(Method):
    """The upper bound: segmentation loss on the labelled target train split."""

    name: ClassVar[str] = "oracle"
