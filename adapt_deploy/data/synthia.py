"""SYNTHIA-RAND-CITYSCAPES in its official layout: RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from adapt_deploy.data.datasets import Layout
from adapt_deploy.data.segmentation import LabelIds, Sample, same_name_pairs
from adapt_deploy.errors import DatasetError
from adapt_deploy.labels import SYNTHIA_16_CLASSES, SYNTHIA_LABEL_TO_TRAIN, lookup_table

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


def synthia_samples(root: Path, split: str = "train", labels: bool = True) -> list[Sample]:
    """Every image (SYNTHIA-RAND-CITYSCAPES has no official splits: `split` is not used),
    paired with the label of the same file name when `labels` is set."""
    label_dir = root / "GT" / "LABELS" if labels else None
    return same_name_pairs(root / "RGB", label_dir, "SYNTHIA", LAYOUT)


# Labels mapped to Cityscapes trainIds from the class id in the R channel of a 16-bit PNG; the
# set labels the 16 classes of its protocol (no terrain, truck, train).
SYNTHIA = Layout(
    synthia_samples, synthia_to_train_ids, read_synthia_label, SYNTHIA_IDS, SYNTHIA_16_CLASSES
)
synthia = SYNTHIA.dataset  # the loader: synthia(root, split, size, labels, resize_labels, cache)
