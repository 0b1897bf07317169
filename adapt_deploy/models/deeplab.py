"""DeepLab-v2: a dilated ResNet and an ASPP head of summed dilated 3x3 classifiers."""

from __future__ import annotations

import torch
from torch import nn

from adapt_deploy.models.resnet import ResNet

ASPP_DILATIONS = (6, 12, 18, 24)


class ASPPClassifier(nn.Module):
    """Atrous spatial pyramid pooling as DeepLab-v2: per-dilation 3x3 convs to classes, summed.

    `branches_summed=2` reproduces AdaptSegNet/WDA, whose released code returns after the
    second branch; their checkpoints need it. ADVENT and the paper sum all four.
    """

    def __init__(self, in_ch: int, num_classes: int, branches_summed: int = 4) -> None:
        super().__init__()
        if not 1 <= branches_summed <= len(ASPP_DILATIONS):
            raise ValueError(f"branches_summed must be in 1..4, got {branches_summed}")
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, 1, d, d, bias=True) for d in ASPP_DILATIONS
        )
        self.branches_summed = branches_summed
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1 : self.branches_summed]:
            out = out + conv(x)
        return out


class DeepLab(nn.Module):
    """DeepLab-v2 returning `logits` (N, C, H/8, W/8) and layer4 `features` (N, D, H/8, W/8).

    Upsampling to the input size is the caller's. With `freeze_bn` (the field's default when
    starting from ImageNet weights) BatchNorm uses its running statistics and its affine
    parameters are not trained, whatever `train()` says.
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        num_classes: int = 19,
        width: int = 64,
        freeze_bn: bool = True,
        aspp_branches: int = 4,
    ) -> None:
        super().__init__()
        self.backbone = ResNet(backbone, width)
        self.head = ASPPClassifier(self.backbone.out_channels, num_classes, aspp_branches)
        self.num_classes = num_classes
        self.feature_dim = self.backbone.out_channels
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.batchnorms():
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def batchnorms(self) -> list[nn.BatchNorm2d]:
        """Every BatchNorm layer of the network."""
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> DeepLab:
        super().train(mode)
        if self.freeze_bn:
            for m in self.batchnorms():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"logits": self.head(features), "features": features}

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head) trainable parameters: the field trains the head at 10x the lr."""
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        return trainable, [p for p in self.head.parameters() if p.requires_grad]
