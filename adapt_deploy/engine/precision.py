"""Mixed-precision training: autocast, the fp16 gradient scaler, channels_last and cudnn tuning.

``train.precision``: ``fp32`` (default) runs as before; ``bf16`` and ``fp16`` run the forward
passes under ``torch.autocast`` (convolutions and matmuls in the low type, the parameters and
their gradients in fp32, so checkpoints stay fp32). ``fp16`` adds a gradient scaler: fp16's
narrow range underflows small gradients, so the losses are scaled before backward and the
gradients unscaled before clipping and the optimizer steps; a step whose gradients overflowed
is skipped and the scale lowered. The losses themselves, the pooling reductions and the
discriminator outputs fed to them are fp32 (adapt/losses.py casts its inputs up).

On CUDA the model and its inputs are channels_last (the layout tensor cores read) and
``cudnn.benchmark`` is on for the run: every training size is fixed by the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The precision policy of one run: autocast for the forwards, scaled backward and steps."""

    def __init__(self, precision: str, device: torch.device, channels_last: bool | None = None):
        self.name = precision
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the model's weights and of its input batches."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager[Any]:
        """The context the forward passes and losses run in (a no-op for fp32)."""
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, scaled under fp16."""
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizers: Iterable[torch.optim.Optimizer],
        clip: tuple[Iterable[torch.nn.Parameter], float] | None = None,
    ) -> None:
        """Unscale the gradients, clip the first optimizer's (the model's) parameters to `clip`
        = (parameters, max norm), then step every optimizer (each skipped under fp16 when its
        gradients are not finite) and update the scale. An optimizer none of whose parameters
        got a gradient (a discriminator idle this iteration) is left alone."""
        optimizers = [o for o in optimizers if _has_gradients(o)]
        for optimizer in optimizers:
            self.scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(*clip)
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (empty unless fp16): a resumed run continues its scale."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale of a saved fp16 run; an empty state (fp32, bf16) keeps the default."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def _has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any parameter of `optimizer` holds a gradient."""
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


@contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """cudnn.benchmark on for a CUDA run (fixed sizes: the fastest algorithms are found once),
    restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
