"""Pseudo-label sets on disk: labelIds PNGs in the Cityscapes layout, plus the records that say
what made them and whether the set is whole.

    DIR/job.json                                      what the set is of (model, data, portion)
    DIR/predictions/{city}/{stem}_class.png           first pass: argmax (uint8)
    DIR/predictions/{city}/{stem}_conf.png            and max probability (uint16, x 65535)
    DIR/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png   the labels (0: unlabelled)
    DIR/summary.json                                  written last: the set is complete

A set without summary.json is half-written and never read as labels; writing it again with the
same job.json continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from adapt_deploy.atomic import atomic_write, atomic_write_json
from adapt_deploy.data.segmentation import Sample, SegmentationDataset
from adapt_deploy.errors import DatasetError, UserError
from adapt_deploy.labels import label_ids_to_train_ids, train_ids_to_label_ids

JOB = "job.json"
SUMMARY = "summary.json"
PREDICTIONS = "predictions"
CONFIDENCE_SCALE = 65535  # max probability stored as uint16
LABEL_SUFFIX = "_gtFine_labelIds.png"
NO_CITY = "pseudo"  # the city folder of samples whose name has none (non-Cityscapes targets)


def _parts(name: str) -> tuple[str, str]:
    city, sep, stem = name.rpartition("/")
    return (city if sep else NO_CITY), stem


def label_path(root: Path, split: str, name: str) -> Path:
    """Where the label of sample `name` ("city/stem", as the Cityscapes loader names it) goes."""
    city, stem = _parts(name)
    return Path(root) / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}"


def prediction_paths(root: Path, name: str) -> tuple[Path, Path]:
    """The first pass's (class, confidence) PNGs of sample `name`."""
    city, stem = _parts(name)
    folder = Path(root) / PREDICTIONS / city
    return folder / f"{stem}_class.png", folder / f"{stem}_conf.png"


def write_png(path: Path, array: np.ndarray) -> None:
    """A uint8 or uint16 single-channel PNG, written atomically."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, data.tobytes())


def read_png(path: Path, dtype: type) -> np.ndarray:
    """A single-channel PNG as `dtype`; DatasetError naming the file when it is unreadable."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 2 or array.dtype != dtype:
        raise DatasetError(f"{path}: unreadable or not a single-channel {np.dtype(dtype)} PNG")
    return array


def write_prediction(root: Path, name: str, classes: np.ndarray, confidence: np.ndarray) -> None:
    """Store one image's argmax and max probability (confidence in [0, 1])."""
    class_path, conf_path = prediction_paths(root, name)
    write_png(class_path, classes.astype(np.uint8))
    write_png(conf_path, np.round(confidence * CONFIDENCE_SCALE).astype(np.uint16))


def read_prediction(root: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(classes uint8, confidence uint16) of a stored prediction; None when not written yet."""
    class_path, conf_path = prediction_paths(root, name)
    if not (class_path.is_file() and conf_path.is_file()):
        return None
    return read_png(class_path, np.uint8), read_png(conf_path, np.uint16)


def write_label(root: Path, split: str, name: str, train_ids: np.ndarray) -> None:
    """A label in trainIds (255 ignored) as a Cityscapes labelIds PNG (0 where ignored)."""
    write_png(label_path(root, split, name), train_ids_to_label_ids(train_ids).astype(np.uint8))


def read_label(root: Path, split: str, name: str, size: tuple[int, int]) -> np.ndarray:
    """The pseudo-label of sample `name` in trainIds, resized (nearest) to `size` (H, W)."""
    path = label_path(root, split, name)
    if not path.is_file():
        raise DatasetError(
            f"pseudo-labels {root} have no label for {name} (expected {path}): they were made "
            "for another split or dataset; make them again for this one"
        )
    train_ids = label_ids_to_train_ids(read_png(path, np.uint8))
    if train_ids.shape != tuple(size):
        train_ids = cv2.resize(train_ids, size[::-1], interpolation=cv2.INTER_NEAREST)
    return train_ids


def start_job(root: Path, job: dict[str, Any]) -> None:
    """Record what `root` will hold; UserError when it already holds a set of another job."""
    path = Path(root) / JOB
    if path.is_file():
        found = json.loads(path.read_text())
        if found != job:
            differ = sorted(k for k in set(found) | set(job) if found.get(k) != job.get(k))
            raise UserError(
                f"{root} holds pseudo-labels of another job (they differ in {differ}); choose "
                "another output directory or delete that one"
            )
        return
    atomic_write_json(path, job)


def read_summary(root: Path) -> dict[str, Any] | None:
    """The summary of a complete set; None when the set is missing or half-written."""
    path = Path(root) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def require_complete(root: Path, split: str, names: list[str]) -> dict[str, Any]:
    """The summary of a complete set made for exactly these samples of `split`; UserError
    saying what is wrong otherwise (half-written, another split, other images)."""
    summary = read_summary(root)
    if summary is None:
        raise UserError(
            f"{root} holds no complete pseudo-label set (no {SUMMARY}: missing or half-written); "
            "run `adapt-deploy pseudo-label` (or `rank`) again to finish it"
        )
    if summary.get("split") != split or summary.get("images") != len(names):
        raise UserError(
            f"pseudo-labels {root} were made for split {summary.get('split')!r} with "
            f"{summary.get('images')} images, but the target split {split!r} has {len(names)}"
        )
    for name in names:
        if not label_path(root, split, name).is_file():
            read_label(root, split, name, (1, 1))  # raises naming the missing file
    return summary


class PseudoLabelled(Dataset):
    """Unlabelled images whose `label` comes from a complete pseudo-label set (IntraDA's easy
    split trains as a labelled source this way)."""

    def __init__(self, base: SegmentationDataset, root: Path, split: str) -> None:
        require_complete(root, split, [s.name for s in base.samples])
        self.base, self.root, self.split = base, Path(root), split

    @property
    def samples(self) -> list[Sample]:
        return self.base.samples

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, object]:
        item = dict(self.base[index])
        size = tuple(item["image"].shape[-2:])  # type: ignore[union-attr]
        label = read_label(self.root, self.split, str(item["name"]), size)  # type: ignore[arg-type]
        item["label"] = torch.from_numpy(label.astype(np.int64))
        return item
