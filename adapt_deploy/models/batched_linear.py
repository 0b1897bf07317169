"""Per-class linear layers as one batched matmul, with a backward that reuses its gradient memory.

Why: the category-wise discriminators at the paper's size have two (19, 2048, 2048) weights, so
every discriminator step produces two 319 MB weight gradients. On CPU a fresh tensor that large
is a new mmap from the C allocator, and its first touch page-faults: on the 2-core CPU machine
that cost several times the arithmetic that fills it (bench/results/components.md). GPUs are
not affected (torch's CUDA allocator keeps freed memory), so there the plain op is used.

``batched_linear`` therefore writes the weight gradient into a ``GradientWorkspace`` kept between
steps and hands it to autograd, which adopts it as ``.grad`` without a copy. Once the caller drops
that gradient (``zero_grad(set_to_none=True)``, what the trainer does), the next backward writes
into the same memory. The workspace is reused only when no other tensor or storage object shares
its memory, so a gradient that somebody still holds (``.grad`` kept for accumulation, a
``torch.autograd.grad`` result) is never overwritten: the workspace then takes fresh memory,
exactly as autograd would. Gradients of gradients (``create_graph=True``), ``torch.compile``,
autocast, ``torch.func`` transforms and forward-mode AD use the plain op.
The cost: that memory stays allocated between steps (2 x 319 MB at the paper's size), also
through the generator half of a training step, where plain autograd would not yet hold it;
``GradientWorkspace.release`` lets it go.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import Tensor

# Up to this many rows per batch entry (M), MKL's bmm is slow for the shapes of the backward,
# and other formulations of the same product are faster: the weight gradient as mul + addcmul,
# the input gradient as (W·gᵀ)ᵀ. bench/components.py times each form at M = 1..4 (the table at
# the end of bench/results/components.md); past 3 rows bmm catches up.
_MAX_THIN_ROWS = 3


def _storage_holders(tensor: Tensor) -> tuple[int, int] | None:
    """(C++ references, Python references) to ``tensor``'s storage; None where torch won't say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = tensor.untyped_storage()
    return int(use_count(storage._cdata)), sys.getrefcount(storage)


# What a tensor whose memory nobody else sees reports, measured the same way: the counts
# include this module's own temporaries, whatever the Python and torch versions make of them.
_UNSHARED = _storage_holders(torch.empty(1))


class GradientWorkspace:
    """Memory for one weight gradient, handed out again once nobody else holds it."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._lock = threading.Lock()  # backward passes may run in several threads
        self.reuses = 0  # how often the memory was handed out again (tests and benchmarks)

    def take(self, like: Tensor) -> Tensor:
        """A tensor shaped like ``like`` to write a gradient into: the kept memory when free."""
        with self._lock:
            buffer = self._buffer
            free = (
                buffer is not None
                and buffer.shape == like.shape
                and buffer.dtype == like.dtype
                and buffer.device == like.device
                and _UNSHARED is not None
                and _storage_holders(buffer) == _UNSHARED
            )
            if free:
                self.reuses += 1
            else:
                buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
                self._buffer = buffer
            # A second tensor on the same memory: autograd adopts it as .grad, the buffer stays.
            return buffer.detach()

    def release(self) -> None:
        """Forget the kept memory (it is freed once no gradient holds it)."""
        self._buffer = None

    def __deepcopy__(self, memo: dict[int, Any]) -> GradientWorkspace:
        """Copies start empty: the memory is a cache, not state."""
        return GradientWorkspace()

    def __getstate__(self) -> dict[str, Any]:
        """Pickles start empty too."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


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


def _workspace_applies(x: Tensor) -> bool:
    """CPU, and none of the modes whose rules the plain op's autograd already knows."""
    return not (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    )


def batched_linear(
    x: Tensor, weight: Tensor, bias: Tensor, workspace: GradientWorkspace | None = None
) -> Tensor:
    """``bias[b] + x[b] @ weight[b]`` for x (B, M, in), weight (B, in, out), bias (B, out).

    With a ``workspace`` the weight gradient of a CPU tensor reuses that workspace's memory
    between steps (see the module doc); otherwise it is a plain ``torch.baddbmm``.
    """
    if workspace is None or not _workspace_applies(x):
        return torch.baddbmm(bias.unsqueeze(1), x, weight)
    return _BatchedLinear.apply(x, weight, bias, workspace)


__all__ = ["GradientWorkspace", "batched_linear"]
