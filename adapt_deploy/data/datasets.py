"""Build a dataset from its config entry, through the layout adapt_deploy.registry names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapt_deploy.config import DatasetConfig
from adapt_deploy.data.segmentation import (
    CITYSCAPES_IDS,
    LabelIds,
    LabelMapper,
    LabelReader,
    Sample,
    SegmentationDataset,
)
from adapt_deploy.labels import NUM_CLASSES
from adapt_deploy.registry import DATASET_LAYOUTS

# (root, split, labels) -> the split's samples; layouts without official splits ignore `split`.
FindSamples = Callable[[Path, str, bool], list[Sample]]


@dataclass(frozen=True)
class Layout:
    """What one dataset layout knows: where its samples are and how its label files read.

    Each layout module (gta5.py, cityscapes.py, synthia.py) holds one, which
    adapt_deploy.registry.DATASET_LAYOUTS names; `dataset` is the loader, the same for all.
    """

    find_samples: FindSamples
    to_train_ids: LabelMapper
    read_label: LabelReader | None = None  # None: a single-channel labelIds image
    label_ids: LabelIds = CITYSCAPES_IDS
    # The trainIds the layout's labels hold (SYNTHIA: 16); a source's default class set.
    classes: tuple[int, ...] = tuple(range(NUM_CLASSES))

    def dataset(
        self,
        root: str | Path,
        split: str = "train",
        size: tuple[int, int] | None = None,
        labels: bool = True,
        resize_labels: bool = True,
        cache: bool = False,
    ) -> SegmentationDataset:
        """The split under `root`, resized to `size` (None: as stored), labels in trainIds."""
        samples = self.find_samples(Path(root), split, labels)
        return SegmentationDataset(
            samples,
            self.to_train_ids,
            size,
            resize_labels,
            cache,
            read_label=self.read_label,
            label_ids=self.label_ids,
        )


def build_dataset(
    cfg: DatasetConfig, labels: bool = True, resize_labels: bool = True, cache: bool = False
) -> SegmentationDataset:
    """The dataset a config entry names, with its label/image sizes checked before any work."""
    layout: Layout = DATASET_LAYOUTS.load(cfg.kind)
    size = (cfg.size[0], cfg.size[1])
    dataset = layout.dataset(cfg.root, cfg.split, size, labels, resize_labels, cache)
    dataset.check_pairs()
    return dataset


def source_classes(cfg: DatasetConfig) -> tuple[int, ...]:
    """The trainIds a labelled source labels: the entry's `classes`, else its layout's."""
    if cfg.classes is not None:
        return tuple(cfg.classes)
    layout: Layout = DATASET_LAYOUTS.load(cfg.kind)
    return layout.classes
