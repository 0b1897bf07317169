"""The dataset every layout loader returns: image/label pairs, resized, labels in trainIds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adapt_deploy.errors import DatasetError
from adapt_deploy.labels import IGNORE_INDEX

LabelMapper = Callable[[np.ndarray], np.ndarray]
LabelReader = Callable[[Path], np.ndarray]


@dataclass(frozen=True)
class LabelIds:
    """The ids a layout's label files hold: 0 .. count-1 (void classes included)."""

    name: str  # e.g. "Cityscapes labelIds"
    count: int


CITYSCAPES_IDS = LabelIds("Cityscapes/GTA5 labelIds", 34)  # 0 unlabeled .. 33 bicycle


@dataclass(frozen=True)
class Sample:
    """One image and, when the split is labelled, its label file."""

    name: str
    image: Path
    label: Path | None


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 HxWx3 array; DatasetError naming the file when it cannot be decoded."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot read image {path} (missing, unreadable or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label_ids(path: Path) -> np.ndarray:
    """A single-channel id image (8-bit grey or palette PNG: the palette index is the id)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"label {path} has mode {img.mode}; expected a single-channel id image "
                    "(8-bit grey or palette PNG holding labelIds)"
                )
            return np.asarray(img)
    except OSError as exc:
        raise DatasetError(f"cannot read label {path}: {exc}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


class SegmentationDataset(Dataset):
    """Samples as dicts: `image` uint8 (3, H, W) RGB, `label` int64 (H, W) trainIds, `name`.

    Images are resized to `size` (bicubic); labels too (nearest) unless `resize_labels` is
    False, as evaluation keeps labels at full resolution. `cache` keeps resized samples in
    memory for small datasets (use with num_workers=0).
    """

    def __init__(
        self,
        samples: list[Sample],
        to_train_ids: LabelMapper,
        size: tuple[int, int] | None = None,
        resize_labels: bool = True,
        cache: bool = False,
        read_label: LabelReader | None = None,
        label_ids: LabelIds = CITYSCAPES_IDS,
    ) -> None:
        self.samples = samples
        self.to_train_ids = to_train_ids
        self.read_label = read_label or read_label_ids
        self.label_ids = label_ids
        self.size = size
        self.resize_labels = resize_labels
        self._cache: dict[int, dict[str, object]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, names: list[str]) -> SegmentationDataset:
        """The same dataset restricted to the samples called `names`, in that order;
        DatasetError naming the first that is not in it."""
        by_name = {s.name: s for s in self.samples}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DatasetError(f"{missing[0]} is not a sample of this split ({len(self)} images)")
        return SegmentationDataset(
            [by_name[n] for n in names],
            self.to_train_ids,
            self.size,
            self.resize_labels,
            self._cache is not None,
            read_label=self.read_label,
            label_ids=self.label_ids,
        )

    @property
    def has_labels(self) -> bool:
        return all(s.label is not None for s in self.samples)

    def check_pairs(self) -> None:
        """Raise DatasetError naming both files when a label's size differs from its image's."""
        for s in self.samples:
            if s.label is not None and image_size(s.image) != image_size(s.label):
                ih, iw = image_size(s.image)
                lh, lw = image_size(s.label)
                raise DatasetError(
                    f"label {s.label} is {lw}x{lh} but its image {s.image} is {iw}x{ih}; "
                    "every label must have its image's size"
                )

    def __getitem__(self, index: int) -> dict[str, object]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self._load(self.samples[index])
        if self._cache is not None:
            self._cache[index] = item
        return item

    def train_ids(self, sample: Sample) -> np.ndarray:
        """A sample's full-resolution label in trainIds. DatasetError when not one pixel holds
        an id of the layout: a trainId or colour image in place of a label file would otherwise
        train silently on nothing but ignored pixels."""
        assert sample.label is not None
        ids = self.read_label(sample.label)
        train_ids = self.to_train_ids(ids)
        if ids.size and (train_ids == IGNORE_INDEX).all() and ids.min() >= self.label_ids.count:
            found = ", ".join(str(v) for v in np.unique(ids)[:5])
            raise DatasetError(
                f"label {sample.label}: no pixel holds one of the {self.label_ids.name} "
                f"(0-{self.label_ids.count - 1}); found {found}. Is it a trainId or colour "
                "image in place of the layout's label file?"
            )
        return train_ids

    def _load(self, sample: Sample) -> dict[str, object]:
        image = read_image(sample.image)
        if sample.label is not None:
            label = self.train_ids(sample)
            if label.shape != image.shape[:2]:
                raise DatasetError(
                    f"label {sample.label} is {label.shape[1]}x{label.shape[0]} but its image "
                    f"{sample.image} is {image.shape[1]}x{image.shape[0]}"
                )
        else:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        if self.size is not None:
            height, width = self.size
            if image.shape[:2] != (height, width):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
                if self.resize_labels:
                    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "name": sample.name,
        }


def require_dir(path: Path, what: str, layout: str) -> None:
    """DatasetError naming the expected layout when `path` is not a directory."""
    if not path.is_dir():
        raise DatasetError(f"{what}: directory not found: {path}\nexpected layout:\n{layout}")


def same_name_pairs(
    image_dir: Path, label_dir: Path | None, what: str, layout: str
) -> list[Sample]:
    """Every .png image of a flat layout, paired with the label of the same file name in
    `label_dir` (None: an unlabelled split)."""
    require_dir(image_dir, f"{what} images", layout)
    images = sorted(image_dir.glob("*.png"))
    if not images:
        raise DatasetError(f"no .png images under {image_dir}\nexpected layout:\n{layout}")
    if label_dir is not None:
        require_dir(label_dir, f"{what} labels", layout)
    samples = []
    for image in images:
        label = label_dir / image.name if label_dir is not None else None
        if label is not None and not label.is_file():
            raise DatasetError(f"label not found for {image}: expected {label}")
        samples.append(Sample(image.stem, image, label))
    return samples
