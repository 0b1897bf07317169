"""Reduced-precision inference of a segmentation network in PyTorch: what the torch backend and
the on-device adapter's teacher both run.

fp16 and bf16 run the network under `torch.autocast` with its weights and input in
channels_last (the layout tensor cores read); the logits come back in float32, so everything
after them (upsampling, argmax, LSE pooling: the reductions that overflow in fp16) runs in fp32.
The weights stay fp32: autocast casts them per call (its weight cache off, as CUDA graph
capture needs, so a graph reads the live weights every replay).

On the CPU the torch backend runs fp32 and bf16 (oneDNN); fp16 is refused there (CPU fp16
autocast is slow and not every op has it). bf16 on CUDA needs a GPU that computes in bf16
(Ampere or newer): elsewhere autocast would silently run fp32, so it is refused.

`graph_safe` rebuilds the deployed graph (`DeployModel`) for CUDA graph capture: its in-graph
normalization of uint8 frames builds its mean and std tensors on every call (a host-to-device
copy a graph cannot hold), so here they are buffers on the device, computed the same way.

Imported by torch users only (the torch backend, the adapter): the runtime itself never needs
torch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from adapt_deploy.config import InputConfig
from adapt_deploy.errors import UserError
from adapt_deploy.models.deploy import DeployModel

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 (Ampere or newer), not just emulates it."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # releases without the argument
        return bool(torch.cuda.is_bf16_supported())


def check_precision(precision: str, device: torch.device | str, what: str = "torch") -> None:
    """UserError unless `precision` runs on `device` (see the module docstring)."""
    device = torch.device(device)
    allowed = PRECISIONS.get(device.type)
    if allowed is None:
        raise UserError(f"{what}: expected a 'cpu' or 'cuda' device, got {str(device)!r}")
    if precision not in allowed:
        hint = (
            "; fp16 runs on a CUDA GPU (or use backend 'onnxruntime' with model_fp16.onnx)"
            if precision == "fp16"
            else ""
        )
        raise UserError(
            f"{what}: precision on {device.type}: expected one of {list(allowed)}, "
            f"got {precision!r}{hint}"
        )
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"{what}: {name} does not compute in bf16; use precision 'fp16'")


class LogitsInference(nn.Module):
    """`model`'s logits in float32, computed at `precision` (see the module docstring).

    `model` maps an input batch to a dict with "logits" (DeepLab); this returns
    {"logits": float32 logits}, so it stands in for `model` wherever only logits are read
    (DeployModel, the adapter's teacher). Under fp16/bf16 `model` is converted to channels_last
    in place (its parameter objects stay the same: optimizers and EMA updates still reach them).
    """

    def __init__(self, model: nn.Module, precision: str, device_type: str) -> None:
        super().__init__()
        if precision != "fp32" and precision not in AUTOCAST:
            raise ValueError(f"precision: expected fp32, fp16 or bf16, got {precision!r}")
        self.model = model
        self.precision = precision
        self.dtype = AUTOCAST.get(precision)
        self.device_type = device_type
        if self.dtype is not None:
            model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dtype is None:
            return {"logits": self.model(x)["logits"]}
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False):
            logits = self.model(x)["logits"]
        return {"logits": logits.float()}


class FrameNormalize(nn.Module):
    """RGB uint8 (N, H, W, 3) frames to the network's float32 (N, 3, H, W) input, as
    `data.normalize` does (channel order, then mean and std), with the constants as buffers."""

    def __init__(self, spec: InputConfig) -> None:
        super().__init__()
        self.bgr = spec.color_order == "BGR"
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        return ((x - self.mean) / self.std).contiguous()


def graph_safe(model: DeployModel) -> nn.Module:
    """`model` with the same outputs and nothing a CUDA graph cannot capture: an NHWC graph
    becomes FrameNormalize followed by the NCHW graph of the same network and head (which
    then must not reorder channels again); an NCHW graph already is."""
    if model.graph.layout != "NHWC":
        return model
    rgb = dataclasses.replace(model.spec, color_order="RGB")
    nchw = DeployModel(model.model, rgb, dataclasses.replace(model.graph, layout="NCHW"))
    return nn.Sequential(FrameNormalize(model.spec), nchw)
