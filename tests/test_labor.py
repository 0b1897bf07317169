"""LabOR: pixel selection, the labelling round on disk, the import, and training in rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import StopAfter, assert_same_weights
from typer.testing import CliRunner

from adapt_deploy.adapt import point_selection as ps
from adapt_deploy.adapt.labor import LABELS_DIR, POINTS_FILE, SUMMARY_FILE, round_starts
from adapt_deploy.cli import app
from adapt_deploy.config import load_config
from adapt_deploy.data import annotation
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.weak import load_points, point_set_path
from adapt_deploy.engine.train import train
from adapt_deploy.errors import UserError
from adapt_deploy.labels import IGNORE_INDEX

runner = CliRunner()
NAME = "towntrain/towntrain_000000_000019"


def one_hot(classes: np.ndarray, num_classes: int = 4, sharp: float = 0.9) -> np.ndarray:
    """(C, H, W) probabilities with `sharp` on each pixel's class."""
    rest = (1 - sharp) / (num_classes - 1)
    probs = np.full((num_classes, *classes.shape), rest)
    np.put_along_axis(probs, classes[None], sharp, axis=0)
    return probs


def test_spl_asks_for_every_pixel_where_the_classifiers_disagree_and_no_other():
    a = np.zeros((8, 10), np.int64)
    b = a.copy()
    b[2:4, 3:7] = 1  # 8 pixels of disagreement
    taken = np.zeros_like(a, bool)
    taken[2, 3] = True  # labelled in an earlier round
    rng = np.random.default_rng(0)
    pixels = ps.select_pixels("spl", one_hot(a), one_hot(b), None, taken, rng)
    assert sorted(map(tuple, pixels)) == [(y, x) for y in (2, 3) for x in range(3, 7)][1:]
    # Capped: a uniform draw of the mask, never two neighbours, not the pixels where the two
    # classifiers differ most (here the mask's left half: they crowd onto a few classes).
    a = np.zeros((40, 40), np.int64)
    b = a.copy()
    b[:, 10:30] = 1  # 800 pixels of disagreement
    selector = one_hot(b)
    selector[:, :, 10:20] = one_hot(np.ones((40, 10), np.int64), sharp=1.0)  # surest there
    taken = np.zeros_like(a, bool)
    capped = ps.select_pixels("spl", one_hot(a), selector, 60, taken, rng)
    assert len(capped) == 60 and b[capped[:, 0], capped[:, 1]].all()
    gaps = np.abs(capped[:, None] - capped[None]).max(axis=2) + np.eye(60, dtype=np.int64) * 9
    assert gaps.min() >= 2  # no two neighbours: never two in one cell of half-size labels
    left = int((capped[:, 1] < 20).sum())
    assert 20 <= left <= 40  # about half in each half of the mask


def test_ppl_shares_the_budget_among_uncertain_classes_and_picks_each_prototype():
    classes = np.zeros((20, 20), np.int64)
    classes[:, 10:] = 2
    probs = one_hot(classes)
    selector = one_hot(np.full_like(classes, 1))  # disagrees everywhere
    # One pixel per half holds exactly its half's mean probabilities: the prototype.
    probs[:, 5, 5] = probs[:, classes == 0].mean(axis=1) + 0.0
    mean = (probs + selector) / 2
    taken = np.zeros(classes.shape, bool)
    pixels = ps.select_pixels("ppl", probs, selector, 6, taken, np.random.default_rng(0))
    assert len(pixels) == 6
    halves = [int(classes[y, x] == 2) for y, x in pixels]
    assert sorted(halves) == [0, 0, 0, 1, 1, 1]  # the budget shared by size: 3 and 3
    distances = np.linalg.norm(
        mean[:, classes == 0] - mean[:, classes == 0].mean(axis=1, keepdims=True), axis=0
    )
    left = [tuple(p) for p in pixels if classes[p[0], p[1]] == 0]
    nearest = np.argwhere(classes == 0)[np.argmin(distances)]
    assert tuple(nearest) == left[0] == (5, 5)  # the nearest to the prototype comes first
    spread = [max(abs(p[0] - q[0]), abs(p[1] - q[1])) for p in left for q in left if p != q]
    assert min(spread) > ps.spacing(200, 3)  # spaced, not neighbours


