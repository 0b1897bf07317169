"""Parity gates: the exported graphs against PyTorch on synthetic target frames.

Every case (batch, height, width) is a batch of target-style street scenes from the synthetic
renderer, at odd and even sizes and batch sizes 1 and 3. fp32 ONNX Runtime must match the
PyTorch wrapper; fp16 must match fp32 ONNX Runtime (the issue's criterion). A failing gate
stops the export with the numbers, so no bundle that fails them is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adapt_deploy.data.synthetic import render_image
from adapt_deploy.errors import UserError
from adapt_deploy.export.verify import Runner, compare_outputs, failures, graph_input
from adapt_deploy.models.deploy import DeployModel
from adapt_deploy.progress import Reporter

# (batch, height, width): three resolutions, two of them odd, batch sizes 1 and 3.
PARITY_CASES: tuple[tuple[int, int, int], ...] = (
    (1, 97, 211),
    (3, 97, 211),
    (1, 128, 256),
    (3, 72, 136),
    (1, 161, 323),
)
SAMPLE_CASES = 3  # the first cases are stored in the bundle for on-target verification
FRAME_SEED = 7  # synthetic scenes used for parity (not the training seed 0 of the benchmark)

# Export gates. fp32: ONNX Runtime vs PyTorch. fp16: fp16 vs fp32 ONNX Runtime.
GATES = {
    "fp32": {"min_label_agreement": 0.999, "max_presence_diff": 1e-4},
    "fp16": {"min_label_agreement": 0.995, "max_presence_diff": 1e-2},
}


class ParityError(UserError):
    """The exported graph does not match PyTorch (or fp16 does not match fp32) closely enough."""


def target_frames(batch: int, height: int, width: int, first: int = 0) -> np.ndarray:
    """(N, H, W, 3) RGB uint8 target-style scenes from the synthetic renderer."""
    return np.stack(
        [render_image(FRAME_SEED, "target", first + i, height, width)[0] for i in range(batch)]
    )


@torch.no_grad()
def torch_outputs(model: DeployModel, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The PyTorch wrapper's outputs by name, as numpy, on whatever device the model is."""
    device = next(model.parameters()).device
    outputs = model(torch.from_numpy(batch).to(device))
    return {n: t.cpu().numpy() for n, t in zip(model.graph.output_names, outputs, strict=True)}


@dataclass
class ParityResult:
    """Per case metrics, the stored samples, and what failed."""

    cases: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """The meta.json `parity` entry."""
        summary: dict[str, Any] = {}
        for key in ("fp32", "fp16"):
            rows = [c[key] for c in self.cases if key in c]
            if rows:
                summary[key] = {
                    "min_label_agreement": min(r["label_agreement"] for r in rows),
                    "max_presence_diff": max(r["presence_max_abs_diff"] for r in rows),
                }
        return {
            "frames": f"synthetic target scenes (renderer seed {FRAME_SEED})",
            "reference": {"fp32": "PyTorch", "fp16": "fp32 ONNX Runtime (CPU)"},
            "gates": GATES,
            "cases": self.cases,
            "summary": summary,
            "passed": not self.problems,
        }


def check_parity(
    model: DeployModel,
    input_meta: dict[str, Any],
    runners: dict[str, Runner],
    cases: tuple[tuple[int, int, int], ...] = PARITY_CASES,
    reporter: Reporter | None = None,
) -> ParityResult:
    """Run every case through PyTorch and each runner ("fp32", optionally "fp16"); gate them."""
    reporter = reporter or Reporter()
    result = ParityResult()
    first = 0
    with reporter.task("parity checks", len(cases)):
        for batch, height, width in cases:
            feed = graph_input(target_frames(batch, height, width, first), input_meta)
            first += batch
            reference = torch_outputs(model, feed)
            fp32 = runners["fp32"](feed)
            case: dict[str, Any] = {"shape": [batch, height, width]}
            case["fp32"] = compare_outputs(reference, fp32)
            where = f"{batch}x{height}x{width}"
            result.problems += [
                f"fp32 vs PyTorch at {where}: {p}" for p in failures(case["fp32"], GATES["fp32"])
            ]
            if "fp16" in runners:
                fp16 = runners["fp16"](feed)
                case["fp16"] = compare_outputs(fp32, fp16)
                vs_torch = compare_outputs(reference, fp16)
                case["fp16"]["label_agreement_vs_pytorch"] = vs_torch["label_agreement"]
                result.problems += [
                    f"fp16 vs fp32 at {where}: {p}" for p in failures(case["fp16"], GATES["fp16"])
                ]
            result.cases.append(case)
            if len(result.samples) < SAMPLE_CASES:
                result.samples.append({"input": feed, **reference})
            reporter.advance(status=where)
    return result


def raise_on_failure(result: ParityResult) -> None:
    """ParityError listing every failed gate with its margin."""
    if result.problems:
        listed = "; ".join(result.problems)
        raise ParityError(f"parity gate failed, no bundle written: {listed}")
