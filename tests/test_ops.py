"""LSE pooling and attention pooling: math, gradients, op registrations, compile and ONNX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

import adapt_deploy.ops
from adapt_deploy.ops import (
    attention_pool,
    attention_pool_reference,
    kernel_choice,
    lse_pool,
    lse_pool_reference,
    onnx_translations,
)


def _inputs(
    n: int = 2, c: int = 3, d: int = 4, h: int = 5, w: int = 6, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Seeded (logits, features) with spread-out logits so the softmax is not uniform."""
    gen = torch.Generator().manual_seed(n * 1000 + h * 10 + w)
    logits = (3 * torch.randn(n, c, h, w, generator=gen)).to(dtype)
    features = torch.randn(n, d, h, w, generator=gen).to(dtype)
    return logits, features


def _naive_lse(logits: Tensor, k: float) -> Tensor:
    """Eq. 1 written literally: (1/k) log( mean_hw exp(k A) )."""
    return torch.log(torch.exp(k * logits).mean(dim=(2, 3))) / k


def _naive_attention(logits: Tensor, features: Tensor) -> Tensor:
    """Eq. 3 written literally: per image and class, softmax weights times each position."""
    n, c, _, _ = logits.shape
    out = torch.zeros(n, c, features.shape[1], dtype=logits.dtype)
    for i in range(n):
        for j in range(c):
            weights = torch.exp(logits[i, j]) / torch.exp(logits[i, j]).sum()
            out[i, j] = (weights[None] * features[i]).sum(dim=(1, 2))
    return out


# ------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("k", [1.0, 0.5, 3.0])
def test_lse_reference_matches_naive_formula(k: float) -> None:
    logits, _ = _inputs()
    torch.testing.assert_close(lse_pool_reference(logits, k), _naive_lse(logits, k))
    torch.testing.assert_close(lse_pool(logits, k), _naive_lse(logits, k))


def test_attention_reference_matches_naive_formula() -> None:
    logits, features = _inputs()
    expected = _naive_attention(logits, features)
    torch.testing.assert_close(attention_pool_reference(logits, features), expected)
    torch.testing.assert_close(attention_pool(logits, features), expected)


def test_lse_pool_lies_between_mean_and_max() -> None:
    logits, _ = _inputs()
    pooled = lse_pool(logits)
    assert torch.all(pooled >= logits.mean(dim=(2, 3)) - 1e-12)
    assert torch.all(pooled <= logits.amax(dim=(2, 3)) + 1e-12)


def test_half_lse_pool_is_finite_where_naive_fp16_overflows() -> None:
    logits, features = _inputs(dtype=torch.float32)
    logits = logits + 40.0  # exp(40) ≈ 2e17 > fp16 max 65504
    half = logits.half()
    assert torch.isinf(torch.exp(half)).any()
    pooled = lse_pool(half)
    assert pooled.dtype == torch.float16
    assert torch.isfinite(pooled).all()
    expected = lse_pool_reference(half.double())
    torch.testing.assert_close(pooled.double(), expected, atol=0.05, rtol=1e-3)
    attended = attention_pool(half, features.half())
    assert attended.dtype == torch.float16
    assert torch.isfinite(attended).all()
    expected = attention_pool_reference(half.double(), features.half().double())
    torch.testing.assert_close(attended.double(), expected, atol=5e-3, rtol=5e-3)


def test_backward_of_half_inputs_is_finite() -> None:
    logits, features = _inputs(dtype=torch.float32)
    logits = (logits + 40.0).half().requires_grad_()
    features = features.half().requires_grad_()
    (lse_pool(logits).sum() + attention_pool(logits, features).sum()).backward()
    assert logits.grad is not None and features.grad is not None
    assert torch.isfinite(logits.grad).all() and torch.isfinite(features.grad).all()


# ---------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("k", [1.0, 2.5])
def test_lse_pool_gradcheck(k: float) -> None:
    logits, _ = _inputs(n=2, c=2, h=3, w=4)
    assert torch.autograd.gradcheck(lambda a: lse_pool(a, k), (logits.requires_grad_(),))


def test_attention_pool_gradcheck_both_inputs() -> None:
    logits, features = _inputs(n=2, c=2, d=3, h=3, w=4)
    logits.requires_grad_()
    features.requires_grad_()
    assert torch.autograd.gradcheck(attention_pool, (logits, features))


def test_attention_pool_gradcheck_features_only() -> None:
    """Detached logits take the features-only backward: still exact for any upstream gradient."""
    logits, features = _inputs(n=2, c=2, d=3, h=3, w=4)
    features.requires_grad_()
    assert torch.autograd.gradcheck(lambda f: attention_pool(logits, f), (features,))


