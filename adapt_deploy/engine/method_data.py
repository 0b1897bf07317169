"""The datasets a method trains on, with the weak labels it needs attached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from adapt_deploy.adapt.base import Method
from adapt_deploy.adapt.ranking import read_rank
from adapt_deploy.config import MULTI_SOURCE_METHODS, DatasetConfig, ExperimentConfig
from adapt_deploy.data.datasets import build_dataset, source_classes
from adapt_deploy.data.multi_source import MultiSourceDataset
from adapt_deploy.data.pseudo_labels import PseudoLabelled
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.data.weak import (
    ClassStats,
    WeaklyLabelled,
    load_points,
    pixel_counts,
    point_set_path,
    seed_set_name,
    stats_path,
)
from adapt_deploy.errors import ConfigError, DatasetError, UserError
from adapt_deploy.progress import Reporter


def class_stats(
    dataset: SegmentationDataset, entry: DatasetConfig, num_classes: int, reporter: Reporter
) -> ClassStats:
    """A split's class pixel counts: read from beside the data, or computed and stored there."""
    path = stats_path(entry.root, entry.split)
    if path.is_file():
        stats = ClassStats.load(path)
        if set(stats.names) >= {s.name for s in dataset.samples}:  # else stale: recompute
            return stats
    with reporter.task(f"class statistics of {entry.root}", len(dataset)):
        counts = pixel_counts(dataset, num_classes, progress=lambda d, n: reporter.advance())
    stats = ClassStats([s.name for s in dataset.samples], counts)
    try:
        stats.save(path)
    except OSError:
        reporter.log(f"could not store class statistics in {path}; they are recomputed next time")
    return stats


def labelled_dataset(config: ExperimentConfig, method: type[Method], reporter: Reporter) -> Dataset:
    """Pixel-labelled batches: the source set, or the target train split for the oracle; with
    image-level labels from its statistics when the method's discriminators need them."""
    if method.trains_on_ranked_target:
        return ranked_target(config)[0]
    if config.data.sources:
        return multi_source_dataset(config)
    if method.name in MULTI_SOURCE_METHODS:
        raise ConfigError(
            f"train.method {method.name} trains on several sources: set data.sources to 2 or "
            "more entries ({kind, root, split, size}, as data.source)"
        )
    entry = config.data.target if method.name == "oracle" else config.data.source
    dataset = build_dataset(entry, labels=True, cache=config.data.cache)
    if not method.source_needs_image_labels:
        return dataset
    stats = class_stats(dataset, entry, config.model.num_classes, reporter)
    names = [s.name for s in dataset.samples]
    return WeaklyLabelled(dataset, stats.labels_for(names, config.adapt.image_labels))


def multi_source_dataset(config: ExperimentConfig) -> MultiSourceDataset:
    """data.sources as one dataset whose items say their source and the classes it labels."""
    entries = config.data.sources
    datasets = [build_dataset(e, labels=True, cache=config.data.cache) for e in entries]
    classes = [source_classes(e) for e in entries]
    return MultiSourceDataset(datasets, classes, config.model.num_classes)


def ranked_target(config: ExperimentConfig) -> tuple[Dataset, Dataset]:
    """IntraDA's (easy split with its pseudo-labels, hard split) of the target train split, as
    the rank file selftrain.rank lists them."""
    if not config.selftrain.rank:
        raise UserError(
            f"method {config.train.method} trains on a ranked target: set selftrain.rank to the "
            "rank.json `adapt-deploy rank CKPT --data TARGET --out DIR` writes"
        )
    rank = read_rank(Path(config.selftrain.rank), config.model.init)
    entry = config.data.target
    if rank["split"] != entry.split:
        raise UserError(
            f"{config.selftrain.rank} ranks split {rank['split']!r}, but data.target.split is "
            f"{entry.split!r}"
        )
    target = build_dataset(entry, labels=False, cache=config.data.cache)
    easy = PseudoLabelled(target.subset(rank["easy"]), Path(rank["labels_root"]), entry.split)
    return easy, target.subset(rank["hard"])


def source_class_counts(
    config: ExperimentConfig, labelled: Dataset, reporter: Reporter
) -> np.ndarray:
    """(images, classes) pixel counts of the labelled set, in its sample order: what rare-class
    sampling draws source images by (stored beside the data as `data stats` stores them)."""
    base = labelled.base if isinstance(labelled, WeaklyLabelled) else labelled
    entry = config.data.target if config.train.method == "oracle" else config.data.source
    stats = class_stats(base, entry, config.model.num_classes, reporter)
    index = {name: i for i, name in enumerate(stats.names)}
    return stats.counts[[index[s.name] for s in base.samples]]


def target_dataset(config: ExperimentConfig, method: type[Method]) -> Dataset | None:
    """Target batches with exactly the labels the method may use (none for UDA methods)."""
    if not method.target_needs:
        return None
    if method.trains_on_ranked_target:
        return ranked_target(config)[1]
    entry = config.data.target
    dataset = build_dataset(entry, labels=False, cache=config.data.cache)
    if method.target_needs == "images":
        return dataset
    names = [s.name for s in dataset.samples]
    stats_file = stats_path(entry.root, entry.split)
    if not stats_file.is_file():
        raise DatasetError(
            f"method {method.name} needs image-level labels of the target, but {stats_file} "
            f"does not exist: run `adapt-deploy data stats {entry.root} --kind {entry.kind} "
            f"--split {entry.split}` (it reads the target's pixel labels once)"
        )
    labels = ClassStats.load(stats_file).labels_for(names, config.adapt.image_labels)
    if method.target_needs == "image_labels":
        return WeaklyLabelled(dataset, labels)
    points, sizes = target_points(config, method.name)
    return WeaklyLabelled(dataset, labels, points, sizes)


def target_points(
    config: ExperimentConfig, method: str
) -> tuple[dict[str, list[list[int]]], dict[str, list[int]]]:
    """The target train split's point set: adapt.points when named (imported answers), else
    the set drawn with adapt.point_seed; DatasetError saying how to make it when missing."""
    entry, a = config.data.target, config.adapt
    points_file = point_set_path(entry.root, entry.split, a.points or seed_set_name(a.point_seed))
    if not points_file.is_file():
        how = (
            f"import an annotator's answers with `adapt-deploy data import-points "
            f"ROUND_DIR/answers.csv --name {a.points}`"
            if a.points
            else f"run `adapt-deploy data points {entry.root} --kind {entry.kind} "
            f"--split {entry.split} --seed {a.point_seed}`"
        )
        raise DatasetError(
            f"method {method} needs point labels of the target, but {points_file} does not "
            f"exist: {how}"
        )
    return load_points(points_file)
