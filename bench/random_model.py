"""Why bench.tta_cost's random model is calibrated: its reduced-precision labels against fp32.

    python -m bench.random_model [--backbone resnet101] [--width 64] [--size 128x256]

A randomly initialised DeepLab-v2 (seed 0) three ways: as initialised; with its BN statistics
set on bench.stream's 8 source images; and with its residual branches then scaled too
(`bench.common.calibrate_batchnorm`, what `random_bundle` does when it gets source images).
For each: the mean |logit|, and on two frames (the parity frames' odd 97x211 and --size) the
labels under fp16 and bf16 autocast that agree with fp32 and the largest presence difference,
compared as the push check compares them (DeployModel outputs; its floors: fp16 99.5% and 1e-2,
bf16 99% and 2e-2). Autocast runs on this machine's CPU: a stand-in for a GPU's kernels, not a
measurement of them. Writes bench/results/random_model.md.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import numpy as np
import torch

from adapt_deploy.config import from_dict
from adapt_deploy.data.normalize import normalize
from adapt_deploy.export.parity import target_frames, torch_outputs
from adapt_deploy.export.verify import VERIFY_TOLERANCES, compare_outputs
from adapt_deploy.models.checkpoints import build_model
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.tta.settings import parse_size
from bench.common import RESIDUAL_SCALE, RGB_INPUT, calibrate_batchnorm, write_results
from bench.stream import source_data

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Autocast(torch.nn.Module):
    """`model` under CPU autocast at `dtype`, its outputs back in float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.model(x)
        return {name: value.float() for name, value in out.items()}


def rows(model: torch.nn.Module, name: str, frames: list[np.ndarray], config: Any) -> list[str]:
    """One Markdown row per precision for `model`."""
    graph = GraphSpec(layout="NHWC", lse_k=1.0)
    reference = DeployModel(model, config.input, graph)
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(frames[-1]).permute(0, 3, 1, 2), config.input))
    scale = float(logits["logits"].abs().mean())
    out = []
    for precision, dtype in PRECISIONS.items():
        low = DeployModel(Autocast(model, dtype), config.input, graph)
        metrics = [
            compare_outputs(torch_outputs(reference, f), torch_outputs(low, f)) for f in frames
        ]
        agreement = [100 * m["label_agreement"] for m in metrics]
        presence = max(m["presence_max_abs_diff"] for m in metrics)
        floor = VERIFY_TOLERANCES[precision]
        passes = min(agreement) >= 100 * floor["min_label_agreement"] and (
            presence <= floor["max_presence_diff"]
        )
        out.append(
            f"| {name} | {scale:.3g} | {precision} | "
            + " / ".join(f"{a:.2f}%" for a in agreement)
            + f" | {presence:.2g} | {'yes' if passes else 'no'} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.random_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--backbone", default="resnet101", help="resnet18, resnet50, resnet101")
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64: the standard)")
    parser.add_argument("--size", default="128x256", help="HxW of the calibration and 2nd frame")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if size is None:
        parser.error("--size: expected HxW, e.g. 128x256")
    config = from_dict(
        {"name": "random_model", "input": RGB_INPUT,
         "model": {"backbone": args.backbone, "width": args.width, "num_classes": 19},
         "data": {"val": {"kind": "cityscapes", "root": ".", "split": "val", "size": list(size)}}}
    )  # fmt: skip
    torch.manual_seed(0)
    initial = build_model(config.model).eval()
    frames = [target_frames(1, 97, 211), target_frames(1, *size, first=1)]
    variants = {"as initialised": initial}
    for name, scale in (("BN calibrated", 1.0), (f"BN calibrated, branches x{RESIDUAL_SCALE:g}",
                                                  RESIDUAL_SCALE)):  # fmt: skip
        model = copy.deepcopy(initial)
        calibrate_batchnorm(model, source_data(), size, config.input, residual_scale=scale)
        variants[name] = model
    table = []
    for name, model in variants.items():
        print(name, flush=True)
        table += rows(model, name, frames, config)
    body = "\n".join(
        [
            f"Model: random-init DeepLab-v2 {args.backbone}, width {args.width}, seed 0; "
            f"calibration on bench.stream's source images at {size[0]}x{size[1]}. Frames: "
            f"target_frames 97x211 and {size[0]}x{size[1]}. Autocast on the CPU.",
            "",
            "| model | mean abs logit | precision | labels agreeing with fp32 (per frame) "
            "| presence max diff | within the push check's floor |",
            "|---|---|---|---|---|---|",
            *table,
        ]
    )
    path = write_results("random_model", "A random model's reduced precision against fp32", body)
    print(body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
