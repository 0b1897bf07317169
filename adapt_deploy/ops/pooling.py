"""LSE pooling (Eq. 1) and category-wise attention pooling (Eq. 3) as ``torch.library`` ops.

Each op is defined once in the ``adapt_deploy`` namespace with a PyTorch reference registered for
every device (CompositeExplicitAutograd), a fake implementation for symbolic shapes, and an
autograd formula. The backward passes are separate ops (``lse_pool_backward``,
``attention_pool_backward`` and, for detached logits, ``attention_pool_backward_features``) so a
CUDA build only registers kernels for these five names
(``torch.library.register_kernel(..., "cuda", ...)``, see cuda_impl.py) and autograd,
torch.compile and export keep working unchanged. The backward ops have no autograd formula of
their own: double backward is not supported.

ONNX: ``onnx_translations()`` maps the forward ops to onnxscript functions made of standard
ONNX ops only, with every size read from the runtime shape; pass it to
``torch.onnx.export(..., custom_translation_table=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adapt_deploy.gradient_memory import reusable_gradient
from adapt_deploy.ops import kernels as _kernels

__all__ = [
    "attention_pool",
    "attention_pool_reference",
    "lse_pool",
    "lse_pool_reference",
    "onnx_translations",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: fp32 for half types (exp and sums overflow in fp16)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# --------------------------------------------------------------------------------------------
# Reference math (the definition; CUDA kernels must match these)
# --------------------------------------------------------------------------------------------


def lse_pool_reference(logits: Tensor, k: float = 1.0) -> Tensor:
    """Eq. 1 before the sigmoid: (1/k) log mean_hw exp(k A), as a stable logsumexp."""
    n, c, h, w = logits.shape
    x = logits.to(_compute_dtype(logits.dtype)).reshape(n, c, h * w)
    out = (torch.logsumexp(x * k, dim=-1) - math.log(h * w)) / k
    return out.to(logits.dtype)


def attention_pool_reference(logits: Tensor, features: Tensor) -> Tensor:
    """Eq. 3: features averaged over H×W with each class's spatial softmax as weights."""
    n, c, h, w = logits.shape
    d = features.shape[1]
    dtype = _compute_dtype(logits.dtype)
    attn = torch.softmax(logits.to(dtype).reshape(n, c, h * w), dim=-1)  # (N, C, HW)
    feats = features.to(dtype).reshape(n, d, h * w)  # (N, D, HW)
    return torch.bmm(attn, feats.transpose(1, 2)).to(logits.dtype)  # (N, C, D)


def _lse_pool_backward_reference(grad: Tensor, logits: Tensor, k: float) -> Tensor:
    """d(lse_pool)/dA = g · softmax_hw(k A): the closed-form LSE gradient."""
    n, c, h, w = logits.shape
    dtype = _compute_dtype(logits.dtype)
    attn = torch.softmax(logits.to(dtype).reshape(n, c, h * w) * k, dim=-1)
    grad_logits = grad.to(dtype).unsqueeze(-1) * attn
    return grad_logits.reshape(n, c, h, w).to(logits.dtype)


