"""Where ``ADAPT_DEPLOY_KERNELS=auto`` runs a fused kernel: the measured winners, nothing else.

The rule: under ``auto`` an op runs its fused CUDA kernel on tensors of a dtype only when
``bench/kernels.py`` measured that kernel faster than the PyTorch reference (the op's definition
in pooling.py) at every shape of a GPU run. Slower anywhere, or never measured: the reference.
``require`` runs every fused kernel regardless (tests, benchmarks); ``off`` none.

Each run of ``bench/kernels.py`` writes this table as ``bench/results/kernel_choice.json``
(per op and dtype: faster at every shape or not, with the timings). Adopting a new run means
copying its ``faster`` lists into ``FASTER`` with ``MEASURED_ON`` naming the run: a reviewed
change, never a file read at run time.
"""

from __future__ import annotations

import torch

# The ops with a fused kernel (the adapt_deploy:: names cuda_impl.py registers).
OPS = (
    "lse_pool",
    "lse_pool_backward",
    "attention_pool",
    "attention_pool_backward",
    "attention_pool_backward_features",
)

MEASURED_ON = (
    "NVIDIA H200, torch 2.11.0+cu130, 2026-12-04, commit 7364dd3 "
    "(../shared/gpu-runs/2026-12-04-h200/kernels.md)"
)

# That run timed attention_pool forward and forward+backward at C=19, D=2048, 65x129, N 1 and 8,
# in fp32 and bf16 (the backward below is forward+backward minus forward of the same run):
#   bf16 forward 0.074 / 0.267 ms against the reference's 0.117 / 0.797: faster;
#   bf16 backward 0.234 / 0.837 ms against 0.285 / 0.901: faster;
#   fp32 forward 0.129 / 0.711 against 0.061 / 0.426, backward 0.388 / 0.771 against
#   0.207 / 0.698: slower, so fp32 stays on the reference.
# fp16, fp64, lse_pool and the features-only backward were not timed: the reference.
FASTER: dict[str, frozenset[str]] = {
    "attention_pool": frozenset({"bfloat16"}),
    "attention_pool_backward": frozenset({"bfloat16"}),
}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the names used in the table and the bench results."""
    return str(dtype).removeprefix("torch.")


def measured_faster(op: str, dtype: torch.dtype) -> bool:
    """Whether the fused kernel of ``op`` was measured faster than the reference for ``dtype``."""
    return dtype_name(dtype) in FASTER.get(op, frozenset())


def summary() -> str:
    """The table in one line, for `adapt-deploy doctor` and the log."""
    winners = [f"{op} ({', '.join(sorted(FASTER[op]))})" for op in OPS if FASTER.get(op)]
    listed = "; ".join(winners) if winners else "none"
    return f"measured faster on {MEASURED_ON}: {listed}"
