"""mIoU of an exported bundle on a labelled split, through a deployment backend.

The same protocol and code as checkpoint evaluation (engine/evaluate.py): images resized to the
size the checkpoint was evaluated at, one confusion matrix over the split. With a `logits`
output the 1/8-resolution logits are upsampled bilinearly (align_corners=True) to the label
size exactly as for a checkpoint; otherwise the deployed `labels` (at input size) are resized
to the label size by nearest neighbour, which is what a robot gets.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.config import DATASET_KINDS, DatasetConfig
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.engine.evaluate import EvalResult, confusion_matrix
from adapt_deploy.errors import UserError
from adapt_deploy.export.verify import graph_input, open_runner
from adapt_deploy.labels import EVAL_PROTOCOLS
from adapt_deploy.models.prediction import predicted_classes
from adapt_deploy.progress import Reporter


def predict_labels(outputs: dict[str, np.ndarray], size: tuple[int, int], use_logits: bool):
    """(N, H, W) int64 predictions at the label size from a backend's outputs."""
    if use_logits:
        logits = torch.from_numpy(outputs["logits"]).float()
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return predicted_classes(up)
    labels = outputs["labels"]
    if labels.shape[1:] != size:
        resized = [cv2.resize(m, size[::-1], interpolation=cv2.INTER_NEAREST) for m in labels]
        labels = np.stack(resized)
    return torch.from_numpy(labels.astype(np.int64))


def evaluate_bundle(
    bundle: Path,
    data: Path,
    split: str = "val",
    kind: str = "cityscapes",
    backend: str = "onnxruntime",
    precision: str = "fp32",
    use_logits: bool = True,
    reporter: Reporter | None = None,
) -> tuple[EvalResult, str]:
    """(result, how predictions were made: "logits" or "labels") for a bundle on a split."""
    if kind not in DATASET_KINDS:
        raise UserError(f"--kind must be one of {DATASET_KINDS}, got {kind!r}")
    reporter = reporter or Reporter()
    meta = load_meta(bundle)
    run = open_runner(Path(bundle), meta, precision, backend)
    size = list(meta.get("evaluation", {}).get("size") or meta["shapes"]["opt"][1:])
    protocol = meta.get("evaluation", {}).get("protocol", "cityscapes19")
    if protocol not in EVAL_PROTOCOLS:
        raise UserError(f"{bundle}/meta.json: unknown evaluation.protocol {protocol!r}")
    use_logits = use_logits and any(o["name"] == "logits" for o in meta["outputs"])
    dataset = build_dataset(
        DatasetConfig(kind, str(data), split, size), labels=True, resize_labels=False
    )
    num_classes = meta["num_classes"]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with reporter.task(f"evaluating ({backend}, {precision})", len(dataset)):
        for index in range(len(dataset)):
            item = dataset[index]
            frames = item["image"].permute(1, 2, 0).unsqueeze(0).numpy()
            outputs = run(graph_input(frames, meta["input"]))
            label = item["label"].unsqueeze(0)
            preds = predict_labels(outputs, tuple(label.shape[-2:]), use_logits)
            confusion += confusion_matrix(label, preds, num_classes)
            reporter.advance()
    result = EvalResult(confusion.numpy(), list(meta["classes"]), protocol)
    return result, "logits" if use_logits else "labels"


def evaluate_path(
    path: Path,
    data: Path,
    split: str = "val",
    kind: str = "cityscapes",
    backend: str = "auto",
    precision: str = "fp32",
    reporter: Reporter | None = None,
    arch: str | None = None,
    init_format: str = "auto",
) -> tuple[EvalResult, str]:
    """Evaluate a checkpoint (PyTorch) or a bundle directory (a deployment backend); with `arch`
    (a preset) the file is released weights of another code base (docs/weights.md).

    Returns the result and a short description of what ran, for the report.
    """
    from adapt_deploy.engine.evaluate import evaluate_checkpoint

    path = Path(path)
    if path.is_dir() and (arch is not None or init_format != "auto"):
        raise UserError(f"{path} is a bundle: --arch and --init-format are for released weights")
    if path.is_dir():
        backend = "onnxruntime" if backend == "auto" else backend
        if backend == "torch":
            raise UserError(f"{path} is a bundle: evaluate it with --backend onnxruntime")
        result, mode = evaluate_bundle(
            path, data, split, kind, backend, precision, reporter=reporter
        )
        return result, f"bundle {path}, {backend} {precision}, predictions from {mode}"
    if backend not in ("auto", "torch"):
        raise UserError(
            f"--backend {backend} runs a bundle, and {path} is a checkpoint: export it first "
            f"(adapt-deploy export {path} --out BUNDLE), then evaluate BUNDLE"
        )
    result = evaluate_checkpoint(
        path, data, split, kind, reporter=reporter, arch=arch, init_format=init_format
    )
    return result, f"checkpoint {path}" + (f" as {arch}" if arch else "")
