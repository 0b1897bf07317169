"""bench/pseudo_label_quality.py: precision and recall of a label set per class group."""

from __future__ import annotations

import numpy as np

from adapt_deploy.labels import CLASS_NAMES
from bench.pseudo_label_quality import GROUPS, Quality

ROAD, CAR = CLASS_NAMES.index("road"), CLASS_NAMES.index("car")


def test_precision_and_recall_count_labelled_and_ground_truth_pixels_per_group():
    assert ROAD in GROUPS["camera-toned"] and CAR in GROUPS["recoloured"]
    truth = np.array([[ROAD, ROAD, ROAD, CAR], [CAR, CAR, 255, ROAD]], np.uint8)
    labels = np.array([[ROAD, ROAD, 255, ROAD], [CAR, 255, ROAD, 255]], np.uint8)
    quality = Quality()
    quality.add(labels, truth)
    # Road: 3 labelled (2 right, 1 on a car), 4 in the ground truth; the pixel whose truth is
    # unlabelled does not count. Car: 1 labelled and right, 3 in the ground truth.
    assert quality.row() == ["57%", "66.7", "50.0", "100.0", "33.3"]
