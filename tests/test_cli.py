import subprocess
import sys

import pytest
from typer.testing import CliRunner

from adapt_deploy.cli import app
from adapt_deploy.registry import BACKEND_CHOICES, DATASET_LAYOUTS

COMMANDS = [
    "demo",
    "synth",
    "train",
    "evaluate",
    "pseudo-label",
    "rank",
    "suggest-points",
    "export",
    "verify",
    "stream",
    "data",
    "doctor",
]
runner = CliRunner()


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "adapt_deploy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize("command", ["stats", "points", "import-points"])
def test_data_subcommands_have_help(command):
    result = runner.invoke(app, ["data", command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize(
    ("command", "names"),
    [
        (["evaluate"], DATASET_LAYOUTS.names()),
        (["data", "stats"], DATASET_LAYOUTS.names()),
        (["data", "points"], DATASET_LAYOUTS.names()),
        (["pseudo-label"], DATASET_LAYOUTS.names()),
        (["rank"], DATASET_LAYOUTS.names()),
        (["suggest-points"], DATASET_LAYOUTS.names()),
        (["stream"], BACKEND_CHOICES),
    ],
)
def test_help_lists_every_registered_choice(command, names):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.output


def test_data_stats_on_a_missing_root_is_one_clear_line(tmp_path):
    result = run_cli("data", "stats", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "expected layout" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_reports_the_installed_components():
    result = runner.invoke(app, ["doctor"])
    assert "torch" in result.output and "onnxruntime" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["evaluate", "missing.pt", "--data", "."], "checkpoint not found: missing.pt"),
        (["data", "import-points", "answers.csv"], "is not a labelling round (round.json"),
    ],
)
def test_user_mistakes_are_one_clear_line_without_traceback(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("synth", "--out", str(blocker / "bench"), "--num-videos", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(blocker) in result.stderr


def test_bad_config_key_fails_before_any_work(tmp_path, tiny_config_file):
    result = run_cli(
        "train",
        "--config",
        str(tiny_config_file),
        "--set",
        "optim.lrr=1",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2 and "unknown config key 'optim.lrr'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_mislaid_dataset_names_the_layout(tmp_path, tiny_config_file):
    result = run_cli(
        "train",
        "--config",
        str(tiny_config_file),
        "--set",
        f"data.source.root={tmp_path / 'nowhere'}",
        "--out",
        str(tmp_path / "r"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        str(tmp_path / "nowhere" / "images") in result.stderr and "expected layout" in result.stderr
    )


def test_train_then_evaluate_through_the_cli(tmp_path, tiny_config_file, cityscapes_root):
    run = tmp_path / "run"
    trained = run_cli(
        "train", "--config", str(tiny_config_file), "--set", "train.iterations=3", "--out", str(run)
    )
    assert trained.returncode == 0, trained.stderr
    assert (run / "checkpoint.pt").is_file() and "mIoU" in trained.stdout
    report = tmp_path / "eval.json"
    evaluated = run_cli(
        "evaluate",
        str(run / "checkpoint.pt"),
        "--data",
        str(cityscapes_root),
        "--json",
        str(report),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "mIoU" in evaluated.stdout and report.is_file()
    again = run_cli("train", "--config", str(tiny_config_file), "--out", str(run))
    assert again.returncode == 2 and "--resume" in again.stderr