def test_ppl_asks_nothing_where_the_classifiers_agree():
    probs = one_hot(np.zeros((6, 6), np.int64))
    taken = np.zeros((6, 6), bool)
    pixels = ps.select_pixels("ppl", probs, probs, 40, taken, np.random.default_rng(0))
    assert pixels.shape == (0, 2)


def test_random_and_entropy_spend_the_budget_on_unlabelled_pixels():
    rng = np.random.default_rng(0)
    probs = one_hot(rng.integers(0, 4, (16, 16)))
    probs[:, 8, 8] = 0.25  # the one pixel of maximal entropy
    taken = np.zeros((16, 16), bool)
    taken[:4] = True
    for strategy in ("random", "entropy"):
        pixels = ps.select_pixels(strategy, probs, None, 10, taken, np.random.default_rng(1))
        assert len(pixels) == 10 and len({tuple(p) for p in pixels}) == 10
        assert not taken[pixels[:, 0], pixels[:, 1]].any()
    entropy = ps.select_pixels("entropy", probs, None, 10, taken, rng)
    assert tuple(entropy[0]) == (8, 8)
    again = ps.select_pixels("random", probs, None, 10, taken, np.random.default_rng(1))
    first = ps.select_pixels("random", probs, None, 10, taken, np.random.default_rng(1))
    assert np.array_equal(again, first)


def test_the_budget_is_shared_by_size_with_one_point_per_group_first():
    assert ps.share_budget(np.array([100, 10, 1]), 40).tolist() == [35, 4, 1]
    assert ps.share_budget(np.array([100, 10, 1]), 2).tolist() == [1, 1, 0]
    assert ps.share_budget(np.array([3, 2]), 40).tolist() == [3, 2]


def test_rounds_start_after_the_warmup_and_spread_evenly():
    assert round_starts(1200, 2, 0.25) == [300, 750]
    assert round_starts(10, 1, 0.0) == [0]
    assert round_starts(10, 0, 0.5) == []


def make_round(tmp_path: Path, root: Path) -> Path:
    """A round directory over two images as suggest-points writes it."""
    folder = tmp_path / "round1"
    record = {"strategy": "random", "budget": 2, "seed": 0, "exclude": None,
              "checkpoint": "x", "num_classes": 19,
              "data": {"root": str(root), "kind": "cityscapes", "split": "train"}}  # fmt: skip
    annotation.start_round(folder, record)
    for name in ("a/one", "a/two"):
        pixels = np.array([[1, 2], [3, 4]])
        annotation.write_suggestion(folder, name, (10, 20), pixels, np.array([0, 13]))
    annotation.finish_round(folder, ["a/one", "a/two"])
    return folder


def test_answers_are_checked_line_by_line(tmp_path):
    folder = make_round(tmp_path, tmp_path / "data")
    answers = folder / annotation.ANSWERS_FILE
    answers.write_text(
        "image,x,y,class\n"
        "a/one,2,1,road\n"  # 2: fine
        "a/nine,2,1,road\n"  # 3: unknown image
        "a/one,20,1,road\n"  # 4: outside (the image is 20 wide)
        "a/one,4,3,unicorn\n"  # 5: unknown class
        "a/one,2,1,car\n"  # 6: answered on line 2
        "a/two,4,3,13\n"  # 7: fine, by trainId
        "a/two,2,1,void\n"  # 8: fine, no class
    )
    with pytest.raises(UserError) as error:
        annotation.import_points(answers)
    message = str(error.value)
    assert "4 bad answers" in message
    for expected in ("line 3: unknown image 'a/nine'", "line 4: pixel (20, 1) is outside",
                     "line 5: unknown class 'unicorn'", "line 6: pixel (2, 1) of a/one was "
                     "answered on line 2"):  # fmt: skip
        assert expected in message
    assert not point_set_path(tmp_path / "data", "train", "round1").exists()  # nothing stored
    answers.write_text("image,x,y\na/one,2,1\n")
    with pytest.raises(UserError, match="line 1 must be the header image,x,y,class"):
        annotation.import_points(answers)


