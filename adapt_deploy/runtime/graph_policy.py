"""When CUDA graphs are used, and how a captured graph is checked: torch-free, so the selection
rule, the ONNX Runtime backend and the torch backend share it.

A graph is only ever a faster way to run what eager runs: it is captured on CUDA only, can be
turned off for a whole process (ADAPT_DEPLOY_CUDA_GRAPHS=0, e.g. for debugging or profiling), and
its first replay is compared with an eager run of the same input before it is trusted; a
capture that fails or disagrees leaves eager running, with a note saying why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from adapt_deploy.errors import UserError

GRAPHS_ENV = "ADAPT_DEPLOY_CUDA_GRAPHS"
_OFF = ("0", "off", "false", "no")
_ON = ("", "1", "on", "true", "yes")
# A replay may differ from eager where kernels reduce in another order (atomics): labels on a
# few near-tie pixels, floats in their last bits. Anything more is a wrong graph.
MIN_LABEL_AGREEMENT = 0.999
MAX_RELATIVE_DIFF = 1e-3


def graphs_env_off(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ADAPT_DEPLOY_CUDA_GRAPHS turns CUDA graphs off (0/off/false/no); UserError for a
    value that is neither on nor off."""
    value = (os.environ if environ is None else environ).get(GRAPHS_ENV, "").strip().lower()
    if value in _OFF:
        return True
    if value in _ON:
        return False
    raise UserError(f"{GRAPHS_ENV}: expected 0/off/false/no or 1/on/true/yes, got {value!r}")


def check_request(cuda_graph: object) -> bool | None:
    """A `cuda_graph=` option as given: True, False or None (the backend's default)."""
    if cuda_graph is None or isinstance(cuda_graph, bool):
        return cuda_graph
    raise UserError(f"cuda_graph: expected True, False or None, got {cuda_graph!r}")


def decide(
    requested: bool | None, cuda: bool, default: bool, who: str, env_off: bool
) -> tuple[bool, tuple[str, ...]]:
    """(use CUDA graphs, notes) for `who` (a backend, "teacher"): `requested` None means
    `default`. A note says why an explicit request, or a default that would have used graphs,
    is not honoured; nothing is said where graphs were neither asked for nor on by default."""
    wanted = default if requested is None else requested
    if not wanted:
        return False, ()
    if not cuda:
        if requested:
            return False, (f"{who}: CUDA graphs need a CUDA device; running eager on the CPU",)
        return False, ()
    if env_off:
        return False, (f"{who}: CUDA graphs turned off by {GRAPHS_ENV}; running eager",)
    return True, ()


def replay_mismatch(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> str | None:
    """None when a graph's outputs are those of eager: integer outputs (labels) agree on at
    least MIN_LABEL_AGREEMENT of their elements, float outputs within MAX_RELATIVE_DIFF of the
    largest eager magnitude; else what differs."""
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want.shape != have.shape or want.dtype != have.dtype:
            expected_type = f"{want.dtype}{list(want.shape)}"
            return f"output {i}: {have.dtype}{list(have.shape)}, expected {expected_type}"
        if want.size == 0:
            continue
        if np.issubdtype(want.dtype, np.integer):
            agreement = float(np.mean(want == have))
            if agreement < MIN_LABEL_AGREEMENT:
                return f"output {i}: {100 * agreement:.3f}% of the values equal"
            continue
        if not np.all(np.isfinite(have) == np.isfinite(want)):
            return f"output {i}: non-finite values where eager has none (or the reverse)"
        finite = np.isfinite(want)
        scale = max(float(np.max(np.abs(want[finite]), initial=0.0)), 1.0)
        diff = float(np.max(np.abs(want[finite] - have[finite]), initial=0.0))
        if diff > MAX_RELATIVE_DIFF * scale:
            return f"output {i}: max |difference| {diff:.3g} (scale {scale:.3g})"
    return None
