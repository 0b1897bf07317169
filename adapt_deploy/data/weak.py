"""Weak labels of the target domain: pseudo-weak (Eq. 7), oracle image-level and point labels.

Image-level labels follow the official WDA code: a class is present in an image when its pixel
count exceeds 0.1 x the dataset's mean per-image count of that class, that mean being taken
over the images where the class passes the same test (a fixed point, iterated ten times).
`adapt-deploy data stats` computes the per-image counts once and stores them beside the data;
point labels (one random pixel per class present in the ground truth) are drawn once per seed
and stored there too, so every run of a method sees the same annotation.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from adapt_deploy.atomic import atomic_write
from adapt_deploy.data.segmentation import SegmentationDataset, image_size
from adapt_deploy.errors import DatasetError
from adapt_deploy.labels import IGNORE_INDEX

PRESENCE_FRACTION = 0.1  # official PER_TH
PSEUDO_THRESHOLD = 0.2  # official pweak_th
STATS_DIR = "adapt_deploy_labels"
IMAGE_LABEL_MODES = ("fraction", "any")


def pseudo_weak_labels(lse: torch.Tensor, threshold: float = PSEUDO_THRESHOLD) -> torch.Tensor:
    """Eq. 7: y_c = [sigmoid(lse_c) > T] from detached LSE-pooled logits, as float (N, C)."""
    return (torch.sigmoid(lse.detach()) > threshold).float()


def stats_path(root: str | Path, split: str) -> Path:
    """Where `adapt-deploy data stats` keeps a split's per-image class pixel counts."""
    return Path(root) / STATS_DIR / f"{split}_pixel_counts.npz"


def point_set_path(root: str | Path, split: str, name: str) -> Path:
    """Where the point set `name` of a split is kept: drawn (`seedS`) or imported answers."""
    return Path(root) / STATS_DIR / f"{split}_points_{name}.json"


def points_path(root: str | Path, split: str, seed: int) -> Path:
    """Where the point labels of a split and seed are kept (the point set `seedS`)."""
    return point_set_path(root, split, seed_set_name(seed))


def seed_set_name(seed: int) -> str:
    """The name of the point set `adapt-deploy data points --seed S` draws."""
    return f"seed{seed}"


