"""bench/tta/ helpers: --set parsing, method names, the bundle cache and the report text."""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_gta5
from helpers import write_checkpoint, write_source_checkpoint

from adapt_deploy.bundle.meta import sha256_file
from adapt_deploy.engine.evaluate import predict_logits
from adapt_deploy.errors import UserError
from adapt_deploy.export.pipeline import export_bundle
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.tta.bn import MixedBatchNorm2d
from adapt_deploy.tta.options import AdaptOptions, ResetPolicy
from adapt_deploy.tta.settings import SETTING_PARSERS, parse_settings
from bench.common import write_results
from bench.tta import renderings
from bench.tta.cli import build_parser, default_name, main
from bench.tta.conditions import SIZE, STREAMS, confusion
from bench.tta.methods import frame_stats_logits
from bench.tta.model import DEFAULT_CHECKPOINT, ensure_bundle, model_description
from bench.tta.report import report
from bench.tta.runner import Run, kept_torch_threads

# --------------------------------------------------------------------------------------------
# --set
# --------------------------------------------------------------------------------------------


def test_set_uses_the_fields_own_parsers() -> None:
    options = parse_settings(
        ["reset=collapse+periodic:100", "threshold=0.3", "size=96x160", "threads=none",
         "lr=1e-3", "every=8", "params=bn+head"]
    )  # fmt: skip
    assert options.reset == ResetPolicy(on_collapse=True, every=100)
    assert options.threshold == 0.3
    assert options.size == (96, 160)
    assert options.threads is None
    assert options.lr == 1e-3 and options.every == 8 and options.params == "bn+head"
    assert parse_settings(["reset=periodic:100"]).reset == ResetPolicy(False, 100)
    assert parse_settings(["threshold=auto", "size=none"]) == AdaptOptions()
    assert parse_settings([]) == AdaptOptions()


def test_every_field_can_be_set() -> None:
    defaults = AdaptOptions()
    for f in fields(AdaptOptions):
        kind = type(getattr(defaults, f.name))
        assert f.name in SETTING_PARSERS or kind in (int, float, str), f.name


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("learning_rate=1", "FIELD one of"),  # unknown field
        ("lr", "FIELD=VALUE"),  # no value
        ("every=2.5", "expected int"),
        ("reset=sometimes", "periodic:N"),
        ("size=128", "HxW"),
        ("threshold=2", "(0, 1)"),
        ("every=0", "--adapt-every must be >= 1"),  # AdaptOptions.check
        ("bn_prior=1.5", "bn_prior must be in [0, 1]"),
    ],
)
def test_set_rejects_with_one_line(item: str, says: str) -> None:
    with pytest.raises(UserError) as info:
        parse_settings([item], flag="--set")
    message = str(info.value)
    assert says in message and "\n" not in message and message.startswith("--set")


