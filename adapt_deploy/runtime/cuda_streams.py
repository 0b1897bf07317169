"""The CUDA streams that inference and on-device adaptation run on, and their priorities.

The torch runtime runs every frame on a stream of its own at a high priority; the adapter runs
its updates on a stream of its own at the default priority, the lowest. Two things follow:

- inference never waits behind an update: the runtime orders each frame after its caller's
  stream (what the caller did to the weights), and were the adapter on the caller's default
  stream, that would be every kernel of the update queued so far;
- when both have kernels ready, the block scheduler starts the inference kernels first (a
  priority is a hint: running blocks are not preempted).

Each side reads what the other wrote only through a weight push, which synchronises the device.
Part of the torch backend: the deployment side imports it only where torch is there.
"""

from __future__ import annotations

import torch

INFERENCE_PRIORITY = -1  # lower numbers run first; CUDA clamps to the device's range
ADAPTATION_PRIORITY = 0  # the default, and the lowest


def inference_stream(device: torch.device) -> torch.cuda.Stream:
    """A new high-priority stream on the CUDA `device`, for the runtime's frames."""
    return torch.cuda.Stream(device, priority=INFERENCE_PRIORITY)


def adaptation_stream(device: torch.device) -> torch.cuda.Stream:
    """A new default-priority stream on the CUDA `device`, for the adapter's updates."""
    return torch.cuda.Stream(device, priority=ADAPTATION_PRIORITY)
