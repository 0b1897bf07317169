"""Cityscapes in its official layout: leftImg8bit/{split}/{city}/ and gtFine/{split}/{city}/."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.data.labels import label_ids_to_train_ids
from adapt_deploy.data.segmentation import Sample, SegmentationDataset, require_dir
from adapt_deploy.errors import DatasetError

LAYOUT = """  ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png"""
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_samples(root: Path, split: str, labels: bool = True) -> list[Sample]:
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


def cityscapes(
    root: str | Path,
    split: str = "train",
    size: tuple[int, int] | None = (512, 1024),
    labels: bool = True,
    resize_labels: bool = True,
    cache: bool = False,
) -> SegmentationDataset:
    """A Cityscapes split; labels mapped labelId→trainId (255 ignored)."""
    samples = cityscapes_samples(Path(root), split, labels)
    return SegmentationDataset(samples, label_ids_to_train_ids, size, resize_labels, cache)
