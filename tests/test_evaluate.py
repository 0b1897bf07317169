import math

import numpy as np
import torch

from adapt_deploy.engine.evaluate import confusion_matrix, iou_per_class, mean_iou


def test_confusion_matrix_counts_and_skips_ignored_pixels():
    labels = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 0]])
    preds = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    cm = confusion_matrix(labels, preds, 4)
    expected = np.zeros((4, 4), np.int64)
    for gt, pr in [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0), (1, 1), (0, 0)]:
        expected[gt, pr] += 1
    np.testing.assert_array_equal(cm.numpy(), expected)


def test_miou_by_hand_with_absent_classes_excluded():
    # rows: ground truth, columns: prediction; class 3 neither present nor predicted.
    cm = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    # IoU: class 0 = 3 / (4 + 4 - 3) = 0.6; class 1 = 2 / (3 + 2 - 2) = 2/3; class 2 = 1 / 2.
    ious = iou_per_class(cm)
    np.testing.assert_allclose(ious[:3], [0.6, 2 / 3, 0.5])
    assert math.isnan(ious[3])
    assert math.isclose(mean_iou(cm), (0.6 + 2 / 3 + 0.5) / 3)


def test_a_predicted_but_absent_class_counts_as_zero():
    cm = np.array([[1, 1], [0, 0]])
    np.testing.assert_allclose(iou_per_class(cm), [0.5, 0.0])
    assert mean_iou(cm) == 0.25


def test_synthia_protocol_reports_16_and_13_class_means():
    from adapt_deploy.engine.evaluate import EvalResult

    confusion = np.diag(np.arange(1, 20)).astype(np.int64)  # every class perfect...
    confusion[9, 9] = 0
    confusion[9, 0] = 5  # ...but terrain (9), which SYNTHIA's protocols leave out
    confusion[3, 3], confusion[3, 0] = 0, 5  # and wall (3), which only the 13-class one drops
    result = EvalResult(confusion, [str(i) for i in range(19)], "synthia16")
    assert set(result.mious) == {"mIoU-16", "mIoU-13"}
    # Road: 1 / (1 + 10) = 1/11 (ten pixels wrongly called road); wall: 0; the rest perfect.
    assert math.isclose(result.mious["mIoU-16"], (14 + 1 / 11) / 16)
    assert math.isclose(result.mious["mIoU-13"], (12 + 1 / 11) / 13)
    assert result.miou == result.mious["mIoU-16"]
    assert result.to_dict()["protocol"] == "synthia16"