def test_main_rejects_bad_set_and_unknown_methods(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--set", "nope=1"])
    assert "--set 'nope=1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "none,tennt"])
    err = capsys.readouterr().err
    assert "unknown tennt" in err and "tent_lr_1e-4" in err


def test_each_stream_writes_its_own_results_unless_named() -> None:
    """A run of 'second' must not overwrite drive's tta.md (it once did)."""
    assert [default_name(s) for s in STREAMS] == ["tta", "tta_second"]
    assert build_parser().parse_args(["--stream", "second"]).name is None
    assert default_name("drive", 3) == "tta_seed3"
    assert default_name("second", 2) == "tta_second_seed2"


def test_render_seed_must_not_be_negative(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--render-seed", "-1", "--methods", "none"])
    err = capsys.readouterr().err
    assert "--render-seed: expected a seed >= 0, got -1" in err


def test_every_flag_has_help() -> None:
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]


# --------------------------------------------------------------------------------------------
# Methods and scoring
# --------------------------------------------------------------------------------------------


def test_confusion_skips_only_the_ignore_label() -> None:
    labels = np.array([[0, 18, 255], [3, 3, 255]], np.uint8)
    preds = np.array([[0, 1, 5], [3, 2, 7]], np.uint8)
    matrix = confusion(labels, preds)
    assert matrix.shape == (19, 19) and matrix.sum() == 4
    assert matrix[0, 0] == 1 and matrix[18, 1] == 1 and matrix[3, 3] == 1 and matrix[3, 2] == 1


def test_kept_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with kept_torch_threads():
        torch.set_num_threads(1 if before != 1 else 2)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------------
# The cached bundle
# --------------------------------------------------------------------------------------------


def test_bundle_is_exported_again_for_another_checkpoint_or_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_gta5(tmp_path / "source", 6)
    other_source = write_gta5(tmp_path / "other_source", 6, seed=1)
    first = write_source_checkpoint(tmp_path / "a" / "model.pt", source, seed=0)
    second = write_source_checkpoint(tmp_path / "b" / "model.pt", source, seed=1)
    exports: list[Path] = []

    def export(checkpoint, out, **kwargs):
        exports.append(Path(checkpoint))
        return export_bundle(checkpoint, out, adapt_images=4, **kwargs)

    monkeypatch.setattr("bench.tta.model.export_bundle", export)  # where ensure_bundle looks
    bundle = tmp_path / "bundle"
    meta, exported = ensure_bundle(first, source, bundle)
    assert exported and meta["checkpoint"]["sha256"] == sha256_file(first)
    assert ensure_bundle(first, source, bundle)[1] is False  # same checkpoint: reused
    meta, exported = ensure_bundle(second, source, bundle)  # same file name, other weights
    assert exported and meta["checkpoint"]["sha256"] == sha256_file(second)
    assert ensure_bundle(second, other_source, bundle)[1] is True
    assert ensure_bundle(second, other_source, bundle)[1] is False
    assert exports == [first, second, second]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _run(name: str, rounds: int, value: float) -> Run:
    run = Run(name, clean_end=value, seconds=12.0)
    for r in range(rounds):
        for condition in STREAMS["drive"].names:
            run.miou[(r, condition)] = value + r
    return run


def test_report_follows_name_rounds_and_model() -> None:
    fps: dict[str, list[float]] = {"without": [], "with": []}
    body = report(
        [_run("tent", 3, 10.0), _run("ours", 3, 12.0)], STREAMS["drive"], 3, 8, AdaptOptions(),
        fps, None, {},
        name="tta_ablation", model="checkpoint /x/y.pt",
    )  # fmt: skip
    assert "![online mIoU](tta_ablation.png)" in body
    assert "a method's 3 rounds" in body and "10 rounds" not in body
    assert "Model: checkpoint /x/y.pt." in body and "bench.adaptation, seed 0" not in body
    assert "rendered from seed 0" in body  # drive's own frames
    assert "vs none" not in body and "nan" not in body
    header = next(line for line in body.splitlines() if line.startswith("| method | mean"))
    row = next(line for line in body.splitlines() if line.startswith("| ours | 13.0"))
    assert header.count("|") == row.count("|")


def test_report_compares_with_none_when_it_ran() -> None:
    fps: dict[str, list[float]] = {"without": [], "with": []}
    body = report(
        [_run("none", 2, 10.0), _run("ours", 2, 12.5)], STREAMS["drive"], 2, 8, AdaptOptions(),
        fps, None, {},
    )  # fmt: skip
    assert "| vs none |" in body
    assert "| ours | 13.0 | 12.5 | 13.5 | +1.0 | 12.5 | +2.5 | 12 | - |" in body
    assert "![online mIoU](tta.png)" in body


def test_report_gives_the_throughput_of_each_mode() -> None:
    from adapt_deploy.tta.worker import AdaptSummary

    fps = {"without": [90.0, 88.0], "with": [80.0, 79.0], "waited": [40.0, 41.0]}
    worker = AdaptSummary(due=100, adapted=5)
    waited = AdaptSummary(due=100, adapted=100, waited=True)
    body = report(
        [_run("none", 1, 10.0)], STREAMS["drive"], 1, 8, AdaptOptions(), fps, worker, {},
        waited=waited,
    )  # fmt: skip
    assert "- cost: 10.7% of frames/s" in body
    assert "- with `--adapt-wait` (every due frame's update before the next frame): 40.5 " in body
    assert "- last run's worker: adaptation: 5 updates on 100 due frames (0 skipped busy" in body
    assert "- last `--adapt-wait` run: adaptation: 100 updates on 100 due frames (the stream " in (
        body
    )


def test_model_description_names_a_given_checkpoint(tmp_path: Path) -> None:
    assert "seed 0" in model_description(DEFAULT_CHECKPOINT)
    assert model_description(tmp_path / "m.pt") == f"checkpoint {tmp_path / 'm.pt'}"


# --------------------------------------------------------------------------------------------
# bench.tta_cost
# --------------------------------------------------------------------------------------------


def _cost_report(without: float, with_: float, adapted: int, due: int) -> str:
    from adapt_deploy.tta.worker import AdaptSummary
    from bench.tta_cost import report as cost_report

    worker = AdaptSummary(due=due, adapted=adapted, skipped_busy=due - adapted)
    fps = {"without": [without, without + 1, without - 1], "with": [with_]}
    return cost_report("m", "torch fp16 on cuda:0", AdaptOptions(), fps, worker, "v.mp4")


def test_the_cost_goal_needs_the_update_rate_as_well() -> None:
    assert "cost: 10.0% of frames/s" in _cost_report(100.0, 90.0, 95, 100)
    assert _cost_report(100.0, 90.0, 95, 100).count(": met") == 1
    assert "not shown: only 50% of due frames" in _cost_report(100.0, 90.0, 50, 100)
    assert "MISSED" in _cost_report(100.0, 80.0, 100, 100)
    assert "Stopped early" not in _cost_report(100.0, 90.0, 95, 100)


def test_a_cost_report_written_between_rounds_says_how_many_ran() -> None:
    from adapt_deploy.tta.worker import AdaptSummary
    from bench.tta_cost import report as cost_report

    fps = {"without": [100.0], "with": [90.0]}
    worker = AdaptSummary(due=10, adapted=10)
    body = cost_report("m", "torch fp16", AdaptOptions(), fps, worker, "v.mp4", "1 of 3 rounds")
    assert "**Stopped early: 1 of 3 rounds ran.**" in body and "adapting at" not in body
    smaller = AdaptOptions(size=(256, 512))
    assert ", adapting at 256x512." in cost_report("m", "t", smaller, fps, worker, "v.mp4")


def test_a_cost_report_with_both_streams_says_what_the_own_stream_is_worth() -> None:
    from adapt_deploy.tta.worker import AdaptSummary
    from bench.tta_cost import report as cost_report

    fps = {"without": [100.0, 100.0], "with": [90.0, 92.0], "with_shared": [80.0, 82.0]}
    own, shared = AdaptSummary(due=10, adapted=10), AdaptSummary(due=10, adapted=6)
    body = cost_report("m", "t", AdaptOptions(), fps, own, "v.mp4", shared_worker=shared)
    assert "- cost: 9.0% of frames/s" in body and body.count(": met") == 1  # the own stream's
    assert "81.0 frames/s (runs: 80.0, 82.0), cost 19.0%" in body
    assert "6 updates on 10 due frames (60%" in body
    assert "the adapter's own stream: +10.0 frames/s (+10.0% of the frames/s without" in body
    two_way = cost_report("m", "t", AdaptOptions(), {"without": [1.0], "with": [1.0]}, own, "v")
    assert "caller's stream" not in two_way
    shared_only = cost_report(
        "m", "t", AdaptOptions(), {"without": [1.0], "with": [1.0]}, own, "v", streams="shared"
    )
    assert "every=4 and budget 0.15, its updates on the caller's stream" in shared_only


def test_the_adapter_stream_setting_is_own_shared_or_a_clear_error() -> None:
    from adapt_deploy.runtime.stream_priority import STREAMS_ENV, adapter_stream_setting
    from bench.tta_cost import build_parser

    assert adapter_stream_setting({}) == "own"
    assert adapter_stream_setting({STREAMS_ENV: " Shared "}) == "shared"
    with pytest.raises(UserError, match=f"{STREAMS_ENV}: expected 'own' or 'shared', got 'x'"):
        adapter_stream_setting({STREAMS_ENV: "x"})
    assert build_parser().parse_args([]).streams == "own"
    assert build_parser().parse_args(["--streams", "both"]).streams == "both"


def test_the_cost_bundles_random_model_is_calibrated_on_the_source(tmp_path: Path) -> None:
    """bench.tta_cost's random model gets BN statistics from the source images and scaled
    residual branches: finite, moderate logits, as a trained model's (see calibrate_batchnorm);
    its training-time settings are left as they were."""
    from adapt_deploy.config import from_dict
    from adapt_deploy.models.checkpoints import build_model
    from adapt_deploy.models.resnet import BasicBlock
    from bench.common import RESIDUAL_SCALE, RGB_INPUT, calibrate_batchnorm

    source = write_gta5(tmp_path / "gta5", 3)
    config = from_dict(
        {"name": "x", "input": RGB_INPUT,
         "model": {"backbone": "resnet18", "width": 8, "num_classes": 19},
         "data": {"val": {"kind": "cityscapes", "root": ".", "split": "val", "size": [32, 64]}}}
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config.model)
    initial = copy.deepcopy(model)
    calibrate_batchnorm(model, source, (32, 64), config.input)
    assert not model.training
    first = model.backbone.bn1
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))
    assert first.momentum == initial.backbone.bn1.momentum
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    before = [m for m in initial.modules() if isinstance(m, BasicBlock)]
    pairs = list(zip(before, blocks, strict=True))
    assert pairs
    assert all(torch.allclose(b.bn2.weight, RESIDUAL_SCALE * a.bn2.weight) for a, b in pairs)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        calibrated, raw = model(x)["logits"], initial.eval()(x)["logits"]
    assert torch.isfinite(calibrated).all() and calibrated.abs().mean() < raw.abs().mean()
    unscaled = copy.deepcopy(initial)
    calibrate_batchnorm(unscaled, source, (32, 64), config.input, residual_scale=1.0)
    kept = [m for m in unscaled.modules() if isinstance(m, BasicBlock)]
    assert all(torch.equal(b.bn2.weight, a.bn2.weight) for a, b in zip(before, kept, strict=True))
    with pytest.raises(FileNotFoundError, match="no PNG image"):
        calibrate_batchnorm(model, tmp_path, (32, 64), config.input)


