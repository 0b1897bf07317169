"""CPU gradient memory kept between backward passes, handed out again once nobody else holds it.

Why: on CPU a fresh tensor of hundreds of MB is a new mmap from the C allocator, and its first
touch page-faults; on the 2-core CPU machine that costs several times the arithmetic that fills
it (the "fresh tensor" column of bench/results/components.md). The discriminators' weight
gradients (models/batched_linear.py) and the features-only attention-pool gradient
(ops/pooling.py) are written into ``reusable_gradient``'s memory and handed to autograd, which
adopts it as ``.grad`` or passes it on and drops it; the next backward gets the same memory back.

Memory is handed out again only when no other tensor or storage object shares it, so a gradient
somebody still holds (``.grad`` kept for accumulation, a ``torch.autograd.grad`` result, a view)
is never overwritten. Torch has no public way to ask that: ``_holders`` reads the storage's C++
use count (``torch._C._storage_Use_Count``, private) and its Python reference count.
tests/test_gradient_memory.py fails if a torch version changes either; a torch without the call
gets fresh memory every time, as plain autograd does. GPUs do not need this (torch's CUDA
allocator keeps freed memory). The cost: up to ``_KEEP`` buffers per gradient shape stay
allocated for the life of the process.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import Tensor

# Buffers kept per (shape, dtype): the discriminators' two hidden layers share a shape, and
# accumulated gradients hold theirs while the next backward needs another.
_KEEP = 4
_kept: dict[tuple[torch.Size, torch.dtype], list[Tensor]] = {}
_lock = threading.Lock()  # backward passes may run in several threads


def _holders(tensor: Tensor) -> tuple[int, int] | None:
    """(C++ references, Python references) to ``tensor``'s storage; None where torch won't say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = tensor.untyped_storage()
    return int(use_count(storage._cdata)), sys.getrefcount(storage)


# What a tensor whose memory nobody else sees reports, measured the same way: the counts
# include this module's own temporaries, whatever the Python and torch versions make of them.
_UNSHARED = _holders(torch.empty(1))


def reusable_gradient(like: Tensor) -> Tensor | None:
    """Contiguous memory shaped like ``like`` for a backward to write a whole gradient into:
    kept memory that nobody else holds, else fresh memory kept for the next call. None where
    reuse does not apply (not CPU, grad mode on as under ``create_graph``, compiling, or a
    torch that won't count holders): allocate as usual then."""
    if (
        like.device.type != "cpu"
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or _UNSHARED is None
    ):
        return None
    with _lock:
        kept = _kept.setdefault((like.shape, like.dtype), [])
        for buffer in kept:
            if _holders(buffer) == _UNSHARED:
                return buffer.detach()  # a second tensor on it: autograd may adopt it as .grad
        buffer = torch.empty(like.shape, dtype=like.dtype)
        kept.append(buffer)
        del kept[:-_KEEP]  # the oldest is forgotten, not freed, while somebody still holds it
        return buffer.detach()
