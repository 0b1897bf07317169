"""GTA5 in its official layout: images/NNNNN.png, labels/NNNNN.png (Cityscapes labelIds)."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.data.datasets import Layout
from adapt_deploy.data.segmentation import Sample, same_name_pairs
from adapt_deploy.labels import label_ids_to_train_ids

LAYOUT = """  ROOT/images/{id}.png
  ROOT/labels/{id}.png   (Cityscapes labelIds, palette or grey PNG)"""


def gta5_samples(root: Path, split: str = "train", labels: bool = True) -> list[Sample]:
    """Every image (GTA5 has no official splits: `split` is not used), paired with the label of
    the same file name when `labels` is set."""
    label_dir = root / "labels" if labels else None
    return same_name_pairs(root / "images", label_dir, "GTA5", LAYOUT)


GTA5 = Layout(gta5_samples, label_ids_to_train_ids)  # labels mapped labelId→trainId
gta5 = GTA5.dataset  # the loader: gta5(root, split, size, labels, resize_labels, cache)
