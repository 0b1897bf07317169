"""CUDA implementations of the five pooling ops: the fused kernels where they apply.

``register_cuda_kernels`` adds them to the ``adapt_deploy::`` ops (``register_kernel("cuda")``)
when torch is built with CUDA; the reference stays the CompositeExplicitAutograd implementation,
so autograd, fake tensors, torch.compile and ONNX export see the same ops. Each call asks
``kernels.use_fused(op, dtype)`` (the mode, the measured winners, the kernels loaded once per
process; see kernels.py) and falls back to the reference for what the kernels do not take
(other dtypes, empty tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adapt_deploy.ops import kernels
from adapt_deploy.ops.pooling import (
    _attention_pool_backward_reference,
    _grad_features_only,
    _lse_pool_backward_reference,
    attention_pool_reference,
    lse_pool_reference,
)

FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
_registered = False


def _fused(op: str, *tensors: Tensor) -> bool:
    """Whether ``op``'s fused kernel takes these tensors (kernels.use_fused decides the rest)."""
    supported = all(t.dtype in FUSED_DTYPES and t.numel() > 0 for t in tensors)
    return supported and kernels.use_fused(op, tensors[0].dtype)


def _lse_pool_cuda(logits: Tensor, k: float) -> Tensor:
    if _fused("lse_pool", logits):
        return torch.ops.adapt_deploy_kernels.lse_pool(logits.contiguous(), k)
    return lse_pool_reference(logits, k)


def _lse_pool_backward_cuda(grad: Tensor, logits: Tensor, k: float) -> Tensor:
    if _fused("lse_pool_backward", grad, logits):
        return torch.ops.adapt_deploy_kernels.lse_pool_backward(
            grad.contiguous(), logits.contiguous(), k
        )
    return _lse_pool_backward_reference(grad, logits, k)


def _attention_pool_cuda(logits: Tensor, features: Tensor) -> Tensor:
    if _fused("attention_pool", logits, features):
        return torch.ops.adapt_deploy_kernels.attention_pool(
            logits.contiguous(), features.contiguous()
        )
    return attention_pool_reference(logits, features)


def _attention_pool_backward_cuda(
    grad: Tensor, logits: Tensor, features: Tensor
) -> tuple[Tensor, Tensor]:
    if _fused("attention_pool_backward", grad, logits, features):
        return torch.ops.adapt_deploy_kernels.attention_pool_backward(
            grad.contiguous(), logits.contiguous(), features.contiguous()
        )
    return _attention_pool_backward_reference(grad, logits, features)


def _attention_pool_backward_features_cuda(
    grad: Tensor, logits: Tensor, features: Tensor
) -> Tensor:
    """dF alone; the features give only the shape, so they are never made contiguous."""
    if _fused("attention_pool_backward_features", grad, logits, features):
        return torch.ops.adapt_deploy_kernels.attention_pool_backward_features(
            grad.contiguous(), logits.contiguous(), features
        )
    return _grad_features_only(grad, logits, features)


_IMPLEMENTATIONS = {
    "adapt_deploy::lse_pool": _lse_pool_cuda,
    "adapt_deploy::lse_pool_backward": _lse_pool_backward_cuda,
    "adapt_deploy::attention_pool": _attention_pool_cuda,
    "adapt_deploy::attention_pool_backward": _attention_pool_backward_cuda,
    "adapt_deploy::attention_pool_backward_features": _attention_pool_backward_features_cuda,
}


def register_cuda_kernels() -> bool:
    """Register the CUDA implementations once, if torch has CUDA; returns whether they are."""
    global _registered
    if _registered or torch.version.cuda is None or torch.version.hip is not None:
        return _registered
    for name, function in _IMPLEMENTATIONS.items():
        torch.library.register_kernel(name, "cuda", function)
    _registered = True
    return True


def registered() -> bool:
    """Whether the CUDA implementations are registered in this process."""
    return _registered
