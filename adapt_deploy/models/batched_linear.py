"""Per-class linear layers as one batched matmul, with a backward that reuses its gradient memory.

The category-wise discriminators at the paper's size have two (19, 2048, 2048) weights, so every
discriminator step produces two 319 MB weight gradients. ``batched_linear`` writes them into a
``GradientWorkspace`` (gradient_memory.py: kept between steps, reused only when nobody else holds
it) and computes the backward's products in the forms that are fastest on CPU for a few rows per
class. Gradients of gradients (``create_graph=True``), GPUs and the modes of
``gradient_memory.reuse_applies`` use the plain op. The cost: 2 x 319 MB stay allocated between
steps, also through the generator half of a training step, where plain autograd would not yet
hold them; ``GradientWorkspace.release`` lets them go.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adapt_deploy.gradient_memory import GradientWorkspace, reuse_applies

# Up to this many rows per batch entry (M), MKL's bmm is slow for the shapes of the backward,
# and other formulations of the same product are faster: the weight gradient as mul + addcmul,
# the input gradient as (W·gᵀ)ᵀ. bench/components.py times each form at M = 1..4 (the table at
# the end of bench/results/components.md); past 3 rows bmm catches up.
_MAX_THIN_ROWS = 3


def _weight_gradient(x: Tensor, grad: Tensor, out: Tensor) -> Tensor:
    """out[b] = x[b]ᵀ grad[b] for x (B, M, in), grad (B, M, out), written into ``out``."""
    rows = x.shape[1]
    if rows == 0:
        return out.zero_()
    if rows > _MAX_THIN_ROWS:
        return torch.bmm(x.transpose(1, 2), grad, out=out)
    torch.mul(x[:, 0, :, None], grad[:, 0, None, :], out=out)
    for m in range(1, rows):
        out.addcmul_(x[:, m, :, None], grad[:, m, None, :])
    return out


def _input_gradient(grad: Tensor, weight: Tensor) -> Tensor:
    """grad[b] @ weight[b]ᵀ for grad (B, M, out), weight (B, in, out)."""
    if grad.shape[1] > _MAX_THIN_ROWS:
        return torch.bmm(grad, weight.transpose(1, 2))
    return torch.bmm(weight, grad.transpose(1, 2)).transpose(1, 2)


class _BatchedLinear(torch.autograd.Function):
    """bias + x @ weight per batch entry; the weight gradient goes into a workspace."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, workspace: GradientWorkspace
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.workspace = workspace
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = _input_gradient(grad, weight)
        if need_weight:
            if torch.is_grad_enabled():  # create_graph: stay differentiable
                grad_weight = torch.bmm(x.transpose(1, 2), grad)
            else:
                grad_weight = _weight_gradient(x, grad, ctx.workspace.take(weight))
        if need_bias:
            grad_bias = grad.sum(dim=1)
        return grad_x, grad_weight, grad_bias, None


def batched_linear(
    x: Tensor, weight: Tensor, bias: Tensor, workspace: GradientWorkspace | None = None
) -> Tensor:
    """``bias[b] + x[b] @ weight[b]`` for x (B, M, in), weight (B, in, out), bias (B, out).

    With a ``workspace`` the weight gradient of a CPU tensor reuses that workspace's memory
    between steps (see the module doc); otherwise it is a plain ``torch.baddbmm``.
    """
    if workspace is None or not reuse_applies(x):
        return torch.baddbmm(bias.unsqueeze(1), x, weight)
    return _BatchedLinear.apply(x, weight, bias, workspace)


__all__ = ["batched_linear"]
