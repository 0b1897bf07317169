"""ADVENT (Vu et al., CVPR 2019): entropy minimization, directly or adversarially."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from adapt_deploy.adapt.adaptsegnet import AdaptSegNet
from adapt_deploy.adapt.base import Batch, Losses, Method
from adapt_deploy.adapt.losses import entropy_loss, upsample, weighted_self_information


class AdventMinEnt(Method):
    """Segmentation on source + λ_ent · normalized entropy of the target predictions."""

    name: ClassVar[str] = "advent_minent"
    target_needs: ClassVar[str] = "images"

    def target_losses(self, batch: Batch) -> Losses:
        logits = upsample(self.model(self.input(batch))["logits"], batch["image"].shape[-2:])
        return {"ent": self.config.adapt.lambda_ent * entropy_loss(logits)}


class Advent(AdaptSegNet):
    """AdvEnt: the output-space discriminator sees weighted self-information maps."""

    name: ClassVar[str] = "advent"

    def discriminator_input(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return weighted_self_information(F.softmax(upsample(logits, size), dim=1))


class IntraDomain(Advent):
    """IntraDA's intra-domain stage: AdvEnt from the easy target split, pseudo-labelled by the
    inter-domain model (`adapt-deploy rank`), as the source to the hard split as the target.
    Starts from that model (model.init); selftrain.rank names the rank.json."""

    name: ClassVar[str] = "intrada"
    trains_on_ranked_target: ClassVar[bool] = True
