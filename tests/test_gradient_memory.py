"""gradient_memory: the private torch call it relies on still says who holds a tensor's memory.

These tests fail, not skip, on a torch whose ``torch._C._storage_Use_Count`` is gone or counts
differently: gradient memory would then be reused while still held (wrong gradients) or never
(the CPU discriminator step slows down again). Fix ``gradient_memory._holders`` or remove the
module (its users then allocate as autograd does: pass None as ``out``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adapt_deploy import gradient_memory
from adapt_deploy.gradient_memory import reusable_gradient


def take(like: torch.Tensor) -> torch.Tensor:
    """reusable_gradient as a backward calls it (grad mode off); never None on CPU here."""
    with torch.no_grad():
        out = reusable_gradient(like)
    assert out is not None, "gradient_memory no longer reuses anything on this torch"
    return out


def test_torch_still_has_the_private_storage_use_count() -> None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    assert callable(use_count), (
        f"torch {torch.__version__} has no torch._C._storage_Use_Count: "
        "adapt_deploy/gradient_memory.py cannot tell held memory from free memory"
    )
    t = torch.empty(3)
    alone = use_count(t.untyped_storage()._cdata)
    view = t[1:]
    assert use_count(t.untyped_storage()._cdata) == alone + 1, "a view no longer counts"
    del view
    assert use_count(t.untyped_storage()._cdata) == alone
    assert gradient_memory._UNSHARED is not None


def test_free_memory_is_handed_out_again() -> None:
    like = torch.empty(2, 3, 7)
    first = take(like)
    memory = first.data_ptr()
    del first
    assert take(like).data_ptr() == memory


@pytest.mark.parametrize(
    "hold",
    [
        lambda t: t,  # the tensor itself: a .grad, a torch.autograd.grad result
        lambda t: t[1:],  # a view of it
        lambda t: t.untyped_storage(),  # its storage object alone
    ],
    ids=["tensor", "view", "storage"],
)
def test_held_memory_is_handed_out_only_once_dropped(
    hold: Callable[[torch.Tensor], object],
) -> None:
    like = torch.empty(2, 3, 11)
    first = take(like)
    memory = first.data_ptr()
    held = hold(first)
    del first
    assert take(like).data_ptr() != memory
    del held
    assert take(like).data_ptr() == memory


def test_only_a_few_buffers_are_kept_per_shape() -> None:
    like = torch.empty(5, 13)
    held = [take(like) for _ in range(3 * gradient_memory._KEEP)]
    assert len({t.data_ptr() for t in held}) == len(held)
    assert len(gradient_memory._kept[like.shape, like.dtype]) == gradient_memory._KEEP


def test_no_reuse_where_it_does_not_apply() -> None:
    like = torch.empty(2, 3)
    assert reusable_gradient(like) is None  # grad mode on: create_graph wants plain ops
    with torch.no_grad():
        assert reusable_gradient(torch.empty(2, 3, device="meta")) is None


def test_attention_pool_feature_gradient_reuses_its_memory_only_when_dropped() -> None:
    from adapt_deploy.ops import attention_pool

    g = torch.Generator().manual_seed(0)
    logits, features = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 7, 4, 5, generator=g)
    features.requires_grad_()
    attention_pool(logits, features).sum().backward()  # detached logits: features-only backward
    first, kept = features.grad.data_ptr(), features.grad.clone()
    features.grad = None
    attention_pool(logits, features).sum().backward()
    assert features.grad.data_ptr() == first
    held = features.grad  # still referenced: the next backward must not write into it
    features.grad = None
    (attention_pool(logits, features) * 2).sum().backward()
    torch.testing.assert_close(held, kept)
    torch.testing.assert_close(features.grad, 2 * kept)
