"""Stream priorities of inference and on-device adaptation, torch-free: the torch backend
(`cuda_streams`) and the TensorRT backend's cuda-python stream (`cuda_memory`) both read them.

Inference runs at a high priority, the adapter's updates at the default one, the lowest: when
both have kernels ready, the block scheduler starts the frame's first (a hint: running blocks
are not preempted). ADAPT_DEPLOY_ADAPTER_STREAM=shared brings back how releases before
2026-12-07 ran (the adapter on its caller's stream, the runtime's stream at the default
priority), so that a benchmark (`bench.tta_cost --streams both`) or a profile can compare them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def inference_priority(environ: Mapping[str, str] | None = None) -> int:
    """The priority of a runtime's stream: high, or the default one when the adapter shares its
    caller's stream."""
    shared = adapter_stream_setting(environ) == SHARED
    return ADAPTATION_PRIORITY if shared else INFERENCE_PRIORITY