def test_cost_sizes_are_parsed_strictly() -> None:
    from bench.tta_cost import parse_size

    assert parse_size("512x1024") == (512, 1024)
    for bad in ("512", "0x10", "ax2", "512x1024x3"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="--adapt-size"):
        parse_size("0x10", "--adapt-size")


def test_the_cost_runs_the_fast_path_precision_by_default() -> None:
    """The goal names the fast torch path: fp16 on CUDA, where the Segmenter's own 'auto' is
    fp32 for the torch backend."""
    import torch

    from bench.tta_cost import fast_precision

    assert fast_precision("torch", "auto") == ("fp16" if torch.cuda.is_available() else "fp32")
    assert fast_precision("torch", "bf16") == "bf16"
    assert fast_precision("onnxruntime", "auto") == "auto"


def test_the_gpu_check_s_cost_flags_parse() -> None:
    """bench/gpu_check.sh runs the cost bench on the one lent GPU: a stale flag would cost it."""
    from bench.tta_cost import build_parser, parse_size

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    text = script.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "-m bench.tta_cost" in line]
    assert len(lines) == 2
    for line in lines:
        args = build_parser().parse_args(line.split("-m bench.tta_cost", 1)[1].split())
        parse_size(args.size)
        if args.adapt_size:
            parse_size(args.adapt_size, "--adapt-size")


