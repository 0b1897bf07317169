"""Evaluation as the field reports it: one confusion matrix over the split, IoU per class, mIoU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from adapt_deploy.config import InputConfig, ModelConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.engine.sampling import without_worker_tracebacks
from adapt_deploy.labels import CLASS_NAMES, EVAL_PROTOCOLS, IGNORE_INDEX
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.prediction import predicted_classes
from adapt_deploy.progress import Reporter


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    valid = labels != IGNORE_INDEX
    index = labels[valid].long() * num_classes + preds[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN); NaN for a class neither present nor predicted."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray, classes: tuple[int, ...] | None = None) -> float:
    """nanmean of per-class IoU over `classes` (default all); classes absent from both GT and
    prediction are excluded."""
    ious = iou_per_class(confusion)
    if classes is not None:
        ious = ious[list(classes)]
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


@dataclass
class EvalResult:
    """A split's confusion matrix with the numbers derived from it."""

    confusion: np.ndarray
    class_names: list[str]
    protocol: str = "cityscapes19"

    @property
    def iou(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    @property
    def mious(self) -> dict[str, float]:
        """The protocol's mIoUs by name (e.g. mIoU-16 and mIoU-13 for SYNTHIA)."""
        return {
            name: mean_iou(self.confusion, c) for name, c in EVAL_PROTOCOLS[self.protocol].items()
        }

    @property
    def miou(self) -> float:
        """The headline mIoU of the protocol."""
        return next(iter(self.mious.values()))

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.diag(self.confusion).sum() / total) if total else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary (IoU in percent, None for excluded classes)."""
        return {
            "miou": round(100 * self.miou, 2),
            "protocol": self.protocol,
            "mious": {name: round(100 * v, 2) for name, v in self.mious.items()},
            "pixel_accuracy": round(100 * self.pixel_accuracy, 2),
            "iou": {
                name: None if np.isnan(v) else round(100 * float(v), 2)
                for name, v in zip(self.class_names, self.iou, strict=True)
            },
            "confusion": self.confusion.tolist(),
        }


@torch.no_grad()
def predict_logits(model: DeepLab, images: torch.Tensor, spec: InputConfig, size: tuple[int, int]):
    """Logits upsampled bilinearly (align_corners=True) to `size` = (H, W) of the labels."""
    logits = model(normalize(images, spec))["logits"]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def evaluate(
    model: DeepLab,
    dataset: SegmentationDataset,
    spec: InputConfig,
    class_names: list[str],
    batch_size: int = 1,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    protocol: str = "cityscapes19",
) -> EvalResult:
    """Run the model over a labelled split and accumulate one confusion matrix."""
    model.eval()
    num_classes = len(class_names)
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    done = 0
    for batch in without_worker_tracebacks(loader):
        labels = batch["label"].to(device)
        logits = predict_logits(model, batch["image"].to(device), spec, labels.shape[-2:])
        confusion += confusion_matrix(labels, predicted_classes(logits), num_classes)
        done += len(labels)
        if progress is not None:
            progress(done, len(dataset))
    return EvalResult(confusion.cpu().numpy(), class_names, protocol)


def format_iou_table(results: dict[str, EvalResult]) -> list[list[str]]:
    """Rows [class, IoU per result...] and a final mIoU row, as strings in percent."""
    names = next(iter(results.values())).class_names
    rows = []
    for i, name in enumerate(names):
        cells = [r.iou[i] for r in results.values()]
        rows.append([name] + ["-" if np.isnan(v) else f"{100 * v:.1f}" for v in cells])
    for name in next(iter(results.values())).mious:
        rows.append([name] + [f"{100 * r.mious.get(name, np.nan):.1f}" for r in results.values()])
    return rows


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path,
    split: str = "val",
    kind: str = "cityscapes",
    reporter: Reporter | None = None,
    arch: str | ModelConfig | None = None,
    init_format: str = "auto",
) -> EvalResult:
    """Evaluate a checkpoint on a labelled split, resized as its training config's val set.

    With `arch` (a preset name of models/weight_formats.py, or a ModelConfig) the file is read as
    released weights (`init_format`, strict), built into that architecture and evaluated as the
    official code does: at 512x1024 with the normalization the format expects.
    """
    from adapt_deploy.config import DatasetConfig
    from adapt_deploy.data.datasets import build_dataset
    from adapt_deploy.errors import UserError
    from adapt_deploy.models.checkpoints import load_checkpoint, load_released
    from adapt_deploy.models.weight_formats import arch_preset
    from adapt_deploy.registry import DATASET_LAYOUTS

    DATASET_LAYOUTS.check(kind, "--kind")
    reporter = reporter or Reporter()
    if arch is not None:
        model_cfg = arch_preset(arch) if isinstance(arch, str) else arch
        model, config = load_released(checkpoint, model_cfg, init_format)
    elif init_format != "auto":
        raise UserError("--init-format reads released weights: give their --arch too")
    else:
        model, config = load_checkpoint(checkpoint)
    entry = DatasetConfig(kind, str(data), split, list(config.data.val.size))
    dataset = build_dataset(entry, labels=True, resize_labels=False)
    names = list(CLASS_NAMES[: config.model.num_classes])
    with reporter.task("evaluating", len(dataset)):
        return evaluate(
            model, dataset, config.input, names, progress=lambda d, n: reporter.advance()
        )
