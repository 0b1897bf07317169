"""The teacher-student parts of DACS (Tranheden et al., WACV 2021) and DAFormer (Hoyer et al.,
CVPR 2022): an EMA teacher that pseudo-labels the target, the confidence weight of its labels
and ClassMix, which pastes half of a source image's classes onto a target image."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapt_deploy.adapt import data_parallel
from adapt_deploy.adapt.losses import at_least_fp32, upsample
from adapt_deploy.labels import IGNORE_INDEX


class EmaTeacher:
    """A frozen copy of the network whose weights follow the student's as an exponential moving
    average: a slowly moving, temporally ensembled model gives steadier pseudo-labels than the
    student itself.

    The teacher always runs in eval mode: dropout off, and BatchNorm normalizing with its
    running statistics (copied from the student at every update), never with the batch's. Its
    pseudo-label for an image then depends on that image alone, not on what else is in the
    batch, on the batch size or on how a batch is split over processes (DAFormer keeps the
    teacher in train mode, so its BN uses the target batch's statistics). With model.freeze_bn
    BN is in eval mode in both networks anyway, so the choice only matters for a trained BN.
    """

    def __init__(self, network: nn.Module, ema: float) -> None:
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.ema = ema

    def alpha(self, step: int) -> float:
        """The EMA weight after the student's `step`-th update: DAFormer's warm-up
        min(1 - 1/(step + 1), ema) averages uniformly over the first steps, so the teacher
        leaves the initial weights at once instead of forgetting them at rate 1 - ema."""
        return min(1.0 - 1.0 / (step + 1), self.ema)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """teacher = alpha * teacher + (1 - alpha) * student for every parameter (`step`: how
        many optimizer steps the student has taken); buffers (BN statistics) are copied."""
        alpha = self.alpha(step)
        teacher = list(self.network.parameters())
        torch._foreach_mul_(teacher, alpha)
        torch._foreach_add_(teacher, list(student.parameters()), alpha=1.0 - alpha)
        for mine, theirs in zip(self.network.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's labels (N, H, W) int64 and their softmax confidence (N, H, W) fp32 on
        normalized `images` (N, 3, H, W), from its logits upsampled to the image size."""
        logits = upsample(at_least_fp32(self.network(images)["logits"]), images.shape[-2:])
        confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
        return labels, confidence

    def state_dict(self) -> dict[str, Any]:
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state)


def confidence_weight(confidence: torch.Tensor, tau: float) -> torch.Tensor:
    """(N,) per image the share of pixels whose confidence (N, H, W) exceeds `tau`: DACS's
    weight of a pseudo-labelled image, low while the teacher is unsure of most of it."""
    return (confidence > tau).flatten(1).float().mean(dim=1)


def class_mix(
    source_image: torch.Tensor,
    source_label: torch.Tensor,
    target_image: torch.Tensor,
    target_label: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix (DACS): paste half of each source image's classes onto the target image of the
    same batch index; returns the mixed images, mixed labels and the pasted mask (N, H, W).

    Images are float (N, 3, H, W), labels int64 (N, H, W) with 255 unlabelled. The source is
    first resized to the target's size (bilinear image, nearest label). Per image, ceil(n / 2)
    of the n classes in its source label are drawn with `generator` (a CPU generator); its
    pixels of those classes come from the source, every other pixel from the target.
    """
    size = target_label.shape[-2:]
    if source_label.shape[-2:] != size:
        source_image = F.interpolate(source_image, size=size, mode="bilinear", align_corners=False)
        source_label = F.interpolate(source_label[:, None].float(), size=size, mode="nearest")
        source_label = source_label[:, 0].long()
    classes = [_labelled_classes(label) for label in source_label]
    # While N processes train, skip the draws the shards before this one take from the same
    # per-iteration generator: each image gets the classes one process would draw for it.
    for count in data_parallel.earlier_shards([len(c) for c in classes]):
        torch.randperm(count, generator=generator)
    pairs = zip(source_label, classes, strict=True)
    mask = torch.stack([_half_of_the_classes(label, c, generator) for label, c in pairs])
    mixed_image = torch.where(mask[:, None], source_image, target_image)
    return mixed_image, torch.where(mask, source_label, target_label), mask


def _labelled_classes(label: torch.Tensor) -> torch.Tensor:
    """The classes present in `label` (H, W), ascending, 255 left out."""
    classes = label.unique()
    return classes[classes != IGNORE_INDEX]


def _half_of_the_classes(
    label: torch.Tensor, classes: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The pixels of ceil(n / 2) classes drawn at random from the n labelled `classes` of
    `label` (H, W)."""
    order = torch.randperm(len(classes), generator=generator).to(classes.device)
    return torch.isin(label, classes[order[: (len(classes) + 1) // 2]])
