"""The run log: metrics.jsonl lines, TensorBoard event files beside them, and the prediction
overlays each evaluation shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RGB_INPUT, tiny_config

from adapt_deploy.engine.evaluate import EvalResult, predict_logits
from adapt_deploy.engine.overlays import blend, prediction_overlays
from adapt_deploy.engine.run_log import TB_INSTALL, RunLog
from adapt_deploy.errors import UserError
from adapt_deploy.labels import CLASS_NAMES, colorize
from adapt_deploy.models.checkpoints import build_model
from adapt_deploy.run_plot import read_metrics

METRICS = {"loss": 2.5, "seg": 2.0, "adv": 0.5, "d_out": 1.4, "lr": 0.01}


def events(run_dir: Path):
    """The run directory's TensorBoard events as TensorBoard reads them (all images kept)."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed (pip install 'adapt-deploy[tb]')",
    )
    reader = accumulator.EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    reader.Reload()
    return reader


def steps(reader, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value)) for e in reader.Scalars(tag)]


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_result(protocol: str = "cityscapes19") -> EvalResult:
    """Every class right but a third of the cars called road; train (16) absent."""
    confusion = np.diag(np.arange(10, 200, 10)).astype(np.int64)
    confusion[16, 16] = 0
    confusion[13, 0] = 70  # car: 140 / (140 + 70) = 2/3
    return EvalResult(confusion, list(CLASS_NAMES), protocol)


