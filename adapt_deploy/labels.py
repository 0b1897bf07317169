"""Cityscapes class tables: names, palette and the labelId/trainId maps used by every dataset."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
EGO_VEHICLE_LABEL_ID = 1  # Cityscapes/GTA5 labelId of the ego vehicle (trainId 255, ignored)

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)

# The official Cityscapes colours, indexed by trainId.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# Cityscapes labelId -> trainId; every other labelId is ignored. GTA5 uses the same labelIds.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# SYNTHIA-RAND-CITYSCAPES class id (channel 0 of GT/LABELS) -> trainId.
SYNTHIA_LABEL_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

# SYNTHIA's evaluation protocols: 16 classes (no terrain, truck, train) and 13 (also no wall,
# fence, pole), as trainIds.
SYNTHIA_16_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
SYNTHIA_13_CLASSES = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))
# Evaluation protocol -> the named class subsets whose mIoU is reported (the first is headline).
EVAL_PROTOCOLS: dict[str, dict[str, tuple[int, ...]]] = {
    "cityscapes19": {"mIoU": tuple(range(NUM_CLASSES))},
    "synthia16": {"mIoU-16": SYNTHIA_16_CLASSES, "mIoU-13": SYNTHIA_13_CLASSES},
}


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A uint8 table of `size` entries mapping ids through `mapping`, everything else to 255."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table


LABEL_TO_TRAIN_LUT = lookup_table(CITYSCAPES_LABEL_TO_TRAIN)
TRAIN_TO_LABEL_LUT = lookup_table({t: s for s, t in CITYSCAPES_LABEL_TO_TRAIN.items()})
TRAIN_TO_LABEL_LUT[IGNORE_INDEX] = 0  # "unlabeled" in Cityscapes


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes/GTA5 labelId image to trainIds (255 where ignored)."""
    return LABEL_TO_TRAIN_LUT[label_ids.astype(np.intp, copy=False)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map a trainId image back to Cityscapes labelIds (255 becomes 0, "unlabeled")."""
    return TRAIN_TO_LABEL_LUT[train_ids.astype(np.intp, copy=False)]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """An RGB uint8 rendering of a trainId map in the Cityscapes palette (ignored pixels black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)
    return table[train_ids.astype(np.intp, copy=False)]
