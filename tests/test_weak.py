import json

import numpy as np
import pytest
import torch

from adapt_deploy.data.cityscapes import cityscapes
from adapt_deploy.data.weak import (
    ClassStats,
    WeaklyLabelled,
    image_labels,
    load_points,
    point_map,
    presence_thresholds,
    pseudo_weak_labels,
    stats_path,
    write_class_stats,
    write_points,
)
from adapt_deploy.errors import DatasetError


def test_pseudo_weak_labels_threshold_the_sigmoid_of_the_lse():
    lse = torch.tensor([[-2.0, -1.0, 0.0, 3.0]])  # sigmoid: 0.12, 0.27, 0.5, 0.95
    np.testing.assert_array_equal(pseudo_weak_labels(lse, 0.2).numpy(), [[0, 1, 1, 1]])
    assert not pseudo_weak_labels(lse.requires_grad_()).requires_grad


def test_presence_threshold_is_the_official_fixed_point():
    # Counts 0, 5, 100, 100: the 5-pixel image falls below 0.1 x the mean after the first
    # round, so the mean converges to 100 and the threshold to 10.
    counts = np.array([[0], [5], [100], [100]])
    np.testing.assert_allclose(presence_thresholds(counts), [10.0])
    np.testing.assert_array_equal(image_labels(counts)[:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(image_labels(counts, "any")[:, 0], [0, 1, 1, 1])


def test_absent_class_is_never_present():
    counts = np.zeros((3, 2), np.int64)
    counts[:, 0] = 7
    assert image_labels(counts)[:, 1].sum() == 0 and image_labels(counts)[:, 0].all()


def test_stats_round_trip_beside_the_data(cityscapes_root):
    path, stats = write_class_stats(cityscapes_root, "cityscapes", "train")
    assert path == stats_path(cityscapes_root, "train") and path.is_file()
    loaded = ClassStats.load(path)
    assert loaded.names == stats.names and (loaded.counts == stats.counts).all()
    assert stats.counts.shape == (6, 19) and stats.counts[:, 0].min() > 0  # road everywhere
    with pytest.raises(DatasetError, match="lack"):
        loaded.labels_for(["nowhere/none"])


def test_missing_stats_say_how_to_make_them(tmp_path):
    with pytest.raises(DatasetError, match="adapt-deploy data stats"):
        ClassStats.load(tmp_path / "absent.npz")


def test_points_one_per_present_class_fixed_per_seed(cityscapes_root):
    path, count = write_points(cityscapes_root, "cityscapes", "train", seed=3)
    points, sizes = load_points(path)
    first = json.loads(path.read_text())["points"]
    write_points(cityscapes_root, "cityscapes", "train", seed=3)
    assert json.loads(path.read_text())["points"] == first  # same seed, same points
    dataset = cityscapes(cityscapes_root, "train", size=None)
    for sample in dataset.samples:
        train_ids = dataset.train_ids(sample)
        chosen = points[sample.name]
        assert sorted(c for c, _, _ in chosen) == sorted(set(np.unique(train_ids)) - {255})
        assert all(train_ids[y, x] == c for c, y, x in chosen)
        assert sizes[sample.name] == list(train_ids.shape)
    assert count == sum(len(p) for p in points.values())


def test_point_map_scales_points_to_the_training_size():
    m = point_map([[3, 10, 20], [5, 31, 63]], [32, 64], (16, 32))
    assert m[5, 10] == 3 and m[15, 31] == 5 and (m != 255).sum() == 2


def test_weakly_labelled_dataset_adds_labels_and_points(cityscapes_root):
    path, _ = write_points(cityscapes_root, "cityscapes", "train", seed=0)
    points, sizes = load_points(path)
    base = cityscapes(cityscapes_root, "train", size=(16, 32), labels=False)
    labels = np.ones((len(base), 19), np.float32)
    item = WeaklyLabelled(base, labels, points, sizes)[0]
    assert item["image_labels"].shape == (19,) and item["points"].shape == (16, 32)
    assert (item["points"] != 255).sum() >= 1
    with pytest.raises(DatasetError, match="points file lacks"):
        WeaklyLabelled(base, labels, {}, {})


def test_source_calibrated_thresholds_separate_present_from_absent():
    from adapt_deploy.adapt.calibration import SourceCalibratedThresholds

    cal = SourceCalibratedThresholds(num_classes=3, threshold=0.2, momentum=0.5)
    global_cut = float(torch.logit(torch.tensor(0.2)))
    assert torch.allclose(cal.cuts(), torch.full((3,), global_cut))  # nothing seen yet
    # class 0 present with LSE ~12 and absent with ~4; class 1 always present; class 2 absent
    lse = torch.tensor([[12.0, 9.0, 3.0], [4.0, 9.0, 3.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    cal.update(lse, labels)
    cuts = cal.cuts()
    assert cuts[0] == 8.0  # halfway between the present and absent means
    assert cuts[1] == global_cut and cuts[2] == global_cut  # not seen both ways yet
    # T = 0.2 calls both images' class 0 present; the calibrated cut only the first
    assert (torch.sigmoid(lse[:, 0]) > 0.2).all()
    assert cal.labels(lse)[:, 0].tolist() == [1.0, 0.0]
    cal.update(torch.tensor([[10.0, 9.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert cal.cuts()[0] == 7.5  # present mean 12 -> 11 with momentum 0.5
