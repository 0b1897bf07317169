from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import scene, write_cityscapes, write_gta5
from PIL import Image

from adapt_deploy.config import DatasetConfig
from adapt_deploy.data.cityscapes import cityscapes
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.gta5 import gta5
from adapt_deploy.errors import DatasetError
from adapt_deploy.labels import SYNTHIA_LABEL_TO_TRAIN
from adapt_deploy.registry import DATASET_LAYOUTS


def write_synthia(root: Path, count: int, size: tuple[int, int] = (36, 64)) -> Path:
    """SYNTHIA layout: RGB/NNNNNNN.png and 16-bit GT/LABELS/NNNNNNN.png, class id in R."""
    to_synthia = np.zeros(256, np.uint16)  # trainId -> SYNTHIA id; 255 -> 0 (void)
    for synthia_id, train_id in SYNTHIA_LABEL_TO_TRAIN.items():
        to_synthia[train_id] = synthia_id
    rng = np.random.default_rng(2)
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    for i in range(count):
        image, train_ids = scene(rng, *size)
        cv2.imwrite(str(root / "RGB" / f"{i:07d}.png"), image[:, :, ::-1])
        rgb = np.zeros((*size, 3), np.uint16)
        rgb[:, :, 0] = to_synthia[train_ids]
        cv2.imwrite(str(root / "GT" / "LABELS" / f"{i:07d}.png"), rgb[:, :, ::-1])  # BGR
    return root


# A tiny labelled set of each registered layout (train split), as its official layout stores it.
WRITERS = {
    "gta5": lambda root: write_gta5(root, 3),
    "cityscapes": lambda root: write_cityscapes(root, {"train": 3}),
    "synthia": lambda root: write_synthia(root, 3),
}


def test_every_registered_layout_is_tested():
    assert set(WRITERS) == set(DATASET_LAYOUTS.names())


@pytest.mark.parametrize("kind", DATASET_LAYOUTS.names())
def test_every_layout_builds_from_its_config_entry(tmp_path, kind):
    root = WRITERS[kind](tmp_path / kind)
    ds = build_dataset(DatasetConfig(kind, str(root), "train", [16, 32]))
    assert len(ds) == 3 and ds.has_labels
    item = ds[0]
    assert item["image"].shape == (3, 16, 32) and item["label"].shape == (16, 32)
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 8, 10, 13, 255}
    assert item["label"][-1, -1] == 0  # the road band, whatever the layout's label ids
    unlabelled = build_dataset(DatasetConfig(kind, str(root), "train", [16, 32]), labels=False)
    assert not unlabelled.has_labels and (unlabelled[0]["label"] == 255).all()


@pytest.mark.parametrize("kind", DATASET_LAYOUTS.names())
def test_every_layout_names_its_expected_layout_when_the_root_is_missing(tmp_path, kind):
    with pytest.raises(DatasetError, match="directory not found") as err:
        build_dataset(DatasetConfig(kind, str(tmp_path / "nope"), "train", [16, 32]))
    assert "expected layout" in str(err.value)


def test_gta5_layout_reads_palette_labels_as_train_ids(gta5_root):
    ds = gta5(gta5_root, size=None)
    assert len(ds) == 6 and ds.has_labels
    item = ds[0]
    assert item["image"].shape == (3, 36, 64) and str(item["image"].dtype) == "torch.uint8"
    values = set(item["label"].unique().tolist())
    assert values <= {0, 1, 2, 8, 10, 13, 255}
    assert item["label"][0, 0] == 255 and item["label"][-1, -1] == 0  # unlabelled corner, road


def test_cityscapes_layout_pairs_images_and_label_ids(cityscapes_root):
    ds = cityscapes(cityscapes_root, "val", size=None)
    assert len(ds) == 3
    assert ds.samples[0].name == "townval/townval_000000_000019"
    assert ds.samples[0].label.name.endswith("_gtFine_labelIds.png")
    assert ds[0]["label"][-1, -1] == 0  # labelId 7 (road) → trainId 0


def test_resizing_uses_nearest_labels_and_keeps_full_resolution_labels_on_request(cityscapes_root):
    ds = cityscapes(cityscapes_root, "train", size=(16, 32))
    item = ds[0]
    assert item["image"].shape == (3, 16, 32) and item["label"].shape == (16, 32)
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 8, 10, 13, 255}
    full = cityscapes(cityscapes_root, "train", size=(16, 32), resize_labels=False)[0]
    assert full["image"].shape == (3, 16, 32) and full["label"].shape == (32, 64)


def test_unlabelled_split_yields_ignore_labels(cityscapes_root):
    ds = cityscapes(cityscapes_root, "train", size=None, labels=False)
    assert not ds.has_labels and (ds[0]["label"] == 255).all()


def test_cache_returns_the_same_sample(gta5_root):
    ds = gta5(gta5_root, size=(18, 32), cache=True)
    assert ds[1] is ds[1]


@pytest.mark.parametrize(
    ("kind", "mislaid", "expected"),
    [
        ("cityscapes", "leftImg8bit", "leftImg8bit/{split}/{city}"),
        ("gta5", "images", "ROOT/images/{id}.png"),
    ],
)
def test_missing_directory_names_the_path_and_the_expected_layout(
    tmp_path, gta5_root, cityscapes_root, kind, mislaid, expected
):
    root = cityscapes_root if kind == "cityscapes" else gta5_root
    (root / mislaid).rename(root / "elsewhere")
    with pytest.raises(DatasetError) as err:
        build_dataset(DatasetConfig(kind, str(root), "train", [16, 32]))
    assert str(root / mislaid) in str(err.value) and expected in str(err.value)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="directory not found"):
        build_dataset(DatasetConfig("cityscapes", str(tmp_path / "nope"), "val", [16, 32]))


def test_label_of_another_size_names_both_files(gta5_root: Path):
    label = gta5_root / "labels" / "00002.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(DatasetError) as err:
        build_dataset(DatasetConfig("gta5", str(gta5_root), "train", [16, 32]))
    assert str(label) in str(err.value) and str(gta5_root / "images" / "00002.png") in str(
        err.value
    )


def test_missing_label_file_is_named(cityscapes_root: Path):
    victim = next((cityscapes_root / "gtFine" / "val").rglob("*_labelIds.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match=victim.name):
        cityscapes(cityscapes_root, "val")


def test_colour_label_image_is_rejected(gta5_root: Path):
    label = gta5_root / "labels" / "00001.png"
    Image.fromarray(np.zeros((36, 64, 3), np.uint8)).save(label)
    with pytest.raises(DatasetError, match="single-channel"):
        gta5(gta5_root, size=None)[0]


def test_synthia_layout_reads_the_class_id_from_the_first_channel(tmp_path):
    root = tmp_path / "synthia"
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    cv2.imwrite(str(root / "RGB" / "0000000.png"), np.zeros((8, 16, 3), np.uint8))
    rgb = np.zeros((8, 16, 3), np.uint16)
    rgb[:4, :, 0] = 3  # SYNTHIA road (id 3) in the R channel -> trainId 0
    rgb[4:, :, 0] = 10  # SYNTHIA person (id 10) -> trainId 11
    rgb[:, :, 1] = 999  # instance ids live in another channel and must be ignored
    cv2.imwrite(str(root / "GT" / "LABELS" / "0000000.png"), rgb[:, :, ::-1])  # OpenCV: BGR
    ds = build_dataset(DatasetConfig("synthia", str(root), "train", [8, 16]))
    label = ds[0]["label"]
    assert (label[:4] == 0).all() and (label[4:] == 11).all()
