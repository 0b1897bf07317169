"""Teacher-student self-training (DACS, DAFormer's recipe on DeepLab-v2): an EMA teacher
pseudo-labels the target, the student learns them on target images with half of a source
image's classes pasted in (ClassMix), weighted by the teacher's confidence; source images are
drawn by rare-class sampling. The weak variants add what the target's image-level labels and
points tell: pseudo-labels of absent classes are dropped, points overwrite pseudo-labels, and
WDA's weak-label and point losses train the student on the clean target image."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapt_deploy.adapt.base import Batch, Losses, Method
from adapt_deploy.adapt.losses import at_least_fp32, point_loss, pseudo_label_loss, weak_label_loss
from adapt_deploy.adapt.seeded_dropout import IterationDropout
from adapt_deploy.adapt.target_statistics import TargetStatistics
from adapt_deploy.adapt.teacher import EmaTeacher, class_mix, confidence_weight
from adapt_deploy.config import ExperimentConfig
from adapt_deploy.labels import IGNORE_INDEX
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.ops import lse_pool


class SelfTrain(TargetStatistics, Method):
    """DACS / DAFormer self-training without target labels."""

    name: ClassVar[str] = "selftrain"
    target_needs: ClassVar[str] = "images"
    source_sampling: ClassVar[str] = "rare_class"

    def __init__(self, config: ExperimentConfig, model: DeepLab, device: torch.device) -> None:
        super().__init__(config, model, device)
        self.network = model  # the module itself: `self.model` may become a wrapper of it
        self.teacher = EmaTeacher(model, config.selftrain.ema)
        self.generator = torch.Generator()  # ClassMix's draws

    def before_iteration(self, iteration: int) -> None:
        """Seed ClassMix from (seed, iteration): a resumed run, even one stopped mid-iteration,
        draws what the uninterrupted run draws."""
        self.generator.manual_seed(self.config.train.seed * 100_003 + iteration)

    def after_step(self, iteration: int) -> None:
        """The teacher follows the student after its (iteration + 1)-th step."""
        self.teacher.update(self.network, iteration + 1)

    def extra_state(self) -> dict[str, Any]:
        """The teacher's weights (its EMA history cannot be recomputed from the student)."""
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def _remember_source(self, out: dict[str, torch.Tensor], batch: Batch, labels) -> None:
        """Keep the source images (uint8) and labels to paste into this iteration's target."""
        if self.config.selftrain.class_mix:
            self._cache["source_image"], self._cache["source_label"] = batch["image"], labels

    def target_losses(self, batch: Batch) -> Losses:
        """The pseudo-label loss ("pseudo") and the variants' losses on the clean target."""
        image = self.input(batch)
        losses = self.clean_target_losses(batch, image)
        weight = self.config.selftrain.lambda_target
        losses["pseudo"] = weight * self.pseudo_label_loss(batch, image)
        return losses

    def pseudo_label_loss(self, batch: Batch, image: torch.Tensor) -> torch.Tensor:
        """The student's weighted cross-entropy against the teacher's pseudo-labels of the
        target `image` (normalized), on the ClassMix of the source into it when class_mix is
        on: pasted source pixels weigh 1, target pixels their image's share of confident pixels
        (selftrain.weighting image) or 1 when confident themselves, else 0 (pixel)."""
        st = self.config.selftrain
        labels, confidence = self.teacher.pseudo_labels(image)
        if st.weighting == "pixel":
            weight = (confidence > st.confidence).float()
        else:
            weight = confidence_weight(confidence, st.confidence)[:, None, None]
            weight = weight.expand_as(confidence)
        labels, weight = self.refine(batch, labels, weight)
        if st.class_mix:
            source = self._cache.pop("source_image").to(self.device).float()
            target = batch["image"].to(self.device).float()
            mixed, labels, pasted = class_mix(
                source, self._cache.pop("source_label"), target, labels, self.generator
            )
            weight = torch.where(pasted, 1.0, weight)
            image = self.input({"image": mixed})
        return pseudo_label_loss(self.model(image)["logits"], labels, weight)

    def refine(
        self, batch: Batch, labels: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels and their pixel weights corrected by the target's labels (none here)."""
        return labels, weight

    def clean_target_losses(self, batch: Batch, image: torch.Tensor) -> Losses:
        """Losses on the student's prediction of the clean target image (none here)."""
        return {}


class SelfTrainImage(SelfTrain):
    """Self-training with the target's image-level labels: pseudo-labels of classes absent
    from the image are dropped, and WDA's weak-label loss (Eq. 2) trains the student on the
    clean target image."""

    name: ClassVar[str] = "selftrain_image"
    target_needs: ClassVar[str] = "image_labels"

    def __init__(self, config: ExperimentConfig, model: DeepLab, device: torch.device) -> None:
        super().__init__(config, model, device)
        self.dropout = IterationDropout(config.adapt.dropout, config.train.seed)

    def before_iteration(self, iteration: int) -> None:
        super().before_iteration(iteration)
        self.dropout.reseed(iteration)

    def refine(
        self, batch: Batch, labels: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels, weight = super().refine(batch, labels, weight)
        return keep_present(labels, batch["image_labels"].to(self.device)), weight

    def clean_target_losses(self, batch: Batch, image: torch.Tensor) -> Losses:
        return self.weak_losses(batch, self.model(image)["logits"])

    def weak_losses(self, batch: Batch, logits: torch.Tensor) -> Losses:
        """WDA's weak-label loss of the student's clean target logits."""
        a = self.config.adapt
        lse = lse_pool(self.dropout(at_least_fp32(logits)), a.lse_k)  # fp32: a C x HW map
        return {"weak": a.lambda_weak * weak_label_loss(lse, batch["image_labels"].to(lse))}


class SelfTrainPoint(SelfTrainImage):
    """Self-training with image-level labels and one labelled point per present class: points
    overwrite the pseudo-labels (weight 1) and WDA's point loss trains the clean prediction."""

    name: ClassVar[str] = "selftrain_point"
    target_needs: ClassVar[str] = "points"

    def refine(
        self, batch: Batch, labels: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels, weight = with_points(labels, weight, batch["points"].to(self.device))
        return super().refine(batch, labels, weight)

    def weak_losses(self, batch: Batch, logits: torch.Tensor) -> Losses:
        losses = super().weak_losses(batch, logits)
        points, present = batch["points"].to(self.device), batch["image_labels"].to(self.device)
        losses["point"] = self.config.adapt.lambda_point * point_loss(logits, points, present)
        return losses


def keep_present(labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """`labels` (N, H, W) with the pixels of classes absent from the image-level labels
    `present` (N, C) set to 255: the teacher's mistakes the image's labels rule out."""
    labelled = labels != IGNORE_INDEX
    safe = torch.where(labelled, labels, 0)
    kept = labelled & torch.gather(present > 0, 1, safe.flatten(1)).view_as(labels)
    return torch.where(kept, labels, IGNORE_INDEX)


def with_points(
    labels: torch.Tensor, weight: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and weights (N, H, W) with each labelled point of `points` (N, H, W, 255
    off-point) taking the point's class at weight 1."""
    on = points != IGNORE_INDEX
    return torch.where(on, points.long(), labels), torch.where(on, 1.0, weight)
