"""bench/train_scaling.py: real `adapt-deploy train --nproc N` runs timed from their own logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import bench.train_scaling as scaling
from adapt_deploy.errors import UserError


def test_iteration_times_come_from_the_training_lines_after_the_warm_up(tmp_path: Path) -> None:
    lines = [
        {"iteration": 1, "loss": 3.0, "images_per_second": 1.0},
        {"iteration": 2, "loss": 2.0, "images_per_second": 4.0},
        {"iteration": 2, "miou": 0.1, "split": "val"},  # an evaluation line
        {"iteration": 3, "loss": 1.0, "images_per_second": 8.0},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert scaling.iteration_times(metrics, batch=4, warmup=1) == [1.0, 0.5]


def test_more_processes_than_gpus_are_skipped_with_the_reason() -> None:
    assert scaling.skip_reason(2, "cuda", 1) == "skipped: 2 processes need 2 GPUs, 1 visible"
    assert scaling.skip_reason(1, "cuda", 1) is None
    assert scaling.skip_reason(2, "cpu", 0) is None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[scaling.Report, Path]:
    """source_only in one and two gloo processes, 1 warm-up and 2 timed iterations each."""
    root = tmp_path_factory.mktemp("train_scaling")
    settings = scaling.Settings(
        methods=("source_only",), nproc=(2, 1), iters=2, warmup=1, work=root / "runs",
        data=root / "data",
    )  # fmt: skip
    results = root / "results"
    done = scaling.run(
        settings, log=lambda line: None,
        after_row=lambda partial: scaling.write_report(partial, results),
    )  # fmt: skip
    scaling.write_report(done, results)
    return done, root


def test_each_process_count_is_a_real_training_run(report) -> None:
    done, root = report
    assert done.preset == "tiny" and done.device == "cpu" and done.complete
    assert [(r.nproc, r.batch, r.status) for r in done.rows] == [(1, 2, "ok"), (2, 4, "ok")]
    for row in done.rows:
        run = root / "runs" / "source_only" / f"n{row.nproc}"
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in logged if "loss" in r] == [1, 2, 3]
        assert (run / "checkpoint.pt").is_file()
        assert row.timed == 2 and 0 < row.ms_p10 <= row.ms_median <= row.ms_p90
        assert row.images_s == pytest.approx(row.batch / (row.ms_median / 1000))
        assert row.schedule_hours == pytest.approx(2400 * 2 / row.images_s / 3600)
    one, two = done.rows
    cores = os.cpu_count() or 1
    assert (one.threads, two.threads) == (cores, max(1, cores // 2))  # the cores are shared
    assert one.efficiency is None
    assert two.efficiency == pytest.approx(two.images_s / (2 * one.images_s))


def test_the_report_has_a_row_per_run(report) -> None:
    _, root = report
    text = (root / "results" / "train_scaling.md").read_text()
    assert "| source_only | 1 | 2 |" in text and "| source_only | 2 | 4 |" in text
    assert "the engine's overhead, not a speed-up" in text
    data = json.loads((root / "results" / "train_scaling.json").read_text())
    assert data["complete"] and len(data["rows"]) == 2


def test_a_failed_run_is_reported_with_the_line_that_says_why(tmp_path: Path) -> None:
    settings = scaling.Settings(work=tmp_path / "runs", iters=1, warmup=0)
    missing = (tmp_path / "no_source", tmp_path / "no_target")
    row = scaling.measure(settings, "tiny", "source_only", 1, "cpu", missing, None)
    assert row.status.startswith("failed: exit status") and "error:" in row.status
    assert "no_source" in row.status and not row.measured
    torchrun_summary = "error: bad\nterminate called without an active exception\n=====\n"
    assert scaling.failure_line(torchrun_summary) == "terminate called without an active exception"
    with pytest.raises(UserError, match="--batch-per-process"):
        scaling.run(scaling.Settings(batch_per_process=0))


def test_the_gpu_check_s_flags_parse() -> None:
    """bench/gpu_check.sh runs this bench on the one lent GPU: a stale flag would cost the run."""
    script = Path(scaling.__file__).parent / "gpu_check.sh"
    text = script.read_text().replace("\\\n", " ")
    (line,) = [s for s in text.splitlines() if "-m bench.train_scaling" in s]
    args = scaling.build_parser().parse_args(line.split("-m bench.train_scaling", 1)[1].split())
    assert args.nproc == [1] and args.iters >= 1
