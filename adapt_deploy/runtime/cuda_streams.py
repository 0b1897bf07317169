"""The CUDA streams that inference and on-device adaptation run on, and their priorities.

The torch runtime runs every frame on a stream of its own at a high priority; the adapter runs
its updates on a stream of its own at the default priority, the lowest. Two things follow:

- inference never waits behind an update: the runtime orders each frame after its caller's
  stream (what the caller did to the weights), and were the adapter on the caller's default
  stream, that would be every kernel of the update queued so far;
- when both have kernels ready, the block scheduler starts the inference kernels first (a
  priority is a hint: running blocks are not preempted).

Each side reads what the other wrote only through a weight push, which synchronises the device.
ADAPT_DEPLOY_ADAPTER_STREAM=shared brings back how releases before 2026-12-07 ran (the adapter
on its caller's stream, the runtime's stream at the default priority), so that a benchmark
(`bench.tta_cost --streams both`) or a profile can compare the two in one process.
Part of the torch backend: the deployment side imports it only where torch is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from adapt_deploy.errors import UserError

INFERENCE_PRIORITY = -1  # lower numbers run first; CUDA clamps to the device's range
ADAPTATION_PRIORITY = 0  # the default, and the lowest
STREAMS_ENV = "ADAPT_DEPLOY_ADAPTER_STREAM"
OWN, SHARED = "own", "shared"


def adapter_stream_setting(environ: Mapping[str, str] | None = None) -> str:
    """'own' (the default) or 'shared', as ADAPT_DEPLOY_ADAPTER_STREAM says; UserError for any
    other value."""
    value = (os.environ if environ is None else environ).get(STREAMS_ENV, "").strip().lower()
    if value in ("", OWN):
        return OWN
    if value == SHARED:
        return SHARED
    raise UserError(f"{STREAMS_ENV}: expected {OWN!r} or {SHARED!r}, got {value!r}")


def inference_stream(device: torch.device) -> torch.cuda.Stream:
    """A new stream on the CUDA `device` for the runtime's frames: high priority, or the default
    one when the adapter shares its caller's stream."""
    shared = adapter_stream_setting() == SHARED
    return torch.cuda.Stream(device, priority=ADAPTATION_PRIORITY if shared else INFERENCE_PRIORITY)


def adaptation_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new default-priority stream on the CUDA `device` for the adapter's updates; None when
    the adapter shares its caller's stream (ADAPT_DEPLOY_ADAPTER_STREAM=shared)."""
    if adapter_stream_setting() == SHARED:
        return None
    return torch.cuda.Stream(device, priority=ADAPTATION_PRIORITY)
