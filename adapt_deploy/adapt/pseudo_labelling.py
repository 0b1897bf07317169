"""Class-balanced pseudo-labels (CBST, Zou et al. ECCV 2018; CRST, ICCV 2019).

A model predicts every image of the target split. Per class c, k_c is the confidence of its
most confident pixels' top `portion` (the pixels whose argmax is c, sorted by max probability);
a pixel keeps its argmax c as a label when its confidence reaches k_c, else it is ignored. So
every class, rare or frequent, labels the same share of its own pixels, where one global
threshold would label mostly the frequent, confident classes.

Two passes over the split, both resumable (data/pseudo_labels.py holds the file format): the
first stores each image's argmax and confidence; the thresholds come from those files; the
second writes the labels. summary.json, written last, says the set is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from adapt_deploy.adapt.losses import at_least_fp32, upsample
from adapt_deploy.atomic import atomic_write_json
from adapt_deploy.bundle.meta import sha256_file
from adapt_deploy.config import DatasetConfig, ExperimentConfig, InputConfig
from adapt_deploy.data import pseudo_labels as files
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.normalize import normalize
from adapt_deploy.data.segmentation import SegmentationDataset, image_size
from adapt_deploy.errors import UserError
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.progress import Reporter
from adapt_deploy.registry import DATASET_LAYOUTS

LEVELS = files.CONFIDENCE_SCALE + 1  # confidence is quantized to these many levels


@dataclass
class PseudoLabelJob:
    """What to label: the network (in the run's normalization), the split and the portion."""

    network: DeepLab
    dataset: Dataset  # the target split's images (a SegmentationDataset, or a wrapper of one)
    input: InputConfig
    split: str
    portion: float
    source: str  # what the network is: a checkpoint's sha256, or a run and iteration

    def record(self) -> dict[str, Any]:
        """job.json: a set continues only when this is what it was started with."""
        base = samples_of(self.dataset)
        return {
            "model": self.source,
            "split": self.split,
            "images": len(base.samples),
            "first": base.samples[0].name if base.samples else None,
            "portion": self.portion,
            "size": list(base.size) if base.size else None,
        }


def samples_of(dataset: Dataset) -> SegmentationDataset:
    """The SegmentationDataset under a dataset wrapper (WeaklyLabelled and the like)."""
    while not isinstance(dataset, SegmentationDataset):
        dataset = dataset.base  # type: ignore[attr-defined]
    return dataset


def write_pseudo_labels(job: PseudoLabelJob, out: Path, reporter: Reporter) -> dict[str, Any]:
    """The complete pseudo-label set of `job` in `out` (made, continued or found); its summary."""
    out = Path(out)
    files.start_job(out, job.record())
    summary = files.read_summary(out)
    if summary is not None:
        return summary
    base = samples_of(job.dataset)
    names = [s.name for s in base.samples]
    num_classes = job.network.num_classes
    predict_split(job, out, reporter)
    histogram = np.zeros((num_classes, LEVELS), np.int64)
    for name in names:
        classes, confidence = _stored(out, name)
        histogram += class_histogram(classes, confidence, num_classes)
    thresholds = class_thresholds(histogram, job.portion)
    labelled = np.zeros(num_classes, np.int64)
    with reporter.task(f"pseudo-labels -> {out}", len(names)):
        for name in names:
            classes, confidence = _stored(out, name)
            train_ids = apply_thresholds(classes, confidence, thresholds)
            labelled += np.bincount(train_ids.ravel(), minlength=256)[:num_classes]
            files.write_label(out, job.split, name, train_ids)
            reporter.advance()
    summary = _summary(job, len(names), histogram, thresholds, labelled)
    atomic_write_json(out / files.SUMMARY, summary)
    return summary


def _stored(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    stored = files.read_prediction(out, name)
    assert stored is not None, f"prediction of {name} missing after the first pass"
    return stored


@torch.no_grad()
def predict_split(job: PseudoLabelJob, out: Path, reporter: Reporter) -> None:
    """First pass: argmax and confidence of every image not stored yet, at the image's own
    (stored) size, as a Cityscapes label is."""
    base = samples_of(job.dataset)
    todo = [i for i, s in enumerate(base.samples) if files.read_prediction(out, s.name) is None]
    network = job.network
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    try:
        with reporter.task(f"predicting {len(todo)} target images", len(todo)):
            for index in todo:
                sample = base.samples[index]
                item = base[index]
                image = item["image"].unsqueeze(0).to(device)  # type: ignore[union-attr]
                probs = predict(network, image, job.input, image_size(sample.image))
                confidence, classes = probs.max(dim=1)
                files.write_prediction(
                    out, sample.name, classes[0].cpu().numpy(), confidence[0].cpu().numpy()
                )
                reporter.advance()
    finally:
        network.train(was_training)


def predict(
    network: DeepLab, image: torch.Tensor, cfg: InputConfig, size: tuple[int, int]
) -> torch.Tensor:
    """Softmax probabilities (N, C, H, W) at `size` of uint8 images (N, 3, h, w), fp32."""
    logits = network(normalize(image, cfg))["logits"]
    return F.softmax(upsample(at_least_fp32(logits), size), dim=1)


def class_histogram(classes: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, LEVELS) counts of pixels by argmax class and quantized confidence."""
    keys = classes.astype(np.int64).ravel() * LEVELS + confidence.astype(np.int64).ravel()
    return np.bincount(keys, minlength=num_classes * LEVELS)[: num_classes * LEVELS].reshape(
        num_classes, LEVELS
    )


def class_thresholds(histogram: np.ndarray, portion: float) -> np.ndarray:
    """k_c per class, as a quantized confidence: the confidence of the ceil(portion * n_c)-th
    most confident pixel predicted as c. A class predicted nowhere gets LEVELS (never kept)."""
    thresholds = np.full(len(histogram), LEVELS, np.int64)
    for c, counts in enumerate(histogram):
        total = int(counts.sum())
        if total == 0:
            continue
        keep = max(1, math.ceil(portion * total))
        from_top = np.cumsum(counts[::-1])  # pixels at or above each level, from the top
        thresholds[c] = LEVELS - 1 - int(np.searchsorted(from_top, keep))
    return thresholds


def apply_thresholds(
    classes: np.ndarray, confidence: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """trainIds: a pixel's argmax where its confidence reaches its class's k_c, else 255."""
    keep = confidence.astype(np.int64) >= thresholds[classes.astype(np.int64)]
    return np.where(keep, classes, IGNORE_INDEX).astype(np.uint8)


def _summary(
    job: PseudoLabelJob,
    images: int,
    histogram: np.ndarray,
    thresholds: np.ndarray,
    labelled: np.ndarray,
) -> dict[str, Any]:
    names = list(CLASS_NAMES[: len(thresholds)])
    predicted = histogram.sum(axis=1)
    total = max(int(predicted.sum()), 1)
    return {
        "split": job.split,
        "images": images,
        "portion": job.portion,
        "model": job.source,
        "labelled_share": round(float(labelled.sum()) / total, 4),
        "classes": {
            name: {
                "threshold": None if k >= LEVELS else round(k / files.CONFIDENCE_SCALE, 5),
                "predicted_pixels": int(n),
                "labelled_pixels": int(kept),
            }
            for name, k, n, kept in zip(names, thresholds, predicted, labelled, strict=True)
        },
    }


def read_round_label(
    root: Path, split: str, names: list[str], size: tuple[int, int]
) -> torch.Tensor:
    """(N, H, W) int64 pseudo-labels of a batch's samples, resized to the batch's size."""
    return torch.from_numpy(
        np.stack([files.read_label(root, split, name, size) for name in names])
    ).long()


def checkpoint_on_split(
    checkpoint: Path, data: Path, kind: str, split: str
) -> tuple[DeepLab, ExperimentConfig, SegmentationDataset]:
    """A checkpoint's model (eval mode, on CUDA when there is one) and the unlabelled split it
    is to label, resized as its training config's target set."""
    DATASET_LAYOUTS.check(kind, "--kind")
    model, config = load_checkpoint(checkpoint)
    model = model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    entry = DatasetConfig(kind, str(data), split, list(config.data.target.size))
    return model, config, build_dataset(entry, labels=False)


def pseudo_label_checkpoint(
    checkpoint: Path,
    data: Path,
    out: Path,
    portion: float,
    kind: str = "cityscapes",
    split: str = "train",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`adapt-deploy pseudo-label`: class-balanced pseudo-labels of a split by a checkpoint,
    in the Cityscapes layout under `out`; resumable. Returns the summary."""
    if not 0 < portion <= 1:
        raise UserError(f"--portion must be in (0, 1] (each class's share kept), got {portion}")
    model, config, dataset = checkpoint_on_split(checkpoint, data, kind, split)
    source = f"checkpoint sha256 {sha256_file(Path(checkpoint))}"
    job = PseudoLabelJob(model, dataset, config.input, split, portion, source)
    return write_pseudo_labels(job, out, reporter or Reporter())
