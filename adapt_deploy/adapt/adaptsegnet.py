"""AdaptSegNet (Tsai et al., CVPR 2018): an output-space discriminator on softmax predictions."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapt_deploy.adapt.base import Batch, Losses, Method
from adapt_deploy.adapt.losses import SOURCE_LABEL, adversarial_loss, discriminator_loss, upsample
from adapt_deploy.models.discriminators import FCDiscriminator


class AdaptSegNet(Method):
    """Segmentation on source + λ_adv · adversarial loss making target outputs look source."""

    name: ClassVar[str] = "adaptsegnet"
    target_needs: ClassVar[str] = "images"

    def __init__(self, config, model, device) -> None:
        super().__init__(config, model, device)
        self.add_discriminator("output", FCDiscriminator(model.num_classes, config.adapt.ndf))

    @property
    def d_out(self) -> nn.Module:
        """The output-space discriminator (read from the table, which the trainer may wrap)."""
        return self.discriminators["output"]

    def discriminator_input(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """What the output-space discriminator sees: softmax of the upsampled logits."""
        return F.softmax(upsample(logits, size), dim=1)

    def _remember_source(self, out, batch: Batch, labels) -> None:
        self._cache["d_source"] = self.discriminator_input(
            out["logits"].detach(), batch["image"].shape[-2:]
        )

    def adversarial(self, logits: torch.Tensor, batch: Batch) -> Losses:
        """λ_adv · the output-space adversarial loss; keeps the detached input for the D step."""
        d_in = self.discriminator_input(logits, batch["image"].shape[-2:])
        self._cache["d_target"] = d_in.detach()
        loss = adversarial_loss(self.d_out(d_in), SOURCE_LABEL, self.config.adapt.gan)
        return {"adv": self.config.adapt.lambda_adv * loss}

    def target_losses(self, batch: Batch) -> Losses:
        out = self.model(self.input(batch))
        return self.adversarial(out["logits"], batch)

    def discriminator_losses(self) -> Losses:
        d_s = self.d_out(self._cache.pop("d_source"))
        d_t = self.d_out(self._cache.pop("d_target"))
        return {"d_out": discriminator_loss(d_s, d_t, self.config.adapt.gan)}
