"""GTA5 in its official layout: images/NNNNN.png, labels/NNNNN.png (Cityscapes labelIds)."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.data.labels import label_ids_to_train_ids
from adapt_deploy.data.segmentation import Sample, SegmentationDataset, require_dir
from adapt_deploy.errors import DatasetError

LAYOUT = """  ROOT/images/{id}.png
  ROOT/labels/{id}.png   (Cityscapes labelIds, palette or grey PNG)"""


def gta5_samples(root: Path, labels: bool = True) -> list[Sample]:
    """Every image, paired with the label of the same file name when `labels` is set."""
    image_dir = root / "images"
    require_dir(image_dir, "GTA5 images", LAYOUT)
    images = sorted(image_dir.glob("*.png"))
    if not images:
        raise DatasetError(f"no .png images under {image_dir}\nexpected layout:\n{LAYOUT}")
    if labels:
        require_dir(root / "labels", "GTA5 labels", LAYOUT)
    samples = []
    for image in images:
        label = root / "labels" / image.name if labels else None
        if label is not None and not label.is_file():
            raise DatasetError(f"label not found for {image}: expected {label}")
        samples.append(Sample(image.stem, image, label))
    return samples


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
