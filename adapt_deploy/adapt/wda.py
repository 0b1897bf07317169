"""Weak-label domain adaptation (Paul et al., ECCV 2020): AdaptSegNet's output-space
discriminator plus, on the target, the weak-label classification loss (Eq. 2), category-wise
discriminators on attention-pooled features (Eq. 3-5) and, with points, point supervision."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adapt_deploy.adapt.adaptsegnet import AdaptSegNet
from adapt_deploy.adapt.base import Batch, Losses
from adapt_deploy.adapt.calibration import SourceCalibratedThresholds
from adapt_deploy.adapt.losses import (
    at_least_fp32,
    category_adversarial_loss,
    category_discriminator_loss,
    point_loss,
    weak_label_loss,
)
from adapt_deploy.adapt.seeded_dropout import IterationDropout
from adapt_deploy.data.weak import pseudo_weak_labels
from adapt_deploy.models.discriminators import CategoryDiscriminators
from adapt_deploy.ops import attention_pool, lse_pool


class WeakLabelAdaptation(AdaptSegNet):
    """UDA: pseudo-weak labels y = [sigmoid(LSE) > T], recomputed online (Eq. 7)."""

    name: ClassVar[str] = "wda_uda"
    target_needs: ClassVar[str] = "images"
    source_needs_image_labels: ClassVar[bool] = True

    def __init__(self, config, model, device) -> None:
        super().__init__(config, model, device)
        self.add_discriminator(
            "category",
            CategoryDiscriminators(model.num_classes, model.feature_dim, config.adapt.cw_hidden),
        )
        self.dropout = IterationDropout(config.adapt.dropout, config.train.seed)
        self.calibration = (
            SourceCalibratedThresholds(model.num_classes, config.adapt.pseudo_threshold)
            if config.adapt.pseudo_calibration == "source"
            else None
        )

    def before_iteration(self, iteration: int) -> None:
        super().before_iteration(iteration)
        self.dropout.reseed(iteration)

    @property
    def d_cat(self) -> nn.Module:
        """The category-wise discriminators (read from the table, which the trainer may wrap)."""
        return self.discriminators["category"]

    def extra_state(self) -> dict[str, Any]:
        """The source calibration's running averages, when it is on."""
        return {} if self.calibration is None else {"calibration": self.calibration.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.calibration is not None and "calibration" in state:
            self.calibration.load_state_dict(state["calibration"])

    def target_weak_labels(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """y_t (N, C): pseudo-weak labels from the detached logits (Eq. 7, or with per-class
        cuts calibrated on the source when adapt.pseudo_calibration is 'source')."""
        lse = lse_pool(at_least_fp32(logits.detach()), self.config.adapt.lse_k)
        if self.calibration is not None:
            return self.calibration.labels(lse)
        return pseudo_weak_labels(lse, self.config.adapt.pseudo_threshold)

    def _remember_source(self, out, batch: Batch, labels) -> None:
        super()._remember_source(out, batch, labels)
        features = out["features"].detach()
        pooled = attention_pool(out["logits"].detach().to(features.dtype), features)
        self._cache["cat_source"] = pooled
        self._cache["y_source"] = batch["image_labels"].to(self.device)
        if self.calibration is not None:
            lse = lse_pool(at_least_fp32(out["logits"].detach()), self.config.adapt.lse_k)
            self.calibration.update(lse, self._cache["y_source"])

    def target_losses(self, batch: Batch) -> Losses:
        a = self.config.adapt
        out = self.model(self.input(batch))
        logits = out["logits"]
        y = self.target_weak_labels(batch, logits)
        losses = self.adversarial(logits, batch)
        lse = lse_pool(self.dropout(at_least_fp32(logits)), a.lse_k)  # fp32: a C x HW map
        losses["weak"] = a.lambda_weak * weak_label_loss(lse, y)
        # Official detach semantics: the attention comes from detached logits, the gradient
        # flows into the target features.
        # (Under autocast both are in the low type; the pooling accumulates in fp32.)
        features = out["features"]
        pooled = attention_pool(logits.detach().to(features.dtype), features)
        self._cache["cat_target"], self._cache["y_target"] = pooled.detach(), y
        losses["cat_adv"] = a.lambda_cw * category_adversarial_loss(self.d_cat(pooled), y, a.gan)
        if "points" in batch:
            points = batch["points"].to(self.device)
            losses["point"] = a.lambda_point * point_loss(logits, points, present=y)
        return losses

    def discriminator_losses(self) -> Losses:
        losses = super().discriminator_losses()
        d_s = self.d_cat(self._cache.pop("cat_source"))
        d_t = self.d_cat(self._cache.pop("cat_target"))
        y_s, y_t = self._cache.pop("y_source"), self._cache.pop("y_target")
        losses["d_cat"] = category_discriminator_loss(d_s, d_t, y_s, y_t, self.config.adapt.gan)
        return losses


class WeakLabelImage(WeakLabelAdaptation):
    """WDA with oracle image-level labels of the target."""

    name: ClassVar[str] = "wda_image"
    target_needs: ClassVar[str] = "image_labels"

    def target_weak_labels(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return batch["image_labels"].to(self.device)


class WeakLabelPoint(WeakLabelImage):
    """WDA with image-level labels and one labelled point per present class."""

    name: ClassVar[str] = "wda_point"
    target_needs: ClassVar[str] = "points"
