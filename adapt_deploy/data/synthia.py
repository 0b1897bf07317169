"""SYNTHIA-RAND-CITYSCAPES in its official layout: RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from adapt_deploy.data.labels import SYNTHIA_LABEL_TO_TRAIN, lookup_table
from adapt_deploy.data.segmentation import LabelIds, Sample, SegmentationDataset, same_name_pairs
from adapt_deploy.errors import DatasetError

LAYOUT = """  ROOT/RGB/{id}.png
  ROOT/GT/LABELS/{id}.png   (16-bit PNG, SYNTHIA class id in the first (R) channel)"""
SYNTHIA_TO_TRAIN_LUT = lookup_table(SYNTHIA_LABEL_TO_TRAIN, size=65536)
SYNTHIA_IDS = LabelIds("SYNTHIA class ids", 23)  # 0 void .. 22 lanemarking


def read_synthia_label(path: Path) -> np.ndarray:
    """SYNTHIA class ids (channel 0 of the 16-bit RGB label, i.e. R; OpenCV reads BGR)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetError(f"cannot read label {path}")
    return raw if raw.ndim == 2 else raw[:, :, 2]


def synthia_to_train_ids(class_ids: np.ndarray) -> np.ndarray:
    """Map SYNTHIA class ids to Cityscapes trainIds (255 where ignored)."""
    return SYNTHIA_TO_TRAIN_LUT[class_ids.astype(np.intp, copy=False)]


def synthia_samples(root: Path, labels: bool = True) -> list[Sample]:
    """Every image, paired with the label of the same file name when `labels` is set."""
    label_dir = root / "GT" / "LABELS" if labels else None
    return same_name_pairs(root / "RGB", label_dir, "SYNTHIA", LAYOUT)


def synthia(
    root: str | Path,
    size: tuple[int, int] | None = (760, 1280),
    labels: bool = True,
    resize_labels: bool = True,
    cache: bool = False,
) -> SegmentationDataset:
    """SYNTHIA-RAND-CITYSCAPES (all images); labels mapped to Cityscapes trainIds."""
    samples = synthia_samples(Path(root), labels)
    return SegmentationDataset(
        samples,
        synthia_to_train_ids,
        size,
        resize_labels,
        cache,
        read_label=read_synthia_label,
        label_ids=SYNTHIA_IDS,
    )
