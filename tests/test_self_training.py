"""CBST/CRST pseudo-label sets, IntraDA's ranking, rare-class sampling, and their commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import StopAfter
from typer.testing import CliRunner

from adapt_deploy.adapt.pseudo_labelling import (
    LEVELS,
    class_histogram,
    class_thresholds,
    pseudo_label_checkpoint,
)
from adapt_deploy.adapt.ranking import (
    RANK_FILE,
    SCORES_FILE,
    rank_target,
    read_rank,
    split_by_score,
)
from adapt_deploy.adapt.self_training import ROUND_MODEL, ROUNDS_DIR, round_portion, round_starts
from adapt_deploy.cli import app
from adapt_deploy.config import load_config
from adapt_deploy.data import pseudo_labels as files
from adapt_deploy.engine.sampling import RareClassBatchSampler
from adapt_deploy.engine.train import train
from adapt_deploy.errors import DatasetError, UserError
from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX, label_ids_to_train_ids

runner = CliRunner()
TRAIN_NAMES = [f"towntrain/towntrain_{i:06d}_000019" for i in range(6)]


@pytest.fixture
def labeller(tmp_path: Path, tiny_config_file: Path) -> Path:
    """A checkpoint trained for two source-only iterations on the tiny data."""
    options = ["train.method=source_only", "train.iterations=2", "train.device=cpu"]
    config = load_config(tiny_config_file, options)
    return train(config, tmp_path / "labeller", evaluate_at_end=False).checkpoint


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_class_thresholds_keep_the_top_portion_of_each_class():
    histogram = np.zeros((3, LEVELS), np.int64)
    histogram[0, 100:110] = 1  # ten pixels at confidence levels 100..109
    histogram[2, 5] = 3  # three pixels tied at level 5
    thresholds = class_thresholds(histogram, 0.2)
    assert thresholds[0] == 108  # the 2 most confident of 10
    assert thresholds[1] == LEVELS  # never predicted: never labelled
    assert thresholds[2] == 5  # ceil(0.6) = 1 pixel, and ties at the threshold are kept
    assert class_thresholds(histogram, 1.0)[0] == 100


def test_class_histogram_counts_pixels_by_class_and_confidence():
    classes = np.array([[0, 1], [1, 1]], np.uint8)
    confidence = np.array([[7, 7], [9, 7]], np.uint16)
    histogram = class_histogram(classes, confidence, 2)
    assert histogram.shape == (2, LEVELS) and histogram.sum() == 4
    assert histogram[0, 7] == 1 and histogram[1, 7] == 2 and histogram[1, 9] == 1


def test_a_pseudo_label_set_is_in_the_cityscapes_layout_with_exact_per_class_counts(
    tmp_path, labeller, cityscapes_root
):
    out = tmp_path / "labels"
    summary = pseudo_label_checkpoint(labeller, cityscapes_root, out, 0.3)
    assert summary["split"] == "train" and summary["images"] == 6 and summary["portion"] == 0.3
    labelled = np.zeros(len(CLASS_NAMES), np.int64)
    predicted = np.zeros(len(CLASS_NAMES), np.int64)
    lowest_kept = np.full(len(CLASS_NAMES), LEVELS)
    highest_dropped = np.full(len(CLASS_NAMES), -1)
    for name in TRAIN_NAMES:
        path = out / "gtFine" / "train" / f"{name}_gtFine_labelIds.png"
        label_ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert label_ids.dtype == np.uint8 and label_ids.shape == (32, 64)  # the image's size
        train_ids = label_ids_to_train_ids(label_ids)
        labelled += np.bincount(train_ids.ravel(), minlength=256)[: len(CLASS_NAMES)]
        classes, confidence = files.read_prediction(out, name)
        predicted += np.bincount(classes.ravel(), minlength=len(CLASS_NAMES))
        kept = train_ids != IGNORE_INDEX
        assert np.array_equal(train_ids[kept], classes[kept])  # a label is the argmax
        for c in np.unique(classes):
            at = classes == c
            if (at & kept).any():
                lowest_kept[c] = min(lowest_kept[c], confidence[at & kept].min())
            if (at & ~kept).any():
                highest_dropped[c] = max(highest_dropped[c], confidence[at & ~kept].max())
    assert (highest_dropped < lowest_kept).all()  # one threshold per class separates them
    assert predicted.sum() == 6 * 32 * 64
    for index, name in enumerate(CLASS_NAMES):
        info = summary["classes"][name]
        assert info["predicted_pixels"] == predicted[index]
        assert info["labelled_pixels"] == labelled[index]
        if predicted[index]:
            assert labelled[index] >= math.ceil(0.3 * predicted[index])
        else:
            assert info["threshold"] is None and labelled[index] == 0
    assert 0.3 <= summary["labelled_share"] < 0.6


def test_an_interrupted_set_is_never_read_and_resumes_to_the_same_labels(
    tmp_path, labeller, cityscapes_root
):
    whole = tmp_path / "whole"
    pseudo_label_checkpoint(labeller, cityscapes_root, whole, 0.5)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        pseudo_label_checkpoint(labeller, cityscapes_root, part, 0.5, reporter=StopAfter("pre", 3))
    with pytest.raises(UserError, match="half-written"):
        files.require_complete(part, "train", TRAIN_NAMES)
    with pytest.raises(KeyboardInterrupt):  # the second pass stops half-way too
        pseudo_label_checkpoint(labeller, cityscapes_root, part, 0.5, reporter=StopAfter("ps", 2))
    assert files.read_summary(part) is None
    resumed = StopAfter("none", 99)
    pseudo_label_checkpoint(labeller, cityscapes_root, part, 0.5, reporter=resumed)
    assert not any(task.startswith("predicting") and n for task, n in resumed.counts.items())
    assert tree(part) == tree(whole)
    files.require_complete(part, "train", TRAIN_NAMES)


def test_a_folder_of_another_job_or_split_is_refused(tmp_path, labeller, cityscapes_root):
    out = tmp_path / "labels"
    pseudo_label_checkpoint(labeller, cityscapes_root, out, 0.3)
    with pytest.raises(UserError, match=r"another job .*'portion'"):
        pseudo_label_checkpoint(labeller, cityscapes_root, out, 0.4)
    with pytest.raises(UserError, match=r"split .train. with 6 images.*.val. has 3"):
        files.require_complete(out, "val", ["townval/a", "townval/b", "townval/c"])
    others = [f"elsewhere/x_{i}" for i in range(6)]
    with pytest.raises(DatasetError, match="no label for elsewhere/x_0"):
        files.require_complete(out, "train", others)


@pytest.mark.parametrize("portion", [0.0, -0.2, 1.5])
def test_a_portion_outside_zero_to_one_is_refused(tmp_path, portion):
    with pytest.raises(UserError, match=r"--portion must be in \(0, 1\]"):
        pseudo_label_checkpoint(tmp_path / "missing.pt", tmp_path, tmp_path / "o", portion)


def test_the_portion_grows_per_round_up_to_its_maximum():
    portions = [round_portion(r, 0.2, 0.05, 0.5) for r in range(8)]
    assert portions == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5]
    assert round_starts(10, 3) == [0, 3, 6]


def test_cbst_labels_a_set_per_round_with_the_model_that_made_it(tmp_path, tiny_config_file):
    options = ["train.method=cbst", "train.iterations=6", "selftrain.rounds=3"]
    config = load_config(tiny_config_file, options)
    train(config, tmp_path / "run", evaluate_at_end=False)
    for index, portion in enumerate([0.2, 0.25, 0.3]):
        folder = tmp_path / "run" / ROUNDS_DIR / f"round_{index + 1}"
        summary = files.require_complete(folder, "train", TRAIN_NAMES)
        assert summary["portion"] == portion
        assert f"iteration {2 * index}" in summary["model"]
        assert (folder / ROUND_MODEL).is_file()


def test_split_by_score_is_deterministic_with_ties_broken_by_name():
    scores = {"c": 0.5, "a": 0.5, "b": 0.1, "d": 0.9}
    assert split_by_score(scores, 0.5) == (["b", "a"], ["c", "d"])
    assert split_by_score(scores, 0.67) == (["b", "a", "c"], ["d"])


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5])
def test_a_lambda_outside_zero_to_one_is_refused(tmp_path, share):
    with pytest.raises(UserError, match="--lambda must be between 0 and 1"):
        rank_target(tmp_path / "missing.pt", tmp_path, tmp_path / "o", share)


def test_rank_writes_the_easy_labels_and_refuses_another_checkpoint(
    tmp_path, labeller, cityscapes_root, tiny_config_file
):
    record = rank_target(labeller, cityscapes_root, tmp_path / "rank", 0.5)
    assert len(record["easy"]) == 3 and len(record["hard"]) == 3
    assert sorted(record["easy"] + record["hard"]) == TRAIN_NAMES
    easy_scores = [record["scores"][n] for n in record["easy"]]
    assert max(easy_scores) <= min(record["scores"][n] for n in record["hard"])
    files.require_complete(tmp_path / "rank" / "pseudo_labels", "train", record["easy"])
    assert read_rank(tmp_path / "rank", str(labeller))["labels_root"].endswith("pseudo_labels")
    other = train(
        load_config(tiny_config_file, ["train.iterations=1", "train.device=cpu"]),
        tmp_path / "other",
        evaluate_at_end=False,
    ).checkpoint
    with pytest.raises(UserError, match="ranked with another checkpoint"):
        read_rank(tmp_path / "rank" / RANK_FILE, str(other))
    with pytest.raises(UserError, match=r"set model\.init"):
        read_rank(tmp_path / "rank" / RANK_FILE, None)
    (tmp_path / "bad.json").write_text(json.dumps({"easy": []}))
    with pytest.raises(UserError, match="not a rank file"):
        read_rank(tmp_path / "bad.json", str(labeller))


def test_a_stopped_ranking_continues_and_scores_only_the_images_left(
    tmp_path, labeller, cityscapes_root
):
    whole = rank_target(labeller, cityscapes_root, tmp_path / "whole", 0.5)
    out = tmp_path / "rank"
    with pytest.raises(KeyboardInterrupt):
        rank_target(labeller, cityscapes_root, out, 0.5, reporter=StopAfter("ranking", 2))
    assert not (out / RANK_FILE).exists()
    log = out / SCORES_FILE
    assert len(log.read_text().splitlines()) == 1 + 2  # the header, two images
    with log.open("a") as lines:
        lines.write('{"name": "towntrain/towntr')  # a line cut off by the stop
    resumed = StopAfter("none", 99)
    record = rank_target(labeller, cityscapes_root, out, 0.5, reporter=resumed)
    assert resumed.counts["ranking the target by entropy"] == 4
    assert record["scores"] == whole["scores"]
    assert (record["easy"], record["hard"]) == (whole["easy"], whole["hard"])
    again = StopAfter("none", 99)
    rank_target(labeller, cityscapes_root, out, 0.5, reporter=again)  # complete: nothing scored
    assert again.counts.get("ranking the target by entropy", 0) == 0


def test_a_score_log_of_another_checkpoint_is_refused(
    tmp_path, labeller, cityscapes_root, tiny_config_file
):
    out = tmp_path / "rank"
    rank_target(labeller, cityscapes_root, out, 0.5)
    other = train(
        load_config(tiny_config_file, ["train.iterations=1", "train.device=cpu"]),
        tmp_path / "other",
        evaluate_at_end=False,
    ).checkpoint
    before = (out / SCORES_FILE).read_text()
    with pytest.raises(
        UserError, match=r"scores.jsonl holds scores of another ranking .*checkpoint"
    ):
        rank_target(other, cityscapes_root, out, 0.5)
    assert (out / SCORES_FILE).read_text() == before
    (out / SCORES_FILE).write_text('{"checkpoint": 1}\n{"name": 3}\n{"name": "a", "score": 1}\n')
    with pytest.raises(UserError, match="another ranking"):
        rank_target(labeller, cityscapes_root, out, 0.5)


def counts_table() -> np.ndarray:
    """Per image (rows) pixel counts of 3 classes: class 2 is rare and only in image 3."""
    return np.array([[900, 100, 0], [800, 200, 0], [950, 50, 0], [700, 200, 100]])


def batches(sampler: RareClassBatchSampler, count: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_rare_class_sampling_is_seeded_resumable_and_sharded():
    full = batches(RareClassBatchSampler(counts_table(), 4, seed=3, temperature=0.1), 20)
    assert full == batches(RareClassBatchSampler(counts_table(), 4, seed=3, temperature=0.1), 20)
    assert full != batches(RareClassBatchSampler(counts_table(), 4, seed=4, temperature=0.1), 20)
    later = RareClassBatchSampler(counts_table(), 4, seed=3, temperature=0.1, start=7)
    assert batches(later, 13) == full[7:]
    shards = [
        batches(RareClassBatchSampler(counts_table(), 4, 3, 0.1, rank=r, world_size=2), 20)
        for r in range(2)
    ]
    assert [a + b for a, b in zip(*shards, strict=True)] == full


def test_rare_classes_are_drawn_far_above_their_pixel_share():
    sampler = RareClassBatchSampler(counts_table(), 8, seed=0, temperature=0.01)
    drawn = [i for batch in batches(sampler, 50) for i in batch]
    share_of_image_3 = drawn.count(3) / len(drawn)
    assert share_of_image_3 > 0.5  # uniform sampling would give 0.25
    assert set(drawn) <= {0, 1, 2, 3}
    with pytest.raises(UserError, match="no labelled pixel"):
        RareClassBatchSampler(np.zeros((2, 3)), 2, 0, 0.01)


def test_the_commands_label_and_rank_a_split(tmp_path, labeller, cityscapes_root):
    labelled = runner.invoke(
        app,
        ["pseudo-label", str(labeller), "--data", str(cityscapes_root),
         "--out", str(tmp_path / "pl"), "--portion", "0.25"],
    )  # fmt: skip
    assert labelled.exit_code == 0, labelled.output
    assert "threshold" in labelled.output and (tmp_path / "pl" / files.SUMMARY).is_file()
    ranked = runner.invoke(
        app,
        ["rank", str(labeller), "--data", str(cityscapes_root), "--out", str(tmp_path / "r"),
         "--lambda", "0.5"],
    )  # fmt: skip
    assert ranked.exit_code == 0, ranked.output
    assert "easy split: 3 images, hard split: 3" in ranked.output


def test_intrada_with_a_rank_of_another_checkpoint_fails_in_one_line(
    tmp_path, labeller, cityscapes_root, tiny_config_file
):
    rank_target(labeller, cityscapes_root, tmp_path / "rank", 0.5)
    other = train(
        load_config(tiny_config_file, ["train.iterations=1", "train.device=cpu"]),
        tmp_path / "other",
        evaluate_at_end=False,
    ).checkpoint
    options = [
        "train.method=intrada",
        f"model.init={other}",
        f"selftrain.rank={tmp_path / 'rank' / RANK_FILE}",
    ]
    with pytest.raises(UserError, match="ranked with another checkpoint"):
        train(load_config(tiny_config_file, options), tmp_path / "run", evaluate_at_end=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
