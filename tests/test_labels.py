import numpy as np

from adapt_deploy.labels import (
    CITYSCAPES_LABEL_TO_TRAIN,
    CLASS_NAMES,
    PALETTE,
    colorize,
    label_ids_to_train_ids,
    train_ids_to_label_ids,
)


def test_tables_have_nineteen_classes():
    assert len(CLASS_NAMES) == len(PALETTE) == 19
    assert sorted(CITYSCAPES_LABEL_TO_TRAIN.values()) == list(range(19))


def test_label_ids_map_to_train_ids_and_everything_else_is_ignored():
    label_ids = np.array([[7, 8, 26, 33], [0, 1, 6, 34]], np.uint8)
    expected = np.array([[0, 1, 13, 18], [255, 255, 255, 255]], np.uint8)
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), expected)


def test_train_ids_round_trip_through_label_ids():
    train_ids = np.arange(19, dtype=np.uint8)
    np.testing.assert_array_equal(
        label_ids_to_train_ids(train_ids_to_label_ids(train_ids)), train_ids
    )


def test_colorize_uses_the_palette_and_blacks_out_ignored_pixels():
    rgb = colorize(np.array([[0, 255]], np.uint8))
    assert tuple(rgb[0, 0]) == PALETTE[0]
    assert tuple(rgb[0, 1]) == (0, 0, 0)