def pixel_counts(
    dataset: SegmentationDataset,
    num_classes: int,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """(images, classes) int64 pixel counts of each class in each full-resolution label."""
    counts = np.zeros((len(dataset), num_classes), np.int64)
    for i, sample in enumerate(dataset.samples):
        if sample.label is None:
            raise DatasetError(f"{sample.image} has no label: class statistics need labels")
        train_ids = dataset.train_ids(sample)
        counts[i] = np.bincount(train_ids.reshape(-1), minlength=256)[:num_classes]
        if progress is not None:
            progress(i + 1, len(dataset))
    return counts


def presence_thresholds(
    counts: np.ndarray, fraction: float = PRESENCE_FRACTION, rounds: int = 10
) -> np.ndarray:
    """Per class: `fraction` x the mean count over images that pass that same threshold."""
    means = np.zeros(counts.shape[1])
    for _ in range(rounds):
        for c in range(counts.shape[1]):
            passing = counts[counts[:, c] > fraction * means[c], c]
            means[c] = passing.mean() if passing.size else 0.0
    return fraction * means


def image_labels(counts: np.ndarray, mode: str = "fraction") -> np.ndarray:
    """(images, classes) float32 image-level labels from pixel counts (`fraction` or `any`)."""
    if mode not in IMAGE_LABEL_MODES:
        raise ValueError(f"image label mode must be one of {IMAGE_LABEL_MODES}, got {mode!r}")
    threshold = presence_thresholds(counts) if mode == "fraction" else np.zeros(counts.shape[1])
    return (counts > threshold).astype(np.float32)


@dataclass
class ClassStats:
    """Per-image class pixel counts of one split, keyed by sample name."""

    names: list[str]
    counts: np.ndarray

    def save(self, path: Path) -> None:
        """Write atomically (npz of names and counts; no pickled objects)."""
        buffer = io.BytesIO()
        np.savez(buffer, names=np.asarray(self.names, dtype=str), counts=self.counts)
        atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ClassStats:
        """Read what `save` wrote; DatasetError saying how to make it when missing."""
        if not path.is_file():
            raise DatasetError(
                f"class statistics not found: {path}\n"
                "image-level labels need them: run `adapt-deploy data stats ROOT --split SPLIT`"
            )
        with np.load(path, allow_pickle=False) as data:
            return cls([str(n) for n in data["names"]], data["counts"].astype(np.int64))

    def labels_for(self, names: list[str], mode: str = "fraction") -> np.ndarray:
        """Image-level labels in the order of `names`; every name must have statistics."""
        table = image_labels(self.counts, mode)
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise DatasetError(
                f"class statistics lack {len(missing)} images (e.g. {missing[0]}); "
                "rerun `adapt-deploy data stats` for this split"
            )
        return table[[index[n] for n in names]]


def draw_points(
    dataset: SegmentationDataset,
    seed: int,
    num_classes: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[list[int]]]:
    """One uniformly random pixel per class present in each label: {name: [[class, y, x]]},
    coordinates at the label's own resolution."""
    rng = np.random.default_rng(seed)
    points: dict[str, list[list[int]]] = {}
    for sample in dataset.samples:
        if sample.label is None:
            raise DatasetError(f"{sample.image} has no label: point labels are drawn from labels")
        train_ids = dataset.train_ids(sample)
        chosen = []
        for c in range(num_classes):
            ys, xs = np.nonzero(train_ids == c)
            if ys.size:
                k = int(rng.integers(ys.size))
                chosen.append([c, int(ys[k]), int(xs[k])])
        points[sample.name] = chosen
        if progress is not None:
            progress(len(points), len(dataset))
    return points


def save_points(points: dict[str, list[list[int]]], sizes: dict[str, list[int]], path: Path):
    """Write point labels with each label's (height, width), atomically, as JSON."""
    atomic_write(path, json.dumps({"points": points, "sizes": sizes}))


def load_points(path: Path) -> tuple[dict[str, list[list[int]]], dict[str, list[int]]]:
    """Read a points file; DatasetError saying how to make it when missing or malformed."""
    if not path.is_file():
        raise DatasetError(
            f"point labels not found: {path}\n"
            "make them with `adapt-deploy data points ROOT --split SPLIT --seed SEED`"
        )
    try:
        data = json.loads(path.read_text())
        return data["points"], data["sizes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a points file ({exc})") from None


def point_map(
    points: list[list[int]], label_size: list[int], size: tuple[int, int]
) -> torch.Tensor:
    """(H, W) int64 map at the training `size`: the class at each point, 255 elsewhere (where
    several points fall on one cell, the last listed wins)."""
    height, width = size
    out = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
    if points:
        table = np.asarray(points, dtype=np.int64).reshape(-1, 3)
        ys = np.minimum(height - 1, table[:, 1] * height // label_size[0])
        xs = np.minimum(width - 1, table[:, 2] * width // label_size[1])
        out[ys, xs] = table[:, 0]  # numpy assigns repeated indices in order: the last wins
    return torch.from_numpy(out)


class WeaklyLabelled(Dataset):
    """A dataset whose samples also carry `image_labels` (C,) and/or a `points` map (H, W)."""

    def __init__(
        self,
        base: SegmentationDataset,
        image_labels: np.ndarray | None = None,
        points: dict[str, list[list[int]]] | None = None,
        label_sizes: dict[str, list[int]] | None = None,
    ) -> None:
        self.base = base
        self.image_labels = image_labels
        self.points = points
        self.label_sizes = label_sizes or {}
        if points is not None:
            missing = [s.name for s in base.samples if s.name not in points]
            if missing:
                raise DatasetError(
                    f"the points file lacks {len(missing)} images (e.g. {missing[0]}); "
                    "redraw it with `adapt-deploy data points`"
                )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, object]:
        item = dict(self.base[index])
        if self.image_labels is not None:
            item["image_labels"] = torch.from_numpy(self.image_labels[index])
        if self.points is not None:
            name = self.base.samples[index].name
            size = tuple(item["image"].shape[-2:])
            item["points"] = point_map(self.points[name], self.label_sizes[name], size)
        return item


def _labelled_split(root: str | Path, kind: str, split: str) -> SegmentationDataset:
    from adapt_deploy.config import DATASET_KINDS, DatasetConfig
    from adapt_deploy.data.datasets import build_dataset

    if kind not in DATASET_KINDS:
        raise DatasetError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
    # Only the full-resolution labels are read, so the resize size is irrelevant here.
    return build_dataset(DatasetConfig(kind, str(root), split, [1, 1]), labels=True)


def write_class_stats(
    root: str | Path,
    kind: str,
    split: str,
    num_classes: int = 19,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, ClassStats]:
    """`adapt-deploy data stats`: per-image class pixel counts of a labelled split, stored
    beside the data for the image-level label rule."""
    dataset = _labelled_split(root, kind, split)
    stats = ClassStats(
        [s.name for s in dataset.samples], pixel_counts(dataset, num_classes, progress)
    )
    path = stats_path(root, split)
    stats.save(path)
    return path, stats


def write_points(
    root: str | Path,
    kind: str,
    split: str,
    seed: int,
    num_classes: int = 19,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, int]:
    """`adapt-deploy data points`: draw and store one point per present class and image."""
    dataset = _labelled_split(root, kind, split)
    points = draw_points(dataset, seed, num_classes, progress)
    sizes = {s.name: list(image_size(s.label)) for s in dataset.samples if s.label is not None}
    path = points_path(root, split, seed)
    save_points(points, sizes, path)
    return path, sum(len(p) for p in points.values())