def _attention_and_grad_features(
    grad: Tensor, logits: Tensor, features: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recomputed attention P (N, C, HW) and dF = Pᵀ g summed over classes, (N, D, H, W);
    dF is written into `out` when given (features' shape, the compute dtype)."""
    n, c, h, w = logits.shape
    dtype = _compute_dtype(logits.dtype)
    attn = torch.softmax(logits.to(dtype).reshape(n, c, h * w), dim=-1)
    flat = None if out is None else out.view(n, features.shape[1], h * w)
    grad_features = torch.bmm(grad.to(dtype).transpose(1, 2), attn, out=flat)  # (N, D, HW)
    return attn, grad_features.reshape(features.shape).to(features.dtype)


def _grad_features_only(grad: Tensor, logits: Tensor, features: Tensor) -> Tensor:
    """dF for detached logits. On CPU it is written into memory reused between steps once the
    backbone's backward has dropped it (68 MB per image at the paper's shapes;
    gradient_memory.py)."""
    same_dtype = _compute_dtype(features.dtype) == features.dtype
    out = reusable_gradient(features) if same_dtype else None
    return _attention_and_grad_features(grad, logits, features, out)[1]


def _attention_pool_backward_reference(
    grad: Tensor, logits: Tensor, features: Tensor
) -> tuple[Tensor, Tensor]:
    """Closed-form gradients: dF = Pᵀ g summed over classes, dA = P ⊙ (gF − rowsum(P ⊙ gF))."""
    n, c, h, w = logits.shape
    attn, grad_features = _attention_and_grad_features(grad, logits, features)
    feats = features.to(attn.dtype).reshape(n, features.shape[1], h * w)  # (N, D, HW)
    grad_attn = torch.bmm(grad.to(attn.dtype), feats)  # (N, C, HW): g · F per position
    grad_logits = attn * (grad_attn - (attn * grad_attn).sum(dim=-1, keepdim=True))
    return grad_logits.reshape(n, c, h, w).to(logits.dtype), grad_features


# --------------------------------------------------------------------------------------------
# Op registrations
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("adapt_deploy::lse_pool", mutates_args=(), device_types=None)
def _lse_pool_op(logits: Tensor, k: float) -> Tensor:
    """LSE pooling op; the PyTorch reference serves every device until a kernel is registered."""
    _kernels.note_reference_use()  # the one log line (or require's error) where there is no GPU
    return lse_pool_reference(logits, k)


@_lse_pool_op.register_fake
def _(logits: Tensor, k: float) -> Tensor:
    """(N, C, H, W) -> (N, C) in the input dtype, for any (symbolic) sizes."""
    return logits.new_empty(logits.shape[:2])


@torch.library.custom_op("adapt_deploy::lse_pool_backward", mutates_args=(), device_types=None)
def _lse_pool_backward_op(grad: Tensor, logits: Tensor, k: float) -> Tensor:
    """Gradient of lse_pool w.r.t. the logits; a separate op so a CUDA kernel can replace it."""
    return _lse_pool_backward_reference(grad, logits, k)


@_lse_pool_backward_op.register_fake
def _(grad: Tensor, logits: Tensor, k: float) -> Tensor:
    """Same shape and dtype as the logits."""
    return torch.empty_like(logits)


def _lse_pool_setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
    """Keep the logits and k: the backward recomputes the softmax instead of storing it."""
    logits, k = inputs
    ctx.save_for_backward(logits)
    ctx.k = k


def _lse_pool_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
    """Autograd formula for lse_pool, delegating to the lse_pool_backward op."""
    (logits,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return torch.ops.adapt_deploy.lse_pool_backward(grad, logits, ctx.k), None


_lse_pool_op.register_autograd(_lse_pool_backward, setup_context=_lse_pool_setup_context)


@torch.library.custom_op("adapt_deploy::attention_pool", mutates_args=(), device_types=None)
def _attention_pool_op(logits: Tensor, features: Tensor) -> Tensor:
    """Attention pooling op; the PyTorch reference serves every device until a kernel exists."""
    _kernels.note_reference_use()
    return attention_pool_reference(logits, features)


@_attention_pool_op.register_fake
def _(logits: Tensor, features: Tensor) -> Tensor:
    """(N, C, H, W), (N, D, H, W) -> (N, C, D) in the logits dtype, for any (symbolic) sizes."""
    return logits.new_empty((logits.shape[0], logits.shape[1], features.shape[1]))


@torch.library.custom_op(
    "adapt_deploy::attention_pool_backward", mutates_args=(), device_types=None
)
def _attention_pool_backward_op(
    grad: Tensor, logits: Tensor, features: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of attention_pool w.r.t. (logits, features); one op for one fused kernel."""
    return _attention_pool_backward_reference(grad, logits, features)


@_attention_pool_backward_op.register_fake
def _(grad: Tensor, logits: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Same shapes and dtypes as (logits, features)."""
    return torch.empty_like(logits), torch.empty_like(features)


@torch.library.custom_op(
    "adapt_deploy::attention_pool_backward_features", mutates_args=(), device_types=None
)
def _attention_pool_backward_features_op(grad: Tensor, logits: Tensor, features: Tensor) -> Tensor:
    """dF = Pᵀ g alone, for detached logits (WDA's generator step): no read of F, no dA.
    ``features`` gives the shape; its values are not read."""
    return _grad_features_only(grad, logits, features)


@_attention_pool_backward_features_op.register_fake
def _(grad: Tensor, logits: Tensor, features: Tensor) -> Tensor:
    """Same shape and dtype as the features."""
    return torch.empty_like(features)


def _attention_pool_setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    """Keep both inputs: the backward recomputes the softmax instead of storing (N, C, HW)."""
    logits, features = inputs
    ctx.save_for_backward(logits, features)


def _attention_pool_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Autograd formula for attention_pool, delegating to the attention_pool_backward op."""
    logits, features = ctx.saved_tensors
    if not any(ctx.needs_input_grad):
        return None, None
    if not ctx.needs_input_grad[0]:  # detached attention: dF alone, F is not read
        return None, torch.ops.adapt_deploy.attention_pool_backward_features(grad, logits, features)
    grad_logits, grad_features = torch.ops.adapt_deploy.attention_pool_backward(
        grad, logits, features
    )
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        grad_features if ctx.needs_input_grad[1] else None,
    )


_attention_pool_op.register_autograd(
    _attention_pool_backward, setup_context=_attention_pool_setup_context
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    """Raise ValueError unless ``logits`` is a floating (N, C, H, W) tensor."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4:
        raise ValueError(
            f"{name}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {logits.dtype}")


def lse_pool(logits: Tensor, k: float = 1.0) -> Tensor:
    """Class presence scores before the sigmoid (Eq. 1): (N, C, H, W) logits -> (N, C)."""
    _check_logits(logits)
    if not k > 0:
        raise ValueError(f"k: expected a positive float, got {k!r}")
    return torch.ops.adapt_deploy.lse_pool(logits, float(k))


def attention_pool(logits: Tensor, features: Tensor) -> Tensor:
    """Per-class features (Eq. 3): (N, C, H, W) logits, (N, D, H, W) features -> (N, C, D)."""
    _check_logits(logits)
    _check_logits(features, "features")
    ls, fs = tuple(logits.shape), tuple(features.shape)
    if ls[0] != fs[0] or ls[2:] != fs[2:]:
        raise ValueError(
            f"features: expected the same N, H, W as logits {ls} (N, C, H, W), got {fs}"
        )
    if logits.dtype != features.dtype:
        raise ValueError(
            f"features: expected the logits dtype {logits.dtype}, got {features.dtype}"
        )
    if logits.device != features.device:
        raise ValueError(
            f"features: expected the logits device {logits.device}, got {features.device}"
        )
    return torch.ops.adapt_deploy.attention_pool(logits, features)


# --------------------------------------------------------------------------------------------
# ONNX translations (standard ops only, sizes from the runtime shape)
# --------------------------------------------------------------------------------------------


def onnx_translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export``; imports onnxscript lazily."""
    from onnxscript import opset18 as op  # lazy: only exporting needs onnxscript

    def _to_compute(x: Any) -> Any:
        """Cast half inputs to fp32 (ONNX Runtime's fp16 exp overflows); keep fp32/fp64."""
        dtype = getattr(x, "dtype", None)
        low = {getattr(dtype, "name", None)} & {"FLOAT16", "BFLOAT16"}
        return op.Cast(x, to=1) if low else x  # 1 = TensorProto.FLOAT

    def lse_pool_onnx(logits: Any, k: float = 1.0) -> Any:
        """ReduceLogSumExp over H, W minus log(H·W) read from the runtime shape, divided by k."""
        x = _to_compute(logits)
        if k != 1.0:
            x = op.Mul(x, op.CastLike(op.Constant(value_float=k), x))
        lse = op.ReduceLogSumExp(x, op.Constant(value_ints=[2, 3]), keepdims=0)
        hw = op.ReduceProd(op.Shape(logits, start=2), keepdims=0)
        out = op.Sub(lse, op.Log(op.CastLike(hw, lse)))
        if k != 1.0:
            out = op.Div(out, op.CastLike(op.Constant(value_float=k), out))
        return op.CastLike(out, logits)

    def attention_pool_onnx(logits: Any, features: Any) -> Any:
        """Softmax over the flattened H·W, then MatMul with the (N, HW, D) features."""
        keep_two = op.Constant(value_ints=[0, 0, -1])  # copy N and C/D, flatten H·W
        attn = op.Softmax(op.Reshape(_to_compute(logits), keep_two), axis=-1)  # (N, C, HW)
        feats = op.Transpose(op.Reshape(_to_compute(features), keep_two), perm=[0, 2, 1])
        return op.CastLike(op.MatMul(attn, feats), logits)  # (N, C, D)

    return {
        torch.ops.adapt_deploy.lse_pool.default: lse_pool_onnx,
        torch.ops.adapt_deploy.attention_pool.default: attention_pool_onnx,
    }