def test_cost_videos_are_looped_frame_by_frame(tmp_path) -> None:
    import cv2

    from bench.tta_cost import loop_video

    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 15.0, (64, 32))
    for i in range(5):
        writer.write(np.full((32, 64, 3), 40 * i, np.uint8))
    writer.release()
    assert loop_video(video, 1, tmp_path) == video
    looped = loop_video(video, 3, tmp_path)
    capture = cv2.VideoCapture(str(looped))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 15
    capture.release()


def test_the_goals_compare_ours_with_the_best_other_method() -> None:
    from bench.tta.report import goals

    runs = [_run("none", 2, 10.0), _run("sar", 2, 12.0), _run("ours", 2, 13.0)]
    lines = goals(runs, 2)
    assert "- mean >= best baseline (sar, 12.5) + 1.5: MISSED (13.5 (+1.0))" in lines
    assert "- target per round >= none - 0.5: met (worst round r1: +3.0)" in lines
    assert "- last round >= first round - 1.0: met (14.0 vs 13.0)" in lines
    assert goals(runs[1:], 2) == []  # no 'none' to compare with


def test_renderings_read_back_what_the_report_wrote(tmp_path: Path) -> None:
    """tta_renderings.md compares ours with the best other method on each rendering, read from
    the reports bench.tta writes (a report that names no seed is the stream's own)."""
    fps: dict[str, list[float]] = {"without": [], "with": []}
    drive = STREAMS["drive"]
    for name, stream, values in (
        ("tta", drive, {"none": 10.0, "sar": 14.0, "rdumb": 15.0, "ours": 17.0, "ours_x": 20.0}),
        ("tta_seed3", replace(drive, seed=3), {"none": 11.0, "sar": 18.0, "ours": 17.0}),
    ):
        runs = [_run(method, 2, value) for method, value in values.items()]
        body = report(runs, stream, 2, 8, AdaptOptions(), fps, None, {}, name=name)
        if name == "tta":  # as written before reports named their seed
            body = body.replace(", rendered from seed 0", "")
        write_results(name, "On-device adaptation (bench/tta/)", body, tmp_path)
    found = renderings.stream_renderings(tmp_path, "drive")
    assert [(r.seed, r.path.name) for r in found] == [(0, "tta.md"), (3, "tta_seed3.md")]
    assert [r.best_baseline for r in found] == [("rdumb", 15.5), ("sar", 18.5)]  # ours_x is ours
    assert found[0].goals["mean >="] == "met" and found[1].goals["mean >="] == "MISSED"
    renderings.main(["--results", str(tmp_path)])
    text = (tmp_path / "tta_renderings.md").read_text()
    assert "| 0 (tuned on) | tta.md | 10.5 | rdumb 15.5 | 17.5 | +2.0 | met |" in text
    assert "| 3 | tta_seed3.md | 11.5 | sar 18.5 | 17.5 | -1.0 | MISSED |" in text
    held_out = "Held out (1 rendering): ours - best baseline -1.0 on average, from -1.0 to -1.0"
    assert held_out + "; mean goal met on 0." in text and "## second" not in text