def test_attention_pool_gradient_only_for_features_with_detached_logits() -> None:
    """The method's use: logits detached, gradient flows into the features only."""
    logits, features = _inputs()
    features.requires_grad_()
    attention_pool(logits.detach(), features).sum().backward()
    assert features.grad is not None
    # Sum over D of softmax-weighted features: each position gets Σ_c P[c, hw].
    n, c, h, w = logits.shape
    weights = torch.softmax(logits.reshape(n, c, h * w), dim=-1).sum(dim=1).reshape(n, 1, h, w)
    torch.testing.assert_close(features.grad, weights.expand_as(features))


def test_backward_ops_match_autograd_of_reference() -> None:
    logits, features = _inputs()
    grad = torch.randn(logits.shape[0], logits.shape[1], features.shape[1], dtype=logits.dtype)
    a = logits.clone().requires_grad_()
    f = features.clone().requires_grad_()
    expected = torch.autograd.grad(attention_pool_reference(a, f), (a, f), grad)
    actual = torch.ops.adapt_deploy.attention_pool_backward(grad, logits, features)
    torch.testing.assert_close(actual, expected)
    features_only = torch.ops.adapt_deploy.attention_pool_backward_features(grad, logits, features)
    torch.testing.assert_close(features_only, expected[1])
    g = grad[:, :, 0]
    (expected_lse,) = torch.autograd.grad(lse_pool_reference(a, 2.0), (a,), g)
    torch.testing.assert_close(
        torch.ops.adapt_deploy.lse_pool_backward(g, logits, 2.0), expected_lse
    )


# ----------------------------------------------------------------------------- registrations


@pytest.mark.parametrize("name", kernel_choice.OPS)
def test_reference_serves_every_device_so_cuda_only_adds_a_kernel(name: str) -> None:
    qualname = f"adapt_deploy::{name}"
    for key in ("CompositeExplicitAutograd", "Autograd", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), key
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    # CUDA gets the fused kernels' registration exactly when torch has CUDA (cuda_impl.py).
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert cuda == adapt_deploy.ops.cuda_impl.registered()


def test_opcheck_lse_pool() -> None:
    logits, _ = _inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.adapt_deploy.lse_pool, (logits.requires_grad_(), 1.5))
    grad = torch.randn(logits.shape[:2])
    torch.library.opcheck(torch.ops.adapt_deploy.lse_pool_backward, (grad, logits.detach(), 1.5))


