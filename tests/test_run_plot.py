"""`adapt-deploy plot`: a run's loss and mIoU curves drawn with OpenCV from its metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from adapt_deploy.cli import app
from adapt_deploy.errors import UserError
from adapt_deploy.run_plot import (
    COLOURS,
    PANEL,
    loss_terms,
    moving_average,
    nice_ticks,
    plot_run,
    read_metrics,
)

SIZE = (PANEL[1], 2 * PANEL[0])  # (height, width) of the image
runner = CliRunner()


def write_run(run_dir: Path, iterations: int = 200, every_eval: int | None = 50) -> Path:
    """A metrics.jsonl as the trainer writes it: a training record per iteration, an evaluation
    record every `every_eval` (None: no evaluation)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(1, iterations + 1):
        seg = 3.0 * np.exp(-i / 80) + 0.3 + 0.1 * rng.random()
        adv = 1e-3 * (1 + rng.random())
        losses = {"loss": seg + adv, "seg": seg, "adv": adv, "d_out": 1.38}
        records.append({"iteration": i, **losses, "lr": 0.01, "images_per_second": 20.0})
        if every_eval and i % every_eval == 0:
            miou = 40 * (1 - np.exp(-i / 100))
            summary = {"miou": miou, "protocol": "cityscapes19", "mious": {"mIoU": miou}}
            records.append({"iteration": i, "eval": {**summary, "pixel_accuracy": 80.0}})
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(lines)
    return run_dir


