"""The CUDA streams the torch runtime and on-device adaptation run on (priorities:
`stream_priority`).

The torch runtime runs every frame on a stream of its own at a high priority; the adapter runs
its updates on a stream of its own at the default priority, the lowest. Two things follow:

- inference never waits behind an update: the runtime orders each frame after its caller's
  stream (what the caller did to the weights), and were the adapter on the caller's default
  stream, that would be every kernel of the update queued so far;
- when both have kernels ready, the block scheduler starts the inference kernels first.

Each side reads what the other wrote only through a weight push, which synchronises the device.
ADAPT_DEPLOY_ADAPTER_STREAM=shared brings back the arrangement before 2026-12-07.
Part of the torch backend: the deployment side imports it only where torch is there.
"""

from __future__ import annotations

import torch

from adapt_deploy.runtime.stream_priority import (
    ADAPTATION_PRIORITY,
    SHARED,
    adapter_stream_setting,
    inference_priority,
)


def inference_stream(device: torch.device) -> torch.cuda.Stream:
    """A new stream on the CUDA `device` for the runtime's frames: high priority, or the default
    one when the adapter shares its caller's stream."""
    return torch.cuda.Stream(device, priority=inference_priority())


def adaptation_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new default-priority stream on the CUDA `device` for the adapter's updates; None when
    the adapter shares its caller's stream (ADAPT_DEPLOY_ADAPTER_STREAM=shared)."""
    if adapter_stream_setting() == SHARED:
        return None
    return torch.cuda.Stream(device, priority=ADAPTATION_PRIORITY)
