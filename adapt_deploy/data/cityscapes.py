"""Cityscapes in its official layout: leftImg8bit/{split}/{city}/ and gtFine/{split}/{city}/."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.data.datasets import Layout
from adapt_deploy.data.segmentation import Sample, require_dir
from adapt_deploy.errors import DatasetError
from adapt_deploy.labels import label_ids_to_train_ids

LAYOUT = """  ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png"""
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_samples(root: Path, split: str = "train", labels: bool = True) -> list[Sample]:
    """Every image of a split, paired with its labelIds file when `labels` is set."""
    image_dir = root / "leftImg8bit" / split
    require_dir(image_dir, f"Cityscapes split {split!r}", LAYOUT)
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(
            f"no *{IMAGE_SUFFIX} images under {image_dir}\nexpected layout:\n{LAYOUT}"
        )
    label_dir = root / "gtFine" / split
    if labels:
        require_dir(label_dir, f"Cityscapes labels for split {split!r}", LAYOUT)
    samples = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = label_dir / image.parent.name / f"{stem}{LABEL_SUFFIX}" if labels else None
        if label is not None and not label.is_file():
            raise DatasetError(f"label not found for {image}: expected {label}")
        samples.append(Sample(f"{image.parent.name}/{stem}", image, label))
    return samples


CITYSCAPES = Layout(cityscapes_samples, label_ids_to_train_ids)  # labelId→trainId, 255 ignored
cityscapes = CITYSCAPES.dataset  # the loader: cityscapes(root, split, size, labels, ...)
