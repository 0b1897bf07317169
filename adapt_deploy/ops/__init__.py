"""Pooling ops of the weak-label method as ``torch.library`` ops (``adapt_deploy::*``).

On CUDA tensors they run fused CUDA kernels where available (``kernels.py`` chooses, once per
process; ``ADAPT_DEPLOY_KERNELS=auto|off|require``); elsewhere the PyTorch reference.

``ONNX_TRANSLATIONS`` (same as ``onnx_translations()``) is resolved on first access so that
importing the ops does not import onnxscript, which only ONNX export needs.
"""

from typing import Any

from adapt_deploy.ops.cuda_impl import register_cuda_kernels
from adapt_deploy.ops.kernels import KernelStatus, kernel_status
from adapt_deploy.ops.pooling import (
    attention_pool,
    attention_pool_reference,
    lse_pool,
    lse_pool_reference,
    onnx_translations,
)

__all__ = [
    "ONNX_TRANSLATIONS",
    "KernelStatus",
    "attention_pool",
    "attention_pool_reference",
    "kernel_status",
    "lse_pool",
    "lse_pool_reference",
    "onnx_translations",
]

register_cuda_kernels()  # no-op without CUDA support in torch


def __getattr__(name: str) -> Any:
    """Build ``ONNX_TRANSLATIONS`` on first access (it needs onnxscript)."""
    if name == "ONNX_TRANSLATIONS":
        table = onnx_translations()
        globals()["ONNX_TRANSLATIONS"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
