"""Small datasets written in the official layouts, for loader, training and CLI tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from adapt_deploy.labels import PALETTE, TRAIN_TO_LABEL_LUT

# Class bands from top to bottom: sky, building, vegetation, car, sidewalk, road (trainIds).
BANDS = (10, 2, 8, 13, 1, 0)


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of horizontal class bands at random heights and its trainId map."""
    cuts = np.sort(rng.choice(np.arange(4, height - 4), len(BANDS) - 1, replace=False))
    bounds = [0, *cuts.tolist(), height]
    label = np.zeros((height, width), np.uint8)
    for train_id, top, bottom in zip(BANDS, bounds[:-1], bounds[1:], strict=True):
        label[top:bottom] = train_id
    label[: height // 8, : width // 8] = 255  # an unlabelled corner
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(PALETTE)] = PALETTE
    image = colours[label].astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_gta5(root: Path, count: int, size: tuple[int, int] = (36, 64), seed: int = 0) -> Path:
    """GTA5 layout: images/NNNNN.png and palette labels/NNNNN.png holding labelIds."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        image, train_ids = scene(rng, *size)
        cv2.imwrite(str(root / "images" / f"{i + 1:05d}.png"), image[:, :, ::-1])
        label = Image.fromarray(TRAIN_TO_LABEL_LUT[train_ids], mode="P")
        label.putpalette([v for c in PALETTE for v in c])
        label.save(root / "labels" / f"{i + 1:05d}.png")
    return root


def write_cityscapes(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 64), seed: int = 1
) -> Path:
    """Cityscapes layout: leftImg8bit/{split}/{city}/ and gtFine/{split}/{city}/ labelIds."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        city = f"town{split}"
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for i in range(count):
            image, train_ids = scene(rng, *size)
            stem = f"{city}_{i:06d}_000019"
            path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            cv2.imwrite(str(path), image[:, :, ::-1])
            label = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            cv2.imwrite(str(label), TRAIN_TO_LABEL_LUT[train_ids])
    return root


@pytest.fixture
def gta5_root(tmp_path: Path) -> Path:
    return write_gta5(tmp_path / "gta5", 6)


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    return write_cityscapes(tmp_path / "cityscapes", {"train": 6, "val": 3})


@pytest.fixture
def tiny_config_file(tmp_path: Path, gta5_root: Path, cityscapes_root: Path) -> Path:
    """A CPU-tiny training config over the two tiny datasets."""
    text = f"""
name: tiny
data:
  source: {{kind: gta5, root: {gta5_root}, size: [36, 64]}}
  target: {{kind: cityscapes, root: {cityscapes_root}, split: train, size: [32, 64]}}
  val: {{kind: cityscapes, root: {cityscapes_root}, split: val, size: [32, 64]}}
  num_workers: 0
  cache: true
input: {{color_order: RGB, mean: [123.7, 116.3, 103.5], std: [58.4, 57.1, 57.4]}}
model: {{backbone: resnet18, width: 8, freeze_bn: false}}
optim: {{lr: 0.01, schedule_iters: 20, grad_clip: 0.0}}
train: {{iterations: 20, batch_size: 2, log_every: 1, checkpoint_every: 5, device: cpu}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported bundle of a random ResNet-18 DeepLab (width 8): fp32 + fp16, NHWC uint8
    input, shapes min 1x16x16, opt 1x64x96, max 4x256x512 (larger frames are resized by the
    runtime). The checkpoint lies beside it as `tiny.pt` (what the torch backend loads)."""
    from helpers import TINY_SHAPES, write_checkpoint

    from adapt_deploy.export.pipeline import export_bundle

    work = tmp_path_factory.mktemp("tiny_bundle")
    checkpoint = write_checkpoint(work / "tiny.pt")
    return export_bundle(checkpoint, work / "bundle", fp16=True, shapes=TINY_SHAPES).bundle


def method_overrides(method: str, config_file: Path, work: Path) -> list[str]:
    """The overrides a method needs beyond its name to train on `config_file`'s data: IntraDA
    starts from a model whose ranking of the target it reads, so one is trained (a single
    source-only iteration on the CPU) and ranked under `work`; a multi-source method trains on
    two sources (the config's source twice, the second labelling 18 classes); others need none."""
    from adapt_deploy.adapt.ranking import rank_target
    from adapt_deploy.config import MULTI_SOURCE_METHODS, load_config
    from adapt_deploy.engine.train import train
    from adapt_deploy.registry import METHODS

    if method in MULTI_SOURCE_METHODS:  # two sources: the GTA5 set, once without class 9
        source = load_config(config_file).data.source
        entry = f"kind: {source.kind}, root: {source.root}, size: {source.size}"
        classes = [c for c in range(19) if c != 9]
        return [f"data.sources=[{{{entry}}}, {{{entry}, classes: {classes}}}]"]
    if not METHODS.load(method).trains_on_ranked_target:
        return []
    base = ["train.method=source_only", "train.iterations=1", "train.device=cpu"]
    config = load_config(config_file, base)
    inter = train(config, work / "inter_domain", evaluate_at_end=False).checkpoint
    rank_target(inter, Path(config.data.target.root), work / "rank", easy_share=0.5)
    return [f"model.init={inter}", f"selftrain.rank={work / 'rank' / 'rank.json'}"]