def test_opcheck_attention_pool() -> None:
    logits, features = _inputs(dtype=torch.float32)
    args = (logits.requires_grad_(), features.requires_grad_())
    torch.library.opcheck(torch.ops.adapt_deploy.attention_pool, args)
    grad = torch.randn(logits.shape[0], logits.shape[1], features.shape[1])
    torch.library.opcheck(
        torch.ops.adapt_deploy.attention_pool_backward, (grad, logits.detach(), features.detach())
    )
    torch.library.opcheck(
        torch.ops.adapt_deploy.attention_pool_backward_features,
        (grad, logits.detach(), features.detach()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_tensors_give_shapes_and_dtypes(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        logits = torch.empty(7, 19, 65, 129, dtype=dtype)
        features = torch.empty(7, 2048, 65, 129, dtype=dtype)
        pooled = lse_pool(logits)
        attended = attention_pool(logits, features)
    assert (tuple(pooled.shape), pooled.dtype) == ((7, 19), dtype)
    assert (tuple(attended.shape), attended.dtype) == ((7, 19, 2048), dtype)


def test_symbolic_shapes_flow_through_export() -> None:
    class Pool(torch.nn.Module):
        def forward(self, a: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
            return lse_pool(a), attention_pool(a, f)

    n, h, w = torch.export.Dim("n"), torch.export.Dim("h"), torch.export.Dim("w")
    dims = {0: n, 2: h, 3: w}
    program = torch.export.export(
        Pool(), _inputs(dtype=torch.float32), dynamic_shapes={"a": dims, "f": dims}
    )
    out_nodes = next(node for node in program.graph.nodes if node.op == "output").args[0]
    pooled, attended = (node.meta["val"] for node in out_nodes)
    assert isinstance(pooled.shape[0], torch.SymInt)
    assert pooled.shape[1:] == (3,) and attended.shape[1:] == (3, 4)
    assert str(pooled.shape[0]) == str(attended.shape[0])


# ----------------------------------------------------------------------------------- compile


def test_compile_inductor_forward_equals_eager() -> None:
    def pool(a: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        return lse_pool(a, 1.5), attention_pool(a, f)

    compiled = torch.compile(pool, fullgraph=True)
    for shape in [(2, 5, 6), (3, 7, 9)]:
        logits, features = _inputs(shape[0], h=shape[1], w=shape[2], dtype=torch.float32)
        torch.testing.assert_close(compiled(logits, features), pool(logits, features))


def test_compile_forward_and_backward_equal_eager() -> None:
    """aot_eager traces the autograd registration; inductor's C++ build is too slow for CI."""

    def loss(a: Tensor, f: Tensor) -> Tensor:
        return lse_pool(a, 1.5).square().sum() + attention_pool(a, f).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    logits, features = _inputs(dtype=torch.float32)
    grads = []
    for fn in (compiled, loss):
        a = logits.clone().requires_grad_()
        f = features.clone().requires_grad_()
        value = fn(a, f)
        value.backward()
        grads.append((value.detach(), a.grad, f.grad))
    torch.testing.assert_close(grads[0], grads[1])


# -------------------------------------------------------------------------------------- ONNX


class _PoolHead(torch.nn.Module):
    """A small module calling both ops, as the exported model and the trainer will."""

    def forward(self, logits: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return lse_pool(logits), lse_pool(logits, 2.0), attention_pool(logits, features)


_STANDARD_OPS = {
    "Cast",
    "CastLike",
    "Constant",
    "Div",
    "Log",
    "MatMul",
    "Mul",
    "ReduceLogSumExp",
    "ReduceProd",
    "Reshape",
    "Shape",
    "Softmax",
    "Sub",
    "Transpose",
}


@pytest.fixture(scope="module")
def onnx_model() -> object:
    """The _PoolHead exported at 2×16×24 with dynamic N, H and W, via the ready-made table."""
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    assert set(adapt_deploy.ops.ONNX_TRANSLATIONS) == set(onnx_translations())
    n, h, w = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    dims = {0: n, 2: h, 3: w}
    program = torch.onnx.export(
        _PoolHead().eval(),
        _inputs(2, c=5, d=7, h=16, w=24, dtype=torch.float32),
        dynamo=True,
        input_names=["logits", "features"],
        output_names=["lse", "lse_k2", "attention"],
        dynamic_shapes={"logits": dims, "features": dims},
        custom_translation_table=adapt_deploy.ops.ONNX_TRANSLATIONS,
        verbose=False,
    )
    return program.model_proto


def test_onnx_export_uses_only_standard_ops(onnx_model: object) -> None:
    import onnx

    onnx.checker.check_model(onnx_model, full_check=True)
    domains = {node.domain for node in onnx_model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert {imp.domain for imp in onnx_model.opset_import} <= {"", "ai.onnx"}
    assert not onnx_model.functions
    op_types = {node.op_type for node in onnx_model.graph.node}
    assert op_types <= _STANDARD_OPS, op_types - _STANDARD_OPS
    assert {"ReduceLogSumExp", "Softmax", "MatMul"} <= op_types


@pytest.mark.parametrize("size", [(2, 16, 24), (3, 13, 31), (1, 1, 1)])
def test_onnx_runtime_matches_torch_at_any_resolution(
    onnx_model: object, size: tuple[int, int, int]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    logits, features = _inputs(size[0], c=5, d=7, h=size[1], w=size[2], dtype=torch.float32)
    outputs = session.run(None, {"logits": logits.numpy(), "features": features.numpy()})
    expected = _PoolHead()(logits, features)
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    # log(H·W) must follow the runtime size: a uniform map pools to its own value.
    flat = np.full((size[0], 5, size[1], size[2]), 0.25, np.float32)
    lse, lse_k2, _ = session.run(None, {"logits": flat, "features": features.numpy()})
    np.testing.assert_allclose(lse, 0.25, atol=1e-6)
    np.testing.assert_allclose(lse_k2, 0.25, atol=1e-6)


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("logits", "match"),
    [
        (torch.zeros(3, 4, 5), "4-D"),
        (torch.zeros(1, 2, 3, 4, 5), "4-D"),
        (torch.zeros(1, 2, 3, 4, dtype=torch.int64), "floating dtype"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_lse_pool_rejects_bad_logits(logits: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lse_pool(logits)


@pytest.mark.parametrize("k", [0.0, -1.0, math.nan])
def test_lse_pool_rejects_non_positive_k(k: float) -> None:
    with pytest.raises(ValueError, match="k: expected a positive float"):
        lse_pool(torch.zeros(1, 2, 3, 4), k)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.zeros(2, 8, 5, 6), "same N, H, W"),
        (torch.zeros(1, 8, 4, 6), "same N, H, W"),
        (torch.zeros(1, 8, 5, 7), "same N, H, W"),
        (torch.zeros(1, 8, 30), "features: expected a 4-D"),
        (torch.zeros(1, 8, 5, 6, dtype=torch.int32), "features: expected a floating dtype"),
        (torch.zeros(1, 8, 5, 6, dtype=torch.float64), "expected the logits dtype"),
    ],
)
def test_attention_pool_rejects_mismatched_features(features: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention_pool(torch.zeros(1, 3, 5, 6), features)


def test_attention_pool_rejects_bad_logits() -> None:
    with pytest.raises(ValueError, match="logits: expected a 4-D"):
        attention_pool(torch.zeros(3, 5, 6), torch.zeros(1, 8, 5, 6))