def test_renderings_name_a_file_without_a_mean_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    only_ours = "| method | mean |\n|---|---|\n| ours | 17.0 |\n| ours_no_bank | 15.0 |\n"
    for text in ("# On-device adaptation\n\nnothing here\n", only_ours):
        (tmp_path / "tta.md").write_text(text)
        with pytest.raises(SystemExit):
            renderings.main(["--results", str(tmp_path)])
        err = capsys.readouterr().err
        assert "tta.md: no mean online mIoU table with ours and a baseline" in err
    assert not (tmp_path / "tta_renderings.md").exists()


def test_the_frame_statistics_probe_normalises_with_the_frame_on_a_copy(tmp_path: Path) -> None:
    """ours_frame_stats_1 scores a frame as BN in training mode would (each layer on the frame's
    own statistics), ours_frame_stats_0.5 halfway; the adapter's teacher is left untouched."""
    model, config = load_checkpoint(write_checkpoint(tmp_path / "tiny.pt"))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 48, 64), np.uint8))
    own = frame_stats_logits(model, images, config.input, 1.0)
    half = frame_stats_logits(model, images, config.input, 0.5)
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.train()
    with torch.no_grad():
        expected = predict_logits(reference, images, config.input, SIZE)
        fixed = predict_logits(model, images, config.input, SIZE)
    torch.testing.assert_close(own, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(half, own, atol=1e-3) and not torch.allclose(half, fixed, atol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(type(m) is not MixedBatchNorm2d for m in model.modules())
