"""Multi-source adaptation (MADAN, Zhao et al., NeurIPS 2019, its output-space part): several
labelled sources (data.sources), each with its own output-space discriminator against the
target, plus one on all sources together; the generator makes target outputs look like every
source's. Pixel-level alignment is the data's job here: FDA (data.fda_beta) or CycleGAN-
translated sources given as data.sources roots."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from adapt_deploy.adapt.base import Batch, Losses, Method
from adapt_deploy.adapt.losses import (
    SOURCE_LABEL,
    adversarial_loss,
    class_masked_segmentation_loss,
    discriminator_loss,
    upsample,
)
from adapt_deploy.models.discriminators import FCDiscriminator

AGGREGATE = "all"  # the discriminator of all sources together against the target


def source_discriminator(source: int) -> str:
    """The name of source `source`'s discriminator (its entry in the trainer state)."""
    return f"source{source}"


class MultiSource(Method):
    """Per source: segmentation loss over the classes it labels (batch["classes"]). Per
    source s a discriminator D_s (source s vs target) and D_all (every source vs target); the
    generator's loss on the target is λ_adv times their mean. A discriminator steps only in
    iterations whose batch holds its source's images (under data.source_mixing alternate, one
    source's)."""

    name: ClassVar[str] = "multisource"
    target_needs: ClassVar[str] = "images"

    def __init__(self, config, model, device) -> None:
        super().__init__(config, model, device)
        self.num_sources = len(config.data.sources)
        for s in range(self.num_sources):
            self.add_discriminator(
                source_discriminator(s), FCDiscriminator(model.num_classes, config.adapt.ndf)
            )
        self.add_discriminator(AGGREGATE, FCDiscriminator(model.num_classes, config.adapt.ndf))

    def source_losses(self, batch: Batch) -> Losses:
        """Class-masked segmentation loss; keeps each source's detached softmax for its D."""
        out = self.model(self.input(batch))
        labels = batch["label"].to(self.device)
        classes = batch["classes"].to(self.device)
        probs = F.softmax(upsample(out["logits"].detach(), labels.shape[-2:]), dim=1)
        self._cache[AGGREGATE] = probs
        sources = torch.as_tensor(batch["source"], device=self.device)
        for s in sorted(set(sources.tolist())):
            self._cache[source_discriminator(s)] = probs[sources == s]
        return {"seg": class_masked_segmentation_loss(out["logits"], labels, classes)}

    def target_losses(self, batch: Batch) -> Losses:
        """λ_adv · the mean over every discriminator of its adversarial loss on the target."""
        out = self.model(self.input(batch))
        probs = F.softmax(upsample(out["logits"], batch["image"].shape[-2:]), dim=1)
        self._cache["target"] = probs.detach()
        gan = self.config.adapt.gan
        terms = [
            adversarial_loss(d(probs), SOURCE_LABEL, gan) for d in self.discriminators.values()
        ]
        return {"adv": self.config.adapt.lambda_adv * torch.stack(terms).mean()}

    def discriminator_losses(self) -> Losses:
        """Each discriminator whose source is in this iteration's batch: source vs target."""
        target = self._cache.pop("target")
        losses = {}
        for name, d in self.discriminators.items():
            source = self._cache.pop(name, None)
            if source is not None:
                losses[f"d_{name}"] = discriminator_loss(
                    d(source), d(target), self.config.adapt.gan
                )
        return losses
