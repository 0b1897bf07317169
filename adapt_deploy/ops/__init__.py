"""Pooling ops of the weak-label method as ``torch.library`` ops (``adapt_deploy::*``).

``ONNX_TRANSLATIONS`` (same as ``onnx_translations()``) is resolved on first access so that
importing the ops does not import onnxscript, which only ONNX export needs.
"""

from typing import Any

from adapt_deploy.ops.pooling import (
    attention_pool,
    attention_pool_reference,
    lse_pool,
    lse_pool_reference,
    onnx_translations,
)

__all__ = [
    "ONNX_TRANSLATIONS",
    "attention_pool",
    "attention_pool_reference",
    "lse_pool",
    "lse_pool_reference",
    "onnx_translations",
]


def __getattr__(name: str) -> Any:
    """Build ``ONNX_TRANSLATIONS`` on first access (it needs onnxscript)."""
    if name == "ONNX_TRANSLATIONS":
        table = onnx_translations()
        globals()["ONNX_TRANSLATIONS"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