def test_import_stores_a_point_set_refuses_to_overwrite_and_carries_earlier_rounds(tmp_path):
    data = tmp_path / "data"
    folder = make_round(tmp_path, data)
    answers = folder / annotation.ANSWERS_FILE
    answers.write_text("image,x,y,class\na/one,2,1,road\na/two,4,3,13\na/two,2,1,void\n")
    path, counts = annotation.import_points(answers)
    assert path == point_set_path(data, "train", "round1")
    assert counts == {"images": 2, "labelled": 2, "void": 1, "total": 2}
    points, sizes = load_points(path)
    assert points == {"a/one": [[0, 1, 2]], "a/two": [[13, 3, 4]]}  # [trainId, y, x]
    assert sizes == {"a/one": [10, 20], "a/two": [10, 20]}
    with pytest.raises(UserError, match=r"exists .* --force"):
        annotation.import_points(answers)
    answers.write_text("image,x,y,class\na/one,5,5,sky\na/one,2,1,sidewalk\n")
    _, counts = annotation.import_points(answers, name="round2", previous="round1")
    points, _ = load_points(point_set_path(data, "train", "round2"))
    assert points["a/one"] == [[10, 5, 5], [1, 1, 2]]  # the later answer for (2, 1) wins
    assert points["a/two"] == [[13, 3, 4]] and counts["total"] == 3


def test_a_round_directory_of_another_round_is_refused(tmp_path):
    folder = make_round(tmp_path, tmp_path / "data")
    record = json.loads((folder / annotation.ROUND_FILE).read_text())
    record.pop("schema")
    with pytest.raises(UserError, match=r"another labelling round .*budget"):
        annotation.start_round(folder, {**record, "budget": 5})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        annotation.start_round(tmp_path / "other", record)


def labor_config(config_file: Path, method: str, *extra: str):
    options = [f"train.method={method}", "train.iterations=8", "labor.warmup=0.25",
               "labor.budget=6", "train.checkpoint_every=100", *extra]  # fmt: skip
    return load_config(config_file, options)


@pytest.mark.parametrize("method", ["labor_ppl", "labor_entropy"])
def test_rounds_ask_the_budget_and_the_simulated_annotator_answers_the_truth(
    tmp_path, tiny_config_file, cityscapes_root, method
):
    config = labor_config(tiny_config_file, method)
    train(config, tmp_path / "run", evaluate_at_end=False)
    labels = tmp_path / "run" / LABELS_DIR
    summary = json.loads((labels / SUMMARY_FILE).read_text())
    assert summary["rounds"] == 2 and summary["images"] == 6
    asked = [json.loads((labels / f"round_{r}" / "summary.json").read_text()) for r in (1, 2)]
    assert summary["asked_per_image"] == sum(a["pixels"] for a in asked) / 6
    per_round = [a["pixels_per_image"] for a in asked]
    if method == "labor_entropy":
        assert per_round == [3, 3]  # the budget of 6, half per round
    elif method == "labor_ppl":  # at most: where the classifiers agree, nothing is asked
        assert max(per_round) <= 3
    points, _ = load_points(labels / POINTS_FILE)
    truth = build_dataset(config.data.target, labels=True, resize_labels=False)
    samples = {s.name: s for s in truth.samples}
    labelled = 0
    for name, rows in points.items():
        ids = truth.train_ids(samples[name])
        for c, y, x in rows:
            assert ids[y, x] == c != IGNORE_INDEX
            labelled += 1
    assert summary["labelled_per_image"] == labelled / 6


