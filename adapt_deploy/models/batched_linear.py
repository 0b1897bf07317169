"""Per-class linear layers as one batched matmul; on CPU the backward reuses its gradient memory.

The category-wise discriminators at the paper's size have two (19, 2048, 2048) weights, so every
discriminator step produces two 319 MB weight gradients. On CPU ``batched_linear``'s backward
writes them into ``gradient_memory.reusable_gradient`` (kept between steps, reused only when
nobody else holds it) and computes the backward's products in the forms that are fastest on CPU
for a few rows per class. GPUs, torch.compile, autocast, torch.func and forward-mode AD use the
plain op, whose rules only it follows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adapt_deploy.gradient_memory import reusable_gradient

# Up to this many rows per batch entry (M), MKL's bmm is slow for the shapes of the backward,
# and other formulations of the same product are faster: the weight gradient as mul + addcmul,
# the input gradient as (W·gᵀ)ᵀ. bench/components.py times each form at M = 1..4 (the table at
# the end of bench/results/components.md); past 3 rows bmm catches up.
_MAX_THIN_ROWS = 3


def _weight_gradient(x: Tensor, grad: Tensor, out: Tensor | None) -> Tensor:
    """x[b]ᵀ grad[b] for x (B, M, in), grad (B, M, out), written into ``out`` when given."""
    rows = x.shape[1]
    if not 0 < rows <= _MAX_THIN_ROWS:
        return torch.bmm(x.transpose(1, 2), grad, out=out)
    out = torch.mul(x[:, 0, :, None], grad[:, 0, None, :], out=out)
    for m in range(1, rows):
        out.addcmul_(x[:, m, :, None], grad[:, m, None, :])
    return out


def _input_gradient(grad: Tensor, weight: Tensor) -> Tensor:
    """grad[b] @ weight[b]ᵀ for grad (B, M, out), weight (B, in, out)."""
    if grad.shape[1] > _MAX_THIN_ROWS:
        return torch.bmm(grad, weight.transpose(1, 2))
    return torch.bmm(weight, grad.transpose(1, 2)).transpose(1, 2)


class _BatchedLinear(torch.autograd.Function):
    """bias + x @ weight per batch entry; the weight gradient goes into reusable memory."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = _input_gradient(grad, weight)
        if need_weight:  # under create_graph no reusable memory: the plain, differentiable ops
            grad_weight = _weight_gradient(x, grad, reusable_gradient(weight))
        if need_bias:
            grad_bias = grad.sum(dim=1)
        return grad_x, grad_weight, grad_bias


def _plain_op_only(x: Tensor) -> bool:
    """Not CPU, or a mode (compile, autocast, torch.func, forward-mode AD) that only plain ops
    follow."""
    return (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    )


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``bias[b] + x[b] @ weight[b]`` for x (B, M, in), weight (B, in, out), bias (B, out).

    On CPU the weight gradient reuses its memory between steps (see the module doc);
    elsewhere it is a plain ``torch.baddbmm``.
    """
    if _plain_op_only(x):
        return torch.baddbmm(bias.unsqueeze(1), x, weight)
    return _BatchedLinear.apply(x, weight, bias)


__all__ = ["batched_linear"]