@pytest.fixture
def tensorboard_blocked(monkeypatch):
    """`import torch.utils.tensorboard` fails, as where the tensorboard package is absent."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_training_records_go_to_jsonl_and_tensorboard(tmp_path):
    with RunLog(tmp_path, tensorboard=None) as log:
        assert log.tensorboard_on
        log.log_train(10, METRICS, 12.5)
        log.log_train(20, {**METRICS, "seg": 1.0}, 13.0)
    assert lines(tmp_path) == [
        {"iteration": 10, **METRICS, "images_per_second": 12.5},
        {"iteration": 20, **METRICS, "seg": 1.0, "images_per_second": 13.0},
    ]
    assert len(event_files(tmp_path)) == 1
    reader = events(tmp_path)
    expected = {"loss/total", "loss/seg", "loss/adv", "loss/d_out", "lr", "images_per_second"}
    assert set(reader.Tags()["scalars"]) == expected
    assert steps(reader, "loss/seg") == [(10, 2.0), (20, 1.0)]
    assert steps(reader, "loss/total") == [(10, 2.5), (20, 2.5)]
    assert steps(reader, "images_per_second") == [(10, 12.5), (20, 13.0)]


def test_evaluation_records_hold_the_summary_without_the_confusion_matrix(tmp_path):
    result = eval_result()
    overlays = [np.full((8, 12, 3), 40 * i, np.uint8) for i in range(2)]
    with RunLog(tmp_path) as log:
        log.log_eval(100, result, overlays)
    (record,) = lines(tmp_path)
    expected = {k: v for k, v in result.to_dict().items() if k != "confusion"}
    assert record == {"iteration": 100, "eval": expected}
    assert record["eval"]["iou"]["car"] == pytest.approx(66.67)

    reader = events(tmp_path)
    scalars = set(reader.Tags()["scalars"])
    assert {"eval/mIoU", "eval/pixel_accuracy", "eval_iou/road", "eval_iou/car"} <= scalars
    assert "eval_iou/train" not in scalars  # absent from both ground truth and prediction
    assert steps(reader, "eval/mIoU") == [(100, expected["miou"])]
    assert steps(reader, "eval_iou/car") == [(100, 66.67)]
    assert sorted(reader.Tags()["images"]) == ["eval/prediction_0", "eval/prediction_1"]
    (image,) = reader.Images("eval/prediction_1")
    assert (image.step, image.height, image.width) == (100, 8, 12)


def test_every_miou_of_the_protocol_is_a_scalar(tmp_path):
    with RunLog(tmp_path) as log:
        log.log_eval(5, eval_result("synthia16"), None)
    reader = events(tmp_path)
    assert {"eval/mIoU", "eval/mIoU-16", "eval/mIoU-13"} <= set(reader.Tags()["scalars"])
    assert reader.Tags()["images"] == []
    assert steps(reader, "eval/mIoU") == steps(reader, "eval/mIoU-16")


def test_a_resumed_run_appends_and_drops_the_lost_iterations(tmp_path):
    """Saved at 2, crashed after logging 4: the resumed run logs 3 and 4 again. The jsonl keeps
    every line (its reader drops the stale ones); TensorBoard purges past the resume point."""
    with RunLog(tmp_path) as log:
        for i in range(1, 5):
            log.log_train(i, {"loss": float(i)}, 1.0)
    with RunLog(tmp_path, start=2) as log:
        for i in range(3, 5):
            log.log_train(i, {"loss": 10.0 * i}, 1.0)
    assert [r["iteration"] for r in lines(tmp_path)] == [1, 2, 3, 4, 3, 4]
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["iteration"], r["loss"]) for r in train] == [(1, 1), (2, 2), (3, 30), (4, 40)]
    assert len(event_files(tmp_path)) == 2
    assert steps(events(tmp_path), "loss/total") == [(1, 1), (2, 2), (3, 30), (4, 40)]


def test_a_line_cut_by_a_crash_is_dropped_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n{"iteration": 2, "lo')
    with RunLog(tmp_path, start=1, tensorboard=False) as log:
        log.log_train(2, {"loss": 2.0}, 1.0)
    assert lines(tmp_path) == [
        {"iteration": 1, "loss": 1.0},
        {"iteration": 2, "loss": 2.0, "images_per_second": 1.0},
    ]


def test_tensorboard_off_writes_no_event_file(tmp_path):
    with RunLog(tmp_path, tensorboard=False) as log:
        assert not log.tensorboard_on
        log.log_train(1, METRICS, 1.0)
        log.log_eval(1, eval_result(), [np.zeros((4, 4, 3), np.uint8)])
    assert event_files(tmp_path) == []
    assert [sorted(r) for r in lines(tmp_path)] == [
        sorted(["iteration", *METRICS, "images_per_second"]),
        ["eval", "iteration"],
    ]


def test_without_the_package_tensorboard_is_off_by_default(tmp_path, tensorboard_blocked):
    with RunLog(tmp_path) as log:
        assert not log.tensorboard_on
        log.log_train(1, METRICS, 1.0)
    assert event_files(tmp_path) == []
    assert len(lines(tmp_path)) == 1


def test_without_the_package_asking_for_tensorboard_says_how_to_install_it(
    tmp_path, tensorboard_blocked
):
    with pytest.raises(UserError, match=r"pip install 'adapt-deploy\[tb\]'") as caught:
        RunLog(tmp_path / "run", tensorboard=True)
    assert TB_INSTALL in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_error_in_the_block_still_closes_both_outputs(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RunLog(tmp_path) as log:
        log.log_train(7, METRICS, 1.0)
        raise RuntimeError("boom")
    assert log._file.closed
    assert steps(events(tmp_path), "lr") == [(7, 0.01)]  # flushed by the close


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config(RGB_INPUT).model)


def images(count: int = 4, size: tuple[int, int] = (24, 40)) -> list[dict]:
    """Dataset items as SegmentationDataset gives them (uint8 CHW RGB)."""
    rng = np.random.default_rng(0)
    return [
        {"image": torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8))}
        for _ in range(count)
    ]


def test_overlays_blend_the_prediction_over_each_image(tiny_model):
    spec = tiny_config(RGB_INPUT).input
    dataset = images()
    overlays = prediction_overlays(tiny_model, dataset, spec, count=3)
    assert len(overlays) == 3
    for overlay, item in zip(overlays, dataset, strict=False):
        raw = item["image"].permute(1, 2, 0).numpy()
        assert overlay.shape == (24, 40, 3) and overlay.dtype == np.uint8
        assert not np.array_equal(overlay, raw)
    # At full opacity an overlay is the coloured prediction at the image's size.
    (solid,) = prediction_overlays(tiny_model, dataset, spec, count=1, alpha=1.0)
    logits = predict_logits(tiny_model.eval(), dataset[0]["image"][None], spec, (24, 40))
    np.testing.assert_array_equal(solid, colorize(logits.argmax(1)[0].numpy()))
    assert [o.tobytes() for o in overlays] == [
        o.tobytes() for o in prediction_overlays(tiny_model, dataset, spec, count=3)
    ]


@pytest.mark.parametrize("training", [True, False])
def test_overlays_leave_the_model_in_its_mode(tiny_model, training):
    tiny_model.train(training)
    modes = [m.training for m in tiny_model.modules()]  # frozen BatchNorm stays in eval
    prediction_overlays(tiny_model, images(1), tiny_config(RGB_INPUT).input)
    assert tiny_model.training is training
    assert [m.training for m in tiny_model.modules()] == modes


def test_overlays_of_a_short_dataset_and_the_blend_at_zero_opacity(tiny_model):
    spec = tiny_config(RGB_INPUT).input
    assert len(prediction_overlays(tiny_model, images(2), spec, count=5)) == 2
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(blend(image, np.zeros((2, 3), np.int64), 0.0), image)
