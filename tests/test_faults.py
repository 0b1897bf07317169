"""Fault-probe regressions (issue 13): bad data, configs, checkpoints, bundles, videos, full
disks and signals, tried as a user runs them.

Each case runs the real entry point (`adapt_deploy.cli.main`, in this process where that is
faithful, in a subprocess where signals, resource limits or native stderr matter) and checks
three things: the exit code, one line on stderr naming the file or key, and that every file
that existed before is byte-identical afterwards. The TensorRT items (16-21) are in
test_faults_tensorrt.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import write_gta5
from helpers import RGB_INPUT, TINY_SHAPES, tiny_config, write_checkpoint
from onnx import numpy_helper
from PIL import Image

from adapt_deploy import cli
from adapt_deploy.bundle.meta import load_meta, sha256_file
from adapt_deploy.data.synthetic import ego_vehicle_mask
from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.doctor import Check
from adapt_deploy.labels import EGO_VEHICLE_LABEL_ID
from adapt_deploy.models.checkpoints import build_model, checkpoint_meta, save_checkpoint

SIZE = (64, 128)  # (H, W) of the test videos


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def run_main(capfd: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    """`adapt-deploy ARGS` through the real entry point in this process: (exit code, stdout,
    stderr)."""
    argv = sys.argv
    sys.argv = ["adapt-deploy", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def run_subprocess(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """`adapt-deploy ARGS` in a new process."""
    command = [sys.executable, "-m", "adapt_deploy.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def one_line(stderr: str) -> str:
    """The one `error:` line a user error prints; fails on a traceback or on OpenCV/FFmpeg log
    lines (`[ WARN:...`, `[mov,mp4 @ ...]`). Progress bars may share stderr."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and not any(line.startswith("[") for line in lines), stderr
    return errors[0]


def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under `roots` (files themselves included)."""
    files: Iterable[Path] = []
    for root in roots:
        files = [*files, *([root] if root.is_file() else sorted(root.rglob("*")))]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def unchanged(before: dict[Path, str]) -> bool:
    return all(p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == h
               for p, h in before.items())  # fmt: skip


def write_video(path: Path, count: int, size: tuple[int, int] = SIZE) -> Path:
    """A real mp4v video of moving colour bands, written by OpenCV."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size[::-1])
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    for i in range(count):
        rows = (np.arange(size[0])[:, None] + 3 * i) // 8 % 8
        image = np.ascontiguousarray(np.broadcast_to(colours[rows], (*size, 3)))
        writer.write(image)
    writer.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("faults") / "in.mp4", 6)


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    """An image folder of 3 frames."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        image = np.full((*SIZE, 3), 40 * i, np.uint8)
        cv2.imwrite(str(folder / f"frame_{i}.png"), image)
    return folder


# --------------------------------------------------------------------------------------------
# 1, 2: stream never destroys what it reads or what exists
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--out", "--stats"])
def test_1_an_output_onto_the_input_video_is_refused(tiny_bundle, video, option, capfd, tmp_path):
    linked = tmp_path / "link.mp4"
    os.link(video, linked)  # the same file under another name
    before = snapshot(video)
    for target in (video, linked):
        code, _, err = run_main(capfd, "stream", video, "--bundle", tiny_bundle, option, target)
        line = one_line(err)
        assert code == 2 and option in line and str(target) in line and "input" in line, err
    assert unchanged(before)


def test_1_outputs_inside_the_input_folder_or_the_bundle_are_refused(tiny_bundle, frames, capfd):
    before = snapshot(frames, tiny_bundle)
    cases = [
        ("--labels-dir", frames),
        ("--labels-dir", frames / "sub"),
        ("--out", frames / "overlay.mkv"),
        ("--stats", frames / "stats.jsonl"),
        ("--stats", tiny_bundle / "stats.jsonl"),
    ]
    for option, target in cases:
        code, _, err = run_main(capfd, "stream", frames, "--bundle", tiny_bundle, option, target)
        line = one_line(err)
        assert code == 2 and option in line and "inside the input folder" in line, err
    assert unchanged(before) and snapshot(frames, tiny_bundle) == before  # nothing added


def test_1_labels_dir_holding_the_input_frames_is_refused(tiny_bundle, tmp_path, capfd):
    folder = tmp_path / "labels"
    folder.mkdir()
    cv2.imwrite(str(folder / "000000.png"), np.zeros((*SIZE, 3), np.uint8))
    before = snapshot(folder)
    for force in ([], ["--force"]):  # --force never lifts it
        code, _, err = run_main(capfd, "stream", str(folder / "*.png"), "--bundle", tiny_bundle,
                                "--labels-dir", folder, *force)  # fmt: skip
        line = one_line(err)
        assert code == 2 and "--labels-dir" in line and "000000.png" in line
        assert unchanged(before)


def test_1_existing_outputs_need_force_and_force_replaces_them(tiny_bundle, video, tmp_path, capfd):
    truth = tmp_path / "gt"
    truth.mkdir()
    for i in range(8):  # a ground-truth label folder, one more file than the video has frames
        cv2.imwrite(str(truth / f"{i:06d}.png"), np.full(SIZE, 7, np.uint8))
    out, stats = tmp_path / "o.mkv", tmp_path / "s.jsonl"
    out.write_bytes(b"an earlier overlay")
    stats.write_text('{"index": 0}\n')
    before = snapshot(truth, out, stats)
    for option, target in (("--out", out), ("--stats", stats), ("--labels-dir", truth)):
        code, _, err = run_main(capfd, "stream", video, "--bundle", tiny_bundle, option, target)
        line = one_line(err)
        assert code == 2 and f"{option} {target}" in line and "pass --force to replace" in line
    assert unchanged(before)
    code, _, err = run_main(capfd, "stream", video, "--bundle", tiny_bundle, "--out", out,
                         "--stats", stats, "--labels-dir", truth, "--force")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in truth.iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert len(stats.read_text().splitlines()) == 6
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT) == 6
    assert not list(tmp_path.glob(".*partial*")) and not list(truth.glob(".partial*"))


def test_2_a_source_without_usable_frames_keeps_the_existing_stats(tiny_bundle, tmp_path, capfd):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    stats = tmp_path / "old.jsonl"
    stats.write_text('{"index": 0}\n{"index": 1}\n')
    before = snapshot(stats)
    code, _, err = run_main(capfd, "stream", broken, "--bundle", tiny_bundle, "--stats", stats)
    assert code == 2 and "pass --force" in one_line(err) and unchanged(before)
    code, _, err = run_main(capfd, "stream", broken, "--bundle", tiny_bundle, "--stats", stats,
                            "--force")  # fmt: skip
    line = one_line(err)
    assert code == 2 and "no usable frames" in line and str(broken) in line
    assert unchanged(before) and not list(tmp_path.glob(".old.partial*"))


# --------------------------------------------------------------------------------------------
# 3: a disk that fills mid-run
# --------------------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_3_a_disk_that_fills_mid_run_is_an_error_and_replaces_nothing(
    tiny_bundle, tmp_path, suffix
):
    source = write_video(tmp_path / "long.mp4", 60, size=(128, 256))
    out = tmp_path / f"o{suffix}"
    out.write_bytes(b"the previous overlay")
    before = snapshot(out, source)
    result = run_subprocess(
        "stream", source, "--bundle", tiny_bundle, "--out", out, "--force",
        preexec_fn=_file_size_limit(40_000),
    )  # fmt: skip
    line = one_line(result.stderr)
    assert result.returncode == 2, result.stderr
    assert f"--out {out}: only" in line and "of 60 frames reached the file" in line
    assert unchanged(before) and not list(tmp_path.glob(".o.partial*"))


def test_3_frames_written_are_counted_in_the_finished_file(tiny_bundle, video, tmp_path):
    from adapt_deploy.runtime import Segmenter
    from adapt_deploy.stream import StreamOptions, open_source, stream

    with Segmenter.from_bundle(tiny_bundle, backend="onnxruntime") as seg:
        summary = stream(open_source(str(video)), seg, StreamOptions(out=tmp_path / "o.avi"))
    assert summary.written == {"overlay": 6}
    assert any(line.endswith("o.avi (6 frames written)") for line in summary.lines())


# --------------------------------------------------------------------------------------------
# 4: verify is not fooled by a meta.json that loosens its own tolerances
# --------------------------------------------------------------------------------------------


def test_4_verify_fails_a_swapped_model_even_with_tolerances_loosened(tiny_bundle, tmp_path, capfd):
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(tiny_bundle), str(bundle)], check=True)
    model = onnx.load(str(bundle / "model.onnx"))
    for init in model.graph.initializer:  # another model: the classifier's sign flipped
        array = numpy_helper.to_array(init)
        if array.ndim == 4 and array.shape[0] == 19:
            init.CopyFrom(numpy_helper.from_array(-array, init.name))
    onnx.save(model, str(bundle / "model.onnx"))
    meta = load_meta(bundle)
    digest = sha256_file(bundle / "model.onnx")
    meta["models"]["fp32"]["sha256"] = digest
    meta["models"]["fp32"]["files"]["model.onnx"] = digest
    meta["tolerances"]["fp32"] = {"min_label_agreement": 0.0, "max_presence_diff": 1.0}
    (bundle / "meta.json").write_text(json.dumps(meta, indent=2))
    before = snapshot(bundle)
    code, _, _ = run_main(capfd, "verify", bundle, "--precision", "fp32")
    assert code == 1
    assert unchanged(before)


# --------------------------------------------------------------------------------------------
# 5, 15: the synthetic benchmark
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--num-source", "-1"), ("--num-videos", "-2"), ("--video-frames", "-5"),
     ("--video-frames", "0"), ("--num-target-val", "-1")],
)  # fmt: skip
def test_5_synth_refuses_negative_counts(option, value, tmp_path, capfd):
    out = tmp_path / "synth"
    code, _, err = run_main(capfd, "synth", "--out", out, option, value)
    line = one_line(err)
    assert code == 2 and option in line and value in line
    assert not out.exists()


def test_5_a_short_video_is_written(tmp_path):
    spec = SynthSpec(num_source=0, num_target_train=0, num_target_val=0, video_frames=3,
                     target_size=(64, 128))  # fmt: skip
    manifest = write_benchmark(tmp_path / "b", spec, workers=1)
    assert manifest["counts"]["video_frames"] == 3
    assert len(list((tmp_path / "b" / "videos" / "drive_00" / "labels").iterdir())) == 3


def test_15_the_ego_hood_is_label_id_1_and_label_ids_stay_in_0_to_33(tmp_path):
    spec = SynthSpec(num_source=2, num_target_train=2, num_target_val=1, num_videos=0,
                     source_size=(72, 128), target_size=(64, 128))  # fmt: skip
    write_benchmark(tmp_path / "b", spec, workers=1)
    target = sorted((tmp_path / "b" / "target" / "gtFine").rglob("*_labelIds.png"))
    source = sorted((tmp_path / "b" / "source" / "labels").glob("*.png"))
    assert len(target) == 3 and len(source) == 2
    hood = ego_vehicle_mask("target", 64, 128)
    assert hood is not None and hood.any() and ego_vehicle_mask("source", 72, 128) is None
    for path in target + source:
        ids = np.asarray(Image.open(path))
        assert ids.max() <= 33, path
    for path in target:
        ids = np.asarray(Image.open(path))
        assert (ids[hood] == EGO_VEHICLE_LABEL_ID).all() and not (ids[~hood] == 1).any()


# --------------------------------------------------------------------------------------------
# 6: doctor's install hints
# --------------------------------------------------------------------------------------------


def test_6_doctor_prints_the_install_hints_with_their_brackets(monkeypatch, capfd):
    checks = [
        Check("onnxruntime", "missing", True, "pip install 'adapt-deploy[cpu]'"),
        Check("tensorrt", "missing", True, "on a GPU machine: pip install 'adapt-deploy[trt]'"),
        Check("cv2", "[broken]", False, "reinstall"),
    ]
    monkeypatch.setattr("adapt_deploy.doctor.run_checks", lambda: checks)
    monkeypatch.setenv("COLUMNS", "200")
    code, output, _ = run_main(capfd, "doctor")
    assert code == 1
    assert "adapt-deploy[cpu]" in output and "adapt-deploy[trt]" in output and "[broken]" in output


# --------------------------------------------------------------------------------------------
# 7-9, 11: training
# --------------------------------------------------------------------------------------------


def test_7_a_label_of_unknown_ids_is_named_even_from_a_loader_worker(
    tiny_config_file, gta5_root, capfd
):
    label = gta5_root / "labels" / "00003.png"
    cv2.imwrite(str(label), np.full((36, 64), 200, np.uint8))  # not one labelId
    before = snapshot(gta5_root)
    for workers in ("0", "1"):
        code, _, err = run_main(capfd, "train", "--config", tiny_config_file, "--set",
                             f"data.num_workers={workers}", "--set", "data.cache=false",
                             "--out", tiny_config_file.parent / f"run{workers}")  # fmt: skip
        line = one_line(err)
        assert code == 2 and str(label) in line and "found 200" in line, err
    assert unchanged(before)


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.lr=-1", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
     ("optim.momentum=-0.5", "optim.momentum"), ("optim.momentum=1.5", "optim.momentum"),
     ("optim.weight_decay=-1e-4", "optim.weight_decay"), ("model.width=0", "model.width"),
     ("model.aspp_branches=5", "model.aspp_branches"), ("train.log_every=0", "train.log_every"),
     ("input.mean=[1, .nan, 3]", "input.mean")],
)  # fmt: skip
def test_8_bad_values_are_named_before_training(tiny_config_file, override, key, capfd):
    out = tiny_config_file.parent / "run"
    code, _, err = run_main(capfd, "train", "--config", tiny_config_file, "--set", override,
                         "--out", out)  # fmt: skip
    line = one_line(err)
    assert code == 2 and f"'{key}'" in line and str(tiny_config_file) in line, err
    assert not out.exists()


@pytest.fixture
def finished_run(tiny_config_file: Path, capfd) -> Path:
    """A run directory of 2 iterations (checkpoint, trainer state, config)."""
    out = tiny_config_file.parent / "run"
    code, _, err = run_main(capfd, "train", "--config", tiny_config_file, "--set",
                         "train.iterations=2", "--out", out)  # fmt: skip
    assert code == 0, err
    return out


def _pickled_payload(path: Path, marker: Path) -> Path:
    """A torch-saved file whose unpickling would create `marker` (it must never run)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"iteration": 1, "model": Payload()}, path)
    return path