def decode(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image


def has_colour(image: np.ndarray, bgr: tuple[int, int, int]) -> bool:
    """Whether some pixel is (within antialiasing) the colour `bgr`."""
    return bool((np.abs(image.astype(int) - bgr).max(axis=-1) <= 12).any())


def test_the_plot_is_written_beside_the_metrics_with_both_panels(tmp_path):
    run = write_run(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "curves.png"
    image = decode(out)
    assert image.shape[:2] == SIZE
    losses, miou = image[:, : PANEL[0]], image[:, PANEL[0] :]
    for i in range(3):  # seg, adv, d_out
        assert has_colour(losses, COLOURS[i])
    assert has_colour(miou, COLOURS[0])  # the mIoU curve
    assert not has_colour(miou, COLOURS[1])  # one mIoU only
    assert sorted(f.name for f in run.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp


def test_a_run_without_evaluations_draws_the_losses_and_says_so(tmp_path):
    run = write_run(tmp_path / "run", every_eval=None)
    image = decode(plot_run(run, tmp_path / "elsewhere" / "plot.png"))
    assert not (run / "curves.png").exists()
    losses, miou = image[:, : PANEL[0]], image[:, PANEL[0] :]
    assert has_colour(losses, COLOURS[0])
    assert not any(has_colour(miou, c) for c in COLOURS[:4])  # no curve...
    middle_y, middle_x = PANEL[1] // 2, PANEL[0] // 2
    centre = miou[middle_y - 30 : middle_y + 10, middle_x - 100 : middle_x + 100]
    assert (centre < 128).any()  # ...but the words "no evaluation yet" in the middle


def test_each_miou_of_the_protocol_is_a_curve(tmp_path):
    records = [{"iteration": 1, "loss": 1.0}]
    for i, (m16, m13) in enumerate([(20.0, 25.0), (30.0, 35.0)], start=1):
        summary = {"miou": m16, "mious": {"mIoU-16": m16, "mIoU-13": m13}}
        records.append({"iteration": 10 * i, "eval": summary})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    miou = decode(plot_run(tmp_path))[:, PANEL[0] :]
    assert has_colour(miou, COLOURS[0]) and has_colour(miou, COLOURS[1])


def test_records_split_into_training_and_evaluation(tmp_path):
    write_run(tmp_path, iterations=100, every_eval=50)
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in train] == list(range(1, 101))
    assert [r["iteration"] for r in evals] == [50, 100]
    assert loss_terms(train) == ["loss", "seg", "adv", "d_out"]  # not lr, images_per_second


def test_records_of_iterations_a_resumed_run_redid_are_dropped(tmp_path):
    """Saved at 2, evaluated at 3, crashed after 4: the resumed run logs 3 and 4 again."""
    lines = [
        {"iteration": 1, "loss": 1.0},
        {"iteration": 2, "loss": 2.0},
        {"iteration": 2, "eval": {"miou": 10.0}},
        {"iteration": 3, "loss": 3.0},
        {"iteration": 3, "eval": {"miou": 30.0}},
        {"iteration": 4, "loss": 4.0},
        {"iteration": 3, "loss": 33.0},
        {"iteration": 4, "loss": 44.0},
        {"iteration": 4, "eval": {"miou": 40.0}},
        {"iteration": 4, "eval": {"miou": 44.0}},  # evaluated again at the end
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["iteration"], r["loss"]) for r in train] == [(1, 1), (2, 2), (3, 33), (4, 44)]
    assert [(r["iteration"], r["eval"]["miou"]) for r in evals] == [(2, 10), (4, 44)]


def test_older_records_and_a_line_being_written_are_read(tmp_path):
    """Records without images_per_second (runs before it was logged) plot; a last line without
    its newline is one the trainer is writing."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 2.0, "seg": 2.0, "lr": 0.1}\n\n{"iteration": 2, "lo')
    train, evals = read_metrics(path)
    assert [r["iteration"] for r in train] == [1] and evals == []
    assert decode(plot_run(tmp_path)).shape[:2] == SIZE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"iteration": 1, "loss": 1.0}\n{"iteration": 2, loss\n{"iteration": 3}\n', "line 2"),
        ('{"iteration": 1}\n[1, 2]\n', "line 2: not a metrics record"),
        ('{"loss": 1.0}\n', "line 1: not a metrics record"),
        ('{"iteration": "7"}\n', "line 1: not a metrics record"),
        ('{"iteration": 1}\n{"iteration": 1, "eval": {"mIoU": 3}}\n', "line 2: an evaluation"),
        ("", "no records"),
        ("\n\n", "no records"),
        ("\x00\x01 binary\n", "line 1: not valid JSON"),
    ],
)
def test_a_broken_metrics_file_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        plot_run(tmp_path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "curves.png").exists()


def test_a_directory_without_metrics_names_the_file(tmp_path):
    with pytest.raises(UserError, match="does not exist") as caught:
        plot_run(tmp_path / "nope")
    assert str(tmp_path / "nope" / "metrics.jsonl") in str(caught.value)


def test_only_image_file_names_are_written(tmp_path):
    write_run(tmp_path)
    with pytest.raises(UserError, match=r"\.png or \.jpg"):
        plot_run(tmp_path, tmp_path / "curves.pdf")
    assert decode(plot_run(tmp_path, tmp_path / "curves.jpg")).shape[:2] == SIZE


def test_moving_average_and_ticks():
    np.testing.assert_allclose(moving_average(np.array([0.0, 3, 6, 9]), 3), [1.5, 3, 6, 7.5])
    np.testing.assert_array_equal(moving_average(np.array([1.0, 5.0]), 1), [1, 5])
    np.testing.assert_allclose(moving_average(np.array([1.0, 5, 9]), 9), [3, 5, 7])  # window 3
    assert nice_ticks(0, 2000) == [0, 500, 1000, 1500, 2000]
    assert nice_ticks(0.13, 2.9) == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert nice_ticks(0.13, 2.9, cover=True) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_plot_command_prints_where_the_image_went(tmp_path):
    run = write_run(tmp_path / "run")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert "curves.png" in result.output
    assert decode(run / "curves.png").shape[:2] == SIZE
    out = tmp_path / "my.png"
    result = runner.invoke(app, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert decode(out).shape[:2] == SIZE


def test_plot_command_reports_a_corrupt_file_without_a_traceback(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n{"iteration"\n\n')
    result = subprocess.run(
        [sys.executable, "-m", "adapt_deploy.cli", "plot", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "metrics.jsonl, line 2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_plotting_needs_no_torch(tmp_path):
    """A fresh interpreter where `import torch` fails plots a run (the base install)."""
    run = write_run(tmp_path / "run")
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from adapt_deploy.run_plot import plot_run\n"
        f"plot_run({str(run)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (run / "curves.png").is_file()


def test_plot_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "plot" in result.output
    result = runner.invoke(app, ["plot", "--help"])
    assert result.exit_code == 0 and "--out" in result.output
