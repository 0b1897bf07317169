"""GTA5 in its official layout: images/NNNNN.png, labels/NNNNN.png (Cityscapes labelIds)."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.data.labels import label_ids_to_train_ids
from adapt_deploy.data.segmentation import Sample, SegmentationDataset, same_name_pairs

LAYOUT = """  ROOT/images/{id}.png
  ROOT/labels/{id}.png   (Cityscapes labelIds, palette or grey PNG)"""


def gta5_samples(root: Path, labels: bool = True) -> list[Sample]:
    """Every image, paired with the label of the same file name when `labels` is set."""
    label_dir = root / "labels" if labels else None
    return same_name_pairs(root / "images", label_dir, "GTA5", LAYOUT)


def gta5(
    root: str | Path,
    size: tuple[int, int] | None = (720, 1280),
    labels: bool = True,
    resize_labels: bool = True,
    cache: bool = False,
) -> SegmentationDataset:
    """The GTA5 set (no official splits: all images); labels mapped labelId→trainId."""
    samples = gta5_samples(Path(root), labels)
    return SegmentationDataset(samples, label_ids_to_train_ids, size, resize_labels, cache)
