"""batched_linear: exact gradients, and weight-gradient memory reused only when nobody holds it."""

from __future__ import annotations

import threading

import pytest
import torch

from adapt_deploy.models.batched_linear import batched_linear
from adapt_deploy.models.discriminators import CategoryDiscriminators


def inputs(rows: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """x (B, M, in), weight (B, in, out), bias (B, out), all requiring grad."""
    g = torch.Generator().manual_seed(rows)
    shapes = ((3, rows, 5), (3, 5, 4), (3, 4))
    return tuple(torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 6])  # the thin-row formulations and plain bmm
def test_gradients_match_finite_differences(rows: int) -> None:
    x, weight, bias = inputs(rows)
    assert torch.autograd.gradcheck(batched_linear, (x, weight, bias))
    assert torch.autograd.gradgradcheck(batched_linear, (x, weight, bias))


@pytest.mark.parametrize("rows", [1, 2, 6])
def test_equals_baddbmm_forward_and_backward(rows: int) -> None:
    x, weight, bias = inputs(rows, torch.float32)
    out = batched_linear(x, weight, bias)
    expected = torch.baddbmm(bias.unsqueeze(1), x, weight)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), upstream)
    want = torch.autograd.grad(expected, (x, weight, bias), upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def backward_once(weight: torch.Tensor, bias: torch.Tensor, seed: int) -> torch.Tensor:
    """One backward of sum(batched_linear) for a fresh x; returns the expected weight gradient."""
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(seed), dtype=weight.dtype)
    batched_linear(x, weight, bias).sum().backward()
    return torch.bmm(x.transpose(1, 2), torch.ones(3, 2, 4, dtype=weight.dtype))


def test_memory_is_reused_once_the_gradient_is_dropped() -> None:
    _, weight, bias = inputs(2)
    backward_once(weight, bias, seed=0)
    first_memory = weight.grad.data_ptr()
    weight.grad = None  # zero_grad(set_to_none=True)
    expected = backward_once(weight, bias, seed=1)
    assert weight.grad.data_ptr() == first_memory  # adopted by autograd, no copy
    torch.testing.assert_close(weight.grad, expected)


def test_a_gradient_still_held_is_never_overwritten() -> None:
    _, weight, bias = inputs(2)
    first = backward_once(weight, bias, seed=0)
    kept = weight.grad
    weight.grad = None
    second = backward_once(weight, bias, seed=1)
    assert weight.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, first)
    torch.testing.assert_close(weight.grad, second)


def test_gradients_accumulate_when_not_cleared() -> None:
    _, weight, bias = inputs(2)
    first = backward_once(weight, bias, seed=0)
    second = backward_once(weight, bias, seed=1)
    torch.testing.assert_close(weight.grad, first + second)
    third = backward_once(weight, bias, seed=2)
    torch.testing.assert_close(weight.grad, first + second + third)


def test_autograd_grad_results_survive_later_backwards() -> None:
    x, weight, bias = inputs(2)
    (kept,) = torch.autograd.grad(batched_linear(x, weight, bias).sum(), weight)
    expected = kept.clone()
    (again,) = torch.autograd.grad(batched_linear(x * 2, weight, bias).sum(), weight)
    torch.testing.assert_close(kept, expected)
    torch.testing.assert_close(again, 2 * expected)


def test_a_storage_object_still_held_is_never_overwritten() -> None:
    _, weight, bias = inputs(2)
    first = backward_once(weight, bias, seed=0)
    kept = weight.grad.untyped_storage()  # a Python storage object, no tensor
    weight.grad = None
    backward_once(weight, bias, seed=1)
    view = torch.empty(0, dtype=first.dtype).set_(kept, 0, first.shape)
    torch.testing.assert_close(view, first)


def test_float32_and_float64_gradients_keep_their_dtype() -> None:
    _, weight, bias = inputs(1)
    backward_once(weight, bias, seed=0)
    weight32 = weight.detach().float().requires_grad_(True)
    bias32 = bias.detach().float().requires_grad_(True)
    expected = backward_once(weight32, bias32, seed=1)
    assert weight32.grad.dtype == torch.float32
    torch.testing.assert_close(weight32.grad, expected)


def test_discriminator_weight_gradients_reuse_their_memory() -> None:
    d = CategoryDiscriminators(num_classes=3, in_dim=6, hidden=6)  # two layers of one shape
    d(torch.randn(2, 3, 6)).sum().backward()
    memory = {d.weight1.grad.data_ptr(), d.weight2.grad.data_ptr()}
    assert len(memory) == 2
    d.zero_grad(set_to_none=True)
    d(torch.randn(2, 3, 6)).sum().backward()
    assert {d.weight1.grad.data_ptr(), d.weight2.grad.data_ptr()} == memory
    held = [d.weight1.grad, d.weight2.grad]
    d.zero_grad(set_to_none=True)
    expected = [g.clone() for g in held]
    d(torch.randn(2, 3, 6)).sum().backward()
    for g, e in zip(held, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert not {d.weight1.grad.data_ptr(), d.weight2.grad.data_ptr()} & memory
    assert set(d.state_dict()) == {f"{n}{k}" for n in ("weight", "bias") for k in (1, 2, 3)}


def test_compiled_discriminator_matches_eager() -> None:
    torch.manual_seed(0)
    d = CategoryDiscriminators(num_classes=3, in_dim=6, hidden=5)
    x = torch.randn(2, 3, 6)
    compiled = torch.compile(d, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    compiled_grad = d.weight2.grad.clone()
    d.zero_grad(set_to_none=True)
    d(x).sum().backward()
    torch.testing.assert_close(compiled_grad, d.weight2.grad)


def test_autocast_gives_the_plain_ops_result() -> None:
    x, weight, bias = inputs(2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batched_linear(x, weight, bias)
        expected = torch.baddbmm(bias.unsqueeze(1), x, weight)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_concurrent_backwards_never_share_memory() -> None:
    x, weight, bias = inputs(2)
    (expected,) = torch.autograd.grad(torch.baddbmm(bias.unsqueeze(1), x, weight).sum(), weight)
    wrong: list[int] = []

    def worker() -> None:
        for _ in range(300):
            (got,) = torch.autograd.grad(batched_linear(x, weight, bias).sum(), weight)
            if not torch.equal(got, expected):
                wrong.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_functional_transforms_and_forward_mode_use_the_plain_op() -> None:
    x, weight, bias = inputs(2)
    loss = lambda w: batched_linear(x, w, bias).sum()  # noqa: E731
    got = torch.func.grad(loss)(weight)
    torch.testing.assert_close(got, torch.autograd.grad(loss(weight), weight)[0])
    tangent = torch.randn_like(weight)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight.detach(), tangent)
        out = batched_linear(x.detach(), dual, bias.detach())
        jvp = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, torch.bmm(x.detach(), tangent))


def test_other_devices_keep_the_plain_op() -> None:
    x = torch.randn(3, 2, 5, device="meta")
    weight = torch.randn(3, 5, 4, device="meta", requires_grad=True)
    bias = torch.randn(3, 4, device="meta", requires_grad=True)
    batched_linear(x, weight, bias).sum().backward()
    assert weight.grad.shape == weight.shape and weight.grad.device.type == "meta"