def test_9_resume_from_a_cut_or_foreign_trainer_state_is_named(
    finished_run, tiny_config_file, capfd
):
    state = finished_run / "trainer_state.pt"
    data = state.read_bytes()
    marker = finished_run / "payload-ran"
    variants = {
        "cut": data[: len(data) // 2],
        "text": b"not a state",
        "pickle": _pickled_payload(finished_run / "p.pt", marker).read_bytes(),
        "other": _saved({"weights": torch.zeros(3)}),
    }
    for name, content in variants.items():
        state.write_bytes(content)
        before = snapshot(finished_run)
        code, _, err = run_main(capfd, "train", "--config", tiny_config_file, "--set",
                             "train.iterations=4", "--out", finished_run, "--resume")  # fmt: skip
        line = one_line(err)
        assert code == 2 and str(state) in line, (name, err)
        assert "weights_only=False" not in err and not marker.exists()
        assert unchanged(before), name


def _saved(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_11_sigterm_saves_the_state_and_exits_143(tiny_config_file, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "adapt_deploy.cli", "train", "--config",
               str(tiny_config_file), "--set", "train.iterations=100000", "--set",
               "train.checkpoint_every=100000", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    assert not (out / "trainer_state.pt").exists()  # nothing saved before the signal
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["iteration"] >= 3
    resumed = run_subprocess("train", "--config", tiny_config_file, "--set",
                             f"train.iterations={state['iteration'] + 2}", "--set",
                             "train.checkpoint_every=100000", "--out", out, "--resume")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


# --------------------------------------------------------------------------------------------
# 10, 12: adapter states and checkpoints that are not what they claim
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with an adaptation package (exported with --source-data)."""
    from adapt_deploy.export.pipeline import export_bundle

    work = tmp_path_factory.mktemp("adapt_bundle")
    source = write_gta5(work / "source", 6)
    torch.manual_seed(0)
    config = tiny_config(RGB_INPUT)
    config.data.source.root, config.data.source.size = str(source), [36, 64]
    checkpoint = work / "tiny.pt"
    save_checkpoint(checkpoint, build_model(config.model), checkpoint_meta(config, 0))
    return export_bundle(checkpoint, work / "bundle", shapes=TINY_SHAPES, source_data=source,
                         adapt_images=6).bundle  # fmt: skip


def test_10_an_adapt_state_of_another_shape_is_named(adapt_bundle, video, tmp_path, capfd):
    state = tmp_path / "state.pt"
    args = ["stream", video, "--bundle", adapt_bundle, "--adapt", "--adapt-state", state,
            "--device", "cpu", "--max-frames", "2"]  # fmt: skip
    code, _, err = run_main(capfd, *args)
    assert code == 0 and state.is_file(), err
    saved = torch.load(state, weights_only=True)
    name = next(k for k, v in saved["student"].items() if v.ndim == 4)
    saved["student"][name] = torch.zeros(3, 3, 1, 1)
    torch.save(saved, state)
    before = snapshot(state)
    code, _, err = run_main(capfd, *args)
    line = one_line(err)
    assert code == 2 and str(state) in line and f"'student.{name}'" in line, err
    assert "expected shape" in line
    assert unchanged(before)


def test_12_a_checkpoint_that_is_not_weights_only_is_refused_as_such(tmp_path, capfd):
    marker = tmp_path / "payload-ran"
    checkpoint = _pickled_payload(tmp_path / "model.pt", marker)
    before = snapshot(checkpoint)
    for args in (["export", checkpoint, "--out", tmp_path / "b"],
                 ["evaluate", checkpoint, "--data", tmp_path]):  # fmt: skip
        code, _, err = run_main(capfd, *args)
        line = one_line(err)
        assert code == 2 and str(checkpoint) in line and "not a weights-only checkpoint" in line
        assert "weights_only=False" not in err and "will not be loaded" in line
    assert not marker.exists() and not (tmp_path / "b").exists()
    assert unchanged(before)


def test_12_a_cut_checkpoint_is_named(tmp_path, capfd):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    code, _, err = run_main(capfd, "export", checkpoint, "--out", tmp_path / "b")
    line = one_line(err)
    assert code == 2 and f"{checkpoint}: not a readable checkpoint (cut short" in line


# --------------------------------------------------------------------------------------------
# 13, 14: videos that are not videos
# --------------------------------------------------------------------------------------------


def test_13_a_text_file_named_mp4_is_not_called_cut_short(tiny_bundle, tmp_path, capfd):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file\n" * 20)
    code, _, err = run_main(capfd, "stream", fake, "--bundle", tiny_bundle)
    line = err.strip().splitlines()[-1]  # in this process OpenCV logs as it was set up first
    assert code == 2 and "not an MP4 file" in line and "cut short" not in line


def test_14_no_opencv_or_ffmpeg_lines_before_the_error(tiny_bundle, video, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file\n" * 20)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[:2000])
    for source, words in ((fake, "not an MP4 file"), (cut, "no index (moov atom)")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
        result = run_subprocess("stream", source, "--bundle", tiny_bundle, env=env)
        assert result.returncode == 2 and words in one_line(result.stderr), result.stderr
