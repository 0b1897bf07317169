"""Build a dataset from its config entry."""

from __future__ import annotations

from adapt_deploy.config import DatasetConfig
from adapt_deploy.data.cityscapes import cityscapes
from adapt_deploy.data.gta5 import gta5
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.data.synthia import synthia


def build_dataset(
    cfg: DatasetConfig, labels: bool = True, resize_labels: bool = True, cache: bool = False
) -> SegmentationDataset:
    """The dataset a config entry names, with its label/image sizes checked before any work."""
    size = (cfg.size[0], cfg.size[1])
    if cfg.kind == "gta5":
        dataset = gta5(cfg.root, size, labels, resize_labels, cache)
    elif cfg.kind == "synthia":
        dataset = synthia(cfg.root, size, labels, resize_labels, cache)
    else:
        dataset = cityscapes(cfg.root, cfg.split, size, labels, resize_labels, cache)
    dataset.check_pairs()
    return dataset
