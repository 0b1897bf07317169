"""bench/train_speed.py: the rows it measures on the CPU, the report it writes, the goal verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.train_speed as ts


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ts.Report, list[tuple[int, bool]]]:
    """wda_point (target stats and points, both loaders, pooling ops) at fp32 and bf16, kernels
    on and off, 1 warm-up and 3 timed iterations, on the CPU with the tiny preset; and (rows,
    complete) of each partial report handed to `after_row`."""
    settings = ts.Settings(
        methods=("wda_point",),
        precisions=("fp32", "bf16"),
        kernels=("on", "off"),
        iters=3,
        warmup=1,
        device="cpu",
        work=tmp_path_factory.mktemp("train_speed"),
    )
    seen: list[tuple[int, bool]] = []
    report = ts.run(
        settings,
        log=lambda line: None,
        after_row=lambda partial: seen.append((len(partial.rows), partial.complete)),
    )
    return report, seen


@pytest.fixture(scope="module")
def cpu_report(cpu_run: tuple[ts.Report, list[tuple[int, bool]]]) -> ts.Report:
    return cpu_run[0]


def test_cpu_rows_are_measured_and_the_kernel_rows_skipped_with_a_note(
    cpu_report: ts.Report,
) -> None:
    assert cpu_report.preset == "tiny" and cpu_report.device == "cpu"
    assert cpu_report.settings.budget == 0  # no time limit off CUDA by default
    assert [(r.method, r.precision, r.kernels) for r in cpu_report.rows] == [
        ("wda_point", "fp32", "off"),
        ("wda_point", "bf16", "off"),
    ]
    assert any("No fused kernels on the CPU" in note for note in cpu_report.notes)
    for row in cpu_report.rows:
        assert row.status == "ok" and row.timed == 3
        assert 0 < row.ms_p10 <= row.ms_median <= row.ms_p90
        assert row.loop_ms > 0 and row.seconds > 0
        assert row.images_per_iteration == 4  # batch 2 of source and of target
        assert row.step_images_s == pytest.approx(4 / (row.ms_median / 1000))
        assert row.loader_images_s > 0
        assert row.loader_bound == (row.loader_images_s < row.step_images_s)
        assert row.peak_mb > 0
        assert row.ran_as in ("fp32", "bf16")
    assert cpu_report.rows[0].ran_as == "fp32"
    assert "resnet18" in cpu_report.model["wda_point"]


def test_each_measured_row_is_handed_over_as_partial_results(
    cpu_run: tuple[ts.Report, list[tuple[int, bool]]],
) -> None:
    report, handed_over = cpu_run
    assert handed_over == [(1, False), (2, False)] and report.complete
    partial = ts.Report("tiny", "cpu", {}, 0, ts.Settings(), seconds=12)
    assert "**partial**: written 12 s into a run" in ts.render(partial)


def test_the_weak_labels_wda_point_reads_are_written_beside_the_data(
    cpu_report: ts.Report,
) -> None:
    target = cpu_report.settings.work / "data" / "target"
    assert ts.stats_path(target, "train").is_file()
    assert ts.points_path(target, "train", 0).is_file()


def test_report_goes_where_it_is_told_as_markdown_and_json(
    cpu_report: ts.Report, tmp_path: Path
) -> None:
    markdown, data = ts.write_report(cpu_report, tmp_path / "results")
    assert markdown == tmp_path / "results" / "train_speed.md"
    assert data == tmp_path / "results" / "train_speed.json"
    text = markdown.read_text()
    assert "- gpu: " in text  # the machine, from bench.common.write_results
    assert "| wda_point | bf16 | off |" in text
    assert "not judged here" in text
    loaded = json.loads(data.read_text())
    assert [r["precision"] for r in loaded["rows"]] == ["fp32", "bf16"]
    assert loaded["rows"][0]["ms_median"] == cpu_report.rows[0].ms_median
    assert loaded["goal"] is None and loaded["settings"]["iters"] == 3 and loaded["complete"]


def test_only_the_wda_methods_get_kernel_rows() -> None:
    settings = ts.Settings(methods=("source_only", "wda_uda"), precisions=("bf16",))
    rows, notes = ts.plan(settings, torch.device("cuda"))
    assert rows == [
        ("source_only", "bf16", "unused"),
        ("wda_uda", "bf16", "on"),
        ("wda_uda", "bf16", "off"),
    ]
    assert notes == []


def _row(precision: str, kernels: str, ms: float | None) -> ts.Row:
    return ts.Row("wda_uda", precision, kernels, ms_median=ms)


def test_goal_compares_bf16_with_this_runs_fp32_at_the_same_kernels() -> None:
    report = ts.Report("paper", "cuda", {}, 4, ts.Settings())
    report.rows = [_row("fp32", "on", 96.0), _row("bf16", "on", 38.0)]
    goal = report.goal
    assert goal["kernels"] == "on" and goal["speedup"] == pytest.approx(96 / 38)
    assert goal["met_ms"] and goal["met_speedup"]
    assert "38.0 ms with kernels on - met" in ts.goal_line(report)

    report.rows = [_row("fp32", "on", None), _row("fp32", "off", 90.0), _row("bf16", "off", 45.0)]
    goal = report.goal
    assert goal["kernels"] == "off" and not goal["met_ms"] and not goal["met_speedup"]
    assert ts.goal_line(report).count("NOT met") == 2

    report.preset = "tiny"
    assert report.goal is None and "not judged here" in ts.goal_line(report)


def test_unknown_method_is_refused_before_any_work(capsys: pytest.CaptureFixture) -> None:
    assert ts.main(["--methods", "wda_nope", "--device", "cpu"]) == 2
    assert "unknown method 'wda_nope'" in capsys.readouterr().err


def test_every_flag_has_help() -> None:
    actions = [a for a in ts.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]