def test_the_source_weight_changes_when_the_first_labels_arrive(
    tmp_path, tiny_config_file, cityscapes_root
):
    config = labor_config(tiny_config_file, "labor_random", "labor.lambda_source=0.0",
                          "train.log_every=1")  # fmt: skip
    train(config, tmp_path / "run", evaluate_at_end=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    seg = {r["iteration"]: r["seg"] for r in rows if "seg" in r}
    first = round_starts(8, 2, 0.25)[0]  # iteration 2: the first labels
    assert sorted(seg) == list(range(1, 9))
    assert all(seg[i] > 0 for i in range(1, first + 1))  # logged after iteration i-1 ran
    assert all(seg[i] == 0 for i in range(first + 1, 9))


def test_an_interrupted_labor_run_resumes_to_the_same_labels_and_weights(
    tmp_path, tiny_config_file, cityscapes_root
):
    config = labor_config(tiny_config_file, "labor_ppl")
    train(config, tmp_path / "whole", evaluate_at_end=False)
    stop = StopAfter("suggesting", 9)  # round 2 (from iteration 5), after 3 of its 6 images
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "part", reporter=stop, evaluate_at_end=False)
    assert not (tmp_path / "part" / LABELS_DIR / "round_2" / "summary.json").exists()
    train(config, tmp_path / "part", resume=True, evaluate_at_end=False)
    whole, part = (tmp_path / r / LABELS_DIR / POINTS_FILE for r in ("whole", "part"))
    assert json.loads(whole.read_text()) == json.loads(part.read_text())
    assert_same_weights(tmp_path / "whole", tmp_path / "part")


def test_suggest_annotate_import_and_train_on_the_answers(
    tmp_path, tiny_config_file, cityscapes_root
):
    """The human-in-the-loop round trip, with --simulate as the annotator (entropy: after two
    iterations the two classifiers of LabOR still agree everywhere, so ppl would ask nothing)."""
    warmup = labor_config(tiny_config_file, "labor_ppl", "labor.rounds=0", "train.iterations=2")
    checkpoint = train(warmup, tmp_path / "warmup", evaluate_at_end=False).checkpoint
    out = tmp_path / "round1"
    args = ["suggest-points", str(checkpoint), "--data", str(cityscapes_root), "--out",
            str(out), "--strategy", "entropy", "--budget", "5", "--simulate"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "30 pixels to label (5.0 per image" in result.output
    suggestion = json.loads((out / "suggestions" / f"{NAME}.json").read_text())
    assert set(suggestion) == {"image", "size", "pixels", "predicted"}
    assert len(suggestion["pixels"]) == 5 and (out / "overlays" / f"{NAME}.png").is_file()
    result = runner.invoke(app, ["data", "import-points", str(out / "answers.csv")])
    assert result.exit_code == 0, result.output
    assert "--set adapt.points=round1" in result.output
    for method in ("wda_point", "labor_ppl"):
        extra = ["adapt.points=round1", "labor.rounds=0", "train.iterations=2"]
        if method == "wda_point":
            runner.invoke(app, ["data", "stats", str(cityscapes_root)])
        config = labor_config(tiny_config_file, method, *extra)
        train(config, tmp_path / method, evaluate_at_end=False)  # reads the imported set
    result = runner.invoke(app, ["data", "import-points", str(out / "answers.csv")])
    assert isinstance(result.exception, UserError) and "exists" in str(result.exception)


def test_ppl_needs_a_checkpoint_with_the_selector(tmp_path, tiny_config_file, cityscapes_root):
    config = load_config(tiny_config_file, ["train.method=source_only", "train.iterations=1"])
    checkpoint = train(config, tmp_path / "so", evaluate_at_end=False).checkpoint
    args = ["suggest-points", str(checkpoint), "--data", str(cityscapes_root), "--out",
            str(tmp_path / "r")]  # fmt: skip
    error = runner.invoke(app, args).exception
    assert isinstance(error, UserError)
    assert "needs LabOR's pixel selector" in str(error) and "source_only" in str(error)
    error = runner.invoke(app, [*args, "--strategy", "entropy", "--budget", "0"]).exception
    assert isinstance(error, UserError) and "--budget must be a positive" in str(error)
    result = runner.invoke(app, [*args, "--strategy", "entropy", "--budget", "2"])
    assert result.exit_code == 0, result.output
