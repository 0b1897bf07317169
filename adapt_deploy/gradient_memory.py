"""Gradient memory kept between backward passes on CPU, reused only when nobody else holds it.

Why: on CPU a fresh tensor of hundreds of MB is a new mmap from the C allocator, and its first
touch page-faults; on the 2-core CPU machine that costs several times the arithmetic that fills
it (the "fresh tensor" column of bench/results/components.md). A backward that writes a large
gradient into a ``GradientWorkspace`` and hands it to autograd (which adopts it as ``.grad``,
or passes it on and drops it) gets the same memory back next step. The workspace is reused only
when no other tensor or storage object shares its memory, so a gradient that somebody still
holds (``.grad`` kept for accumulation, a ``torch.autograd.grad`` result) is never overwritten:
the workspace then takes fresh memory, exactly as autograd would. GPUs do not need this (torch's
CUDA allocator keeps freed memory), nor do the modes whose rules only plain ops follow
(``reuse_applies``). The cost: the memory stays allocated between steps.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import Tensor


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
    """Memory for one gradient, handed out again once nobody else holds it."""

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


def reuse_applies(x: Tensor) -> bool:
    """Whether a backward on `x` may use a workspace: CPU, and none of the modes (compile,
    autocast, torch.func, forward-mode AD) whose rules only plain ops follow."""
    return not (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    )
