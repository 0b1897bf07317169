"""The deployed model: a DeepLab with the pre- and post-processing a robot would otherwise do by
hand, the one graph that export, the torch runtime backend and on-device adaptation all run.

`DeployModel` takes camera frames as they come (RGB uint8 NHWC) and normalizes them inside, or,
for NVIDIA's ROS pipelines, float32 NCHW already normalized outside; it returns `labels` (argmax
of the logits upsampled bilinearly with align_corners=True to the input size, as evaluation
does), `presence` (sigmoid of LSE pooling per class, the pseudo-weak label source for on-device
adaptation) and optionally the 1/8-resolution `logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapt_deploy.config import InputConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.ops.pooling import lse_pool

INPUT_NAME = "image"


@dataclass(frozen=True)
class GraphSpec:
    """What the deployed graph takes and returns."""

    layout: str = "NHWC"  # NHWC: RGB uint8 frames, normalized in the graph; NCHW: float32 input
    logits: bool = False  # also output the 1/8-resolution logits
    lse_k: float = 1.0  # k of LSE pooling for `presence`

    @property
    def output_names(self) -> list[str]:
        return ["labels", "presence", *(["logits"] if self.logits else [])]


class DeployModel(nn.Module):
    """DeepLab plus deployment pre- and post-processing: (labels, presence[, logits])."""

    def __init__(self, model: DeepLab, spec: InputConfig, graph: GraphSpec) -> None:
        super().__init__()
        if graph.layout not in ("NHWC", "NCHW"):
            raise ValueError(f"layout must be NHWC or NCHW, got {graph.layout!r}")
        self.model = model.eval()
        self.spec = spec
        self.graph = graph

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph.layout == "NHWC":  # RGB uint8 (N, H, W, 3): the checkpoint's normalization
            # contiguous: eager convs are ~20% slower on the permuted strides (a no-op in ONNX)
            x = normalize(image.permute(0, 3, 1, 2), self.spec).contiguous()
        else:  # float32 (N, 3, H, W), normalized outside in RGB order
            x = image.flip(1) if self.spec.color_order == "BGR" else image
        size = x.shape[-2:]
        logits = self.model(x)["logits"]
        upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        labels = upsampled.argmax(1).to(torch.int32)
        presence = torch.sigmoid(lse_pool(logits, self.graph.lse_k))
        return (labels, presence, logits) if self.graph.logits else (labels, presence)
