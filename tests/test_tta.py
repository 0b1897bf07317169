"""On-device adaptation end to end: the adapter on a shifted stream, collapse resets, sync to a
real ONNX Runtime session with rollback, saved state, and `adapt-deploy stream --adapt`.

The model is a tiny DeepLab trained for a few seconds on band scenes whose classes vary from
image to image (so class presence means something), exported with its adaptation package.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import conftest
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from helpers import TINY_SHAPES, corrupting, write_source_checkpoint
from typer.testing import CliRunner

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.cli import app
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.normalize import normalize
from adapt_deploy.errors import UserError
from adapt_deploy.export import folding
from adapt_deploy.export.adaptation_package import load_package
from adapt_deploy.export.pipeline import export_bundle
from adapt_deploy.models.checkpoints import checkpoint_meta, load_checkpoint, save_checkpoint
from adapt_deploy.models.deploy import DeployModel
from adapt_deploy.runtime import Segmenter
from adapt_deploy.tta.adapter import OnlineAdapter
from adapt_deploy.tta.options import AdaptOptions, ResetPolicy
from adapt_deploy.tta.push import SyncResult, graph_spec
from adapt_deploy.tta.session import DEDICATED_FLAGS, AdaptSetup, open_adaptation
from adapt_deploy.tta.shift import ShiftDetector
from adapt_deploy.tta.state import load_state, resume, save_state
from adapt_deploy.tta.sync import OnnxRuntimeSync, make_sync
from adapt_deploy.tta.worker import AdaptWorker

SIZE = (36, 64)
BAND_SCENE = conftest.scene  # all six bands; `varied_scene` draws a subset through it


def varied_scene(rng: np.random.Generator, height: int, width: int):
    """conftest's band scene with a random 3 to 6 of its classes."""
    bands = tuple(rng.choice(conftest.BANDS, int(rng.integers(3, 7)), replace=False))
    original = conftest.BANDS
    conftest.BANDS = bands
    try:
        return BAND_SCENE(rng, height, width)
    finally:
        conftest.BANDS = original


def shifted(image: np.ndarray) -> np.ndarray:
    """A darker, bluer camera: the test domain."""
    out = image.astype(np.float32) * 0.4 + np.array([10.0, 20.0, 60.0])
    return np.clip(out, 0, 255).astype(np.uint8)


def presence(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels[labels < 19], minlength=19)[:19]
    return counts / max(int((labels < 19).sum()), 1) >= 0.001


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle with an adaptation package, its checkpoint): a tiny DeepLab trained 80 steps."""
    work = tmp_path_factory.mktemp("tta")
    root = work / "source"
    scene = conftest.scene
    conftest.scene = varied_scene  # write_gta5 draws its images with conftest.scene
    try:
        conftest.write_gta5(root, 24, size=SIZE)
    finally:
        conftest.scene = scene
    checkpoint = write_source_checkpoint(work / "tiny_source.pt", root, SIZE)
    model, config = load_checkpoint(checkpoint)
    data = build_dataset(config.data.source)
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(len(data))])
    labels = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(len(data))]).long()
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for _ in range(80):
        batch = torch.randint(0, len(data), (4,))
        logits = model(normalize(images[batch], config.input))["logits"]
        logits = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, labels[batch], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(checkpoint, model.eval(), checkpoint_meta(config, 80))
    bundle = export_bundle(checkpoint, work / "bundle", shapes=TINY_SHAPES, source_data=root)
    return bundle.bundle, checkpoint


def adapter_for(bundle: Path, batches_tracked: int | None = None, **options) -> OnlineAdapter:
    """An adapter on the trained tiny bundle; one adapted state (no condition bank) unless
    `bank_size` is given: these tests are about updates, the bank has its own.
    `batches_tracked`: the count every BN layer of the checkpoint is given first."""
    options.setdefault("bank_size", 0)
    meta = load_meta(bundle)
    package = load_package(bundle, meta)
    model, config = load_checkpoint(package.checkpoint)
    if batches_tracked is not None:
        for bn in model.batchnorms():
            bn.num_batches_tracked.fill_(batches_tracked)
    return OnlineAdapter(
        model,
        config.input,
        package.stats,
        AdaptOptions(threads=1, **options),
        SIZE,
        package.lse_k,
        meta["checkpoint"]["sha256"],
    )


def presence_accuracy(adapter: OnlineAdapter, frames: list) -> float:
    """Share of (frame, class) pairs where the teacher's pseudo-weak label is the truth."""
    hits = []
    for image, labels in frames:
        with torch.no_grad():
            logits = adapter.teacher(adapter.prepare(shifted(image)))["logits"]
        hits.append(adapter.pseudo_labels(logits)[0].numpy().astype(bool) == presence(labels))
    return float(np.mean(hits))


def test_the_adapter_raises_presence_accuracy_on_a_shifted_stream(trained):
    bundle, _ = trained
    # every layer adapts: on this tiny model and colour shift the early layers alone (the
    # default, source_stages 2) leave it where it was (0.889 -> 0.884; 0.947 with every layer)
    adapter = adapter_for(bundle, bn_momentum=0.5, source_stages=0)
    rng = np.random.default_rng(5)
    stream = [varied_scene(rng, *SIZE) for _ in range(10)]
    held_out = [varied_scene(rng, *SIZE) for _ in range(10)]
    before = presence_accuracy(adapter, held_out)
    for image, _ in stream:
        report = adapter.step(shifted(image))
        assert report.reset is None and np.isfinite(report.loss)
    after = presence_accuracy(adapter, held_out)
    assert after > before + 0.05, (before, after)
    assert adapter.counters.updates == 10


@pytest.mark.parametrize("stages", [0, 1, 2, 4])
def test_the_last_stages_keep_the_source_statistics_and_the_others_adapt(trained, stages):
    """The runtime gets the source statistics in the backbone's last `source_stages` stages and
    the frames' in the others."""
    bundle, _ = trained
    adapter = adapter_for(bundle, source_stages=stages)
    rng = np.random.default_rng(8)
    for _ in range(2):
        adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    kept = tuple(f"backbone.layer{k}." for k in range(5 - stages, 5))
    teacher = dict(adapter.teacher.named_buffers())
    layers = [name for name in adapter._mixed if name.startswith("backbone.")]
    assert len(layers) == len(adapter._mixed)  # the tiny model's BN layers: all in the backbone
    for name in layers:
        source = adapter.source_state[f"{name}.running_mean"]
        same = torch.equal(teacher[f"{name}.running_mean"], source)
        assert same == (stages > 0 and name.startswith(kept)), name


def test_more_kept_stages_than_the_backbone_has_is_a_user_error(trained):
    bundle, _ = trained
    with pytest.raises(UserError, match=r"--adapt-source-stages must be at most 4 .*got 5"):
        adapter_for(bundle, source_stages=5)


def test_a_forced_collapse_resets_to_the_source_weights(trained):
    bundle, _ = trained
    # entropy minimization at a huge lr on every weight: the way TENT-like updates collapse
    adapter = adapter_for(bundle, params="all", lr=50.0, entropy_weight=1.0, restore=0.0, ema=0.0)
    rng = np.random.default_rng(6)
    # the smoothed class count (0.8) falls below half the source's about 8 steps after the
    # collapse starts: 12 steps leave room
    reports = []
    for _ in range(12):
        reports.append(adapter.step(shifted(varied_scene(rng, *SIZE)[0])))
        if reports[-1].reset:
            break
    reset = reports[-1].reset
    assert reset and reset.startswith("collapse")
    assert adapter.counters.resets == 1 and adapter.counters.collapses == 1
    for name, value in adapter.teacher.state_dict().items():  # right after it: the source's
        torch.testing.assert_close(value, adapter.source_state[name])


def test_a_periodic_reset_policy(trained):
    bundle, _ = trained
    adapter = adapter_for(bundle, reset=ResetPolicy(on_collapse=True, every=3))
    rng = np.random.default_rng(7)
    reports = [adapter.step(shifted(varied_scene(rng, *SIZE)[0])) for _ in range(6)]
    assert [r.reset is not None for r in reports] == [False, False, True] * 2
    for name, value in adapter.teacher.state_dict().items():
        torch.testing.assert_close(value, adapter.source_state[name])


def _teacher_outputs(adapter: OnlineAdapter, bundle: Path, frame: np.ndarray):
    _, config = load_checkpoint(load_package(bundle, load_meta(bundle)).checkpoint)
    deploy = DeployModel(adapter.teacher, config.input, graph_spec(load_meta(bundle)))
    with torch.no_grad():
        labels, presence_ = deploy(torch.from_numpy(frame)[None])
    return labels[0].numpy(), presence_[0].numpy()


def test_updates_reach_onnxruntime_and_a_rejected_push_rolls_back(trained, monkeypatch):
    bundle, _ = trained
    adapter = adapter_for(bundle, every=1, bn_momentum=0.5, sync_every=2)
    rng = np.random.default_rng(8)
    frames = [shifted(varied_scene(rng, *SIZE)[0]) for _ in range(6)]
    with Segmenter.from_bundle(bundle, "onnxruntime", "cpu", "fp32", threads=1) as seg:
        source_out = seg(frames[0])
        model, config = load_checkpoint(load_package(bundle, load_meta(bundle)).checkpoint)
        worker = AdaptWorker(adapter, make_sync(seg, model, config.input), inline=True)
        for i, frame in enumerate(frames[:2]):
            assert worker.offer(frame, source_out.presence, i) == "adapt"
        assert worker.summary.syncs == 1 and worker.events()[-1]["event"] == "sync"
        labels, presence_ = _teacher_outputs(adapter, bundle, frames[0])
        got = seg(frames[0])
        np.testing.assert_allclose(got.presence, presence_, atol=1e-4)
        assert (got.labels == labels).mean() > 0.999
        assert not np.allclose(got.presence, source_out.presence, atol=1e-3)

        synced = {k: v.clone() for k, v in adapter.teacher.state_dict().items()}
        monkeypatch.setattr(folding, "fold", corrupting(folding.fold))
        for i, frame in enumerate(frames[2:4], start=2):
            worker.offer(frame, source_out.presence, i)
        failed = worker.events()[-1]
        assert failed["event"] == "sync_failed" and "sample check" in failed["reason"]
        assert worker.summary.sync_failures == 1 and adapter.counters.rollbacks == 1
        for name, value in adapter.teacher.state_dict().items():  # back to what ORT runs
            torch.testing.assert_close(value, synced[name])
        np.testing.assert_array_equal(seg(frames[0]).presence, got.presence)


def test_saved_state_resumes_and_is_tied_to_its_model(trained, tmp_path):
    bundle, _ = trained
    adapter = adapter_for(bundle)
    rng = np.random.default_rng(9)
    for _ in range(3):
        adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    path = tmp_path / "state.pt"
    save_state(adapter, path)
    again = adapter_for(bundle)
    assert resume(again, path) and again.counters.updates == 3
    for name, value in adapter.teacher.state_dict().items():
        torch.testing.assert_close(again.teacher.state_dict()[name], value)
    for name, value in adapter.student.state_dict().items():
        torch.testing.assert_close(again.student.state_dict()[name], value)
    assert not resume(adapter_for(bundle), tmp_path / "missing.pt")
    other = adapter_for(bundle)
    other.checkpoint_sha256 = "f" * 64
    with pytest.raises(UserError, match="checkpoint_sha256"):
        load_state(path, other)
    with pytest.raises(UserError, match="adapt-params"):
        load_state(path, adapter_for(bundle, params="all"))
    (tmp_path / "junk.pt").write_bytes(b"not a state")
    with pytest.raises(UserError, match=r"junk\.pt"):
        load_state(tmp_path / "junk.pt", adapter)


def test_a_resumed_adapter_uses_this_runs_lr_and_momentum(trained, tmp_path):
    bundle, _ = trained
    adapter = adapter_for(bundle, lr=1e-2, momentum=0.9)
    adapter.step(shifted(varied_scene(np.random.default_rng(15), *SIZE)[0]))
    path = tmp_path / "state.pt"
    save_state(adapter, path)
    again = adapter_for(bundle, lr=1e-3, momentum=0.5)  # stream --adapt-state ... --lr 1e-3
    assert resume(again, path)
    assert [(g["lr"], g["momentum"]) for g in again.optimizer.param_groups] == [(1e-3, 0.5)]
    assert again.optimizer.state  # the saved momentum buffers are kept


@pytest.mark.parametrize("params", ["bn", "bn+head", "all"])
def test_rollback_restores_everything_a_full_restore_would(trained, params):
    bundle, _ = trained
    adapter = adapter_for(bundle, params=params, restore=0.1)
    rng = np.random.default_rng(16)
    adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    adapter.mark_synced()
    synced = {
        role: {k: v.clone() for k, v in model.state_dict().items()}
        for role, model in (("student", adapter.student), ("teacher", adapter.teacher))
    }
    adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    adapter.reset("periodic: test")  # rollbacks also undo a reset since the last sync
    adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    teacher = adapter.teacher.state_dict()
    assert any(not torch.equal(v, synced["teacher"][k]) for k, v in teacher.items())
    adapter.rollback()
    for role, model in (("student", adapter.student), ("teacher", adapter.teacher)):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, synced[role][name], rtol=0, atol=0, msg=name)


def test_saved_weights_the_runtime_rejects_stop_the_set_up_and_close_the_sync(
    trained, tmp_path, monkeypatch
):
    bundle, _ = trained
    adapter = adapter_for(bundle)
    adapter.step(shifted(varied_scene(np.random.default_rng(17), *SIZE)[0]))
    path = tmp_path / "state.pt"
    save_state(adapter, path)
    closed = []
    monkeypatch.setattr(OnnxRuntimeSync, "close", lambda self: closed.append(self))
    rejected = SyncResult(False, 0.0, reason="the new weights fail the sample check")
    monkeypatch.setattr(OnnxRuntimeSync, "push", lambda self, model: rejected)
    seg = Segmenter.from_bundle(bundle, "onnxruntime", "cpu", "fp32", threads=1)
    with seg, pytest.raises(UserError, match="rejected the saved weights"):
        open_adaptation(bundle, seg, AdaptSetup(AdaptOptions(threads=1), path))
    assert len(closed) == 1


@pytest.mark.parametrize(
    ("backend", "precision", "teacher"),
    [("torch", "bf16", "bf16"), ("torch", "fp32", "fp32"), ("onnxruntime", "fp32", "fp32")],
)
def test_stream_adapt_runs_the_teacher_at_the_runtimes_precision(
    trained, backend, precision, teacher
):
    bundle, _ = trained
    with Segmenter.from_bundle(bundle, backend, "cpu", precision) as seg:
        worker = open_adaptation(bundle, seg, AdaptSetup(AdaptOptions(threads=None)))
        try:
            assert worker.adapter.teacher_precision == teacher
        finally:
            worker.close()


def _video(path: Path, count: int) -> Path:
    rng = np.random.default_rng(10)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, SIZE[::-1])
    for _ in range(count):
        writer.write(cv2.cvtColor(shifted(varied_scene(rng, *SIZE)[0]), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_stream_adapt_writes_events_and_resumes_its_state(trained, tmp_path):
    bundle, _ = trained
    video = _video(tmp_path / "drive.avi", 12)
    state, stats = tmp_path / "state.pt", tmp_path / "stats.jsonl"
    args = ["stream", str(video), "--bundle", str(bundle), "--stats", str(stats), "--adapt",
            "--adapt-every", "2", "--adapt-budget", "1.0", "--adapt-state", str(state),
            "--adapt-home", "0"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "adaptation:" in first.output and state.is_file()
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    frames = [r for r in lines if "event" not in r]
    events = [r for r in lines if "event" in r]
    assert len(frames) == 12 and {"update"} <= {e["event"] for e in events}
    updates = torch.load(state, weights_only=True)["counters"]["updates"]
    assert updates == sum(e["event"] == "update" for e in events) >= 1
    second = CliRunner().invoke(app, [*args, "--force"])  # the stats file is replaced
    assert second.exit_code == 0, second.output
    assert "resumed adaptation" in second.output
    assert torch.load(state, weights_only=True)["counters"]["updates"] > updates


def test_adapt_wait_updates_on_every_due_frame_and_a_video_adapts_the_same_on_every_run(
    trained, tmp_path
):
    bundle, _ = trained
    video = _video(tmp_path / "drive.avi", 12)
    runs = []
    for run in ("a", "b"):
        labels, stats = tmp_path / f"labels_{run}", tmp_path / f"stats_{run}.jsonl"
        args = ["stream", str(video), "--bundle", str(bundle), "--labels-dir", str(labels),
                "--stats", str(stats), "--adapt", "--adapt-every", "2", "--adapt-wait",
                "--adapt-home", "0"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        said = re.search(r"(\d+) updates on (\d+) due frames \(the stream waited", result.output)
        assert said and said[1] == said[2] and int(said[1]) >= 6, result.output
        events = [json.loads(line) for line in stats.read_text().splitlines()]
        updates = [{k: v for k, v in e.items() if k != "ms"} for e in events
                   if e.get("event") == "update"]  # fmt: skip
        assert len(updates) == int(said[1])
        pngs = {p.name: p.read_bytes() for p in sorted(labels.iterdir())}
        runs.append((updates, pngs))
    assert runs[0] == runs[1]  # the same updates, losses included, and the same labels
    assert len(runs[0][1]) == 12


def test_adapt_wait_takes_no_budget_and_needs_adapt(trained, tmp_path):
    bundle, _ = trained
    video = _video(tmp_path / "drive.avi", 3)
    args = ["stream", str(video), "--bundle", str(bundle), "--adapt-wait"]
    result = CliRunner().invoke(app, args)
    assert "--adapt-wait only apply with --adapt" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--adapt", "--adapt-budget", "0.5"])
    assert isinstance(result.exception, UserError)
    assert "--adapt-budget does not apply with --adapt-wait" in str(result.exception)


def test_adapt_needs_a_bundle_with_a_package(tiny_bundle, tmp_path):
    video = _video(tmp_path / "drive.avi", 3)
    args = ["stream", str(video), "--bundle", str(tiny_bundle), "--adapt"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)  # main() prints it as one line, exit 1
    assert "no adaptation package" in str(result.exception)
    assert "--source-data" in str(result.exception)


def test_adaptation_flags_without_adapt_are_refused(tiny_bundle, tmp_path):
    video = _video(tmp_path / "drive.avi", 3)
    args = ["stream", str(video), "--bundle", str(tiny_bundle), "--adapt-every", "2"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert "only apply with --adapt" in str(result.exception)
    result = CliRunner().invoke(app, [*args[:-2], "--adapt-bank", "3"])
    assert "--adapt-bank only apply with --adapt" in str(result.exception)


def test_every_dedicated_adaptation_flag_is_a_stream_option():
    """--adapt-set refuses the fields these flags set: each must be a real `stream` option."""
    stream = typer.main.get_command(app).commands["stream"]  # type: ignore[attr-defined]
    options = {opt for param in stream.params for opt in param.opts}
    assert set(DEDICATED_FLAGS) <= options and "--adapt-set" in options


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--adapt-home", "near", "--adapt-home: expected 'auto' or a distance >= 0, got 'near'"),
        ("--adapt-home", "-1", "--adapt-home: expected 'auto' or a distance >= 0, got '-1'"),
        ("--adapt-bank", "-2", "--adapt-bank must be >= 0, got -2"),
        ("--adapt-source-stages", "-1", "--adapt-source-stages must be >= 0, got -1"),
        ("--adapt-set", "prior_fade=-1", "--adapt-set: prior_fade must be >= 0, got -1.0"),
        ("--adapt-set", "ema=high", "--adapt-set 'ema=high': expected float"),
    ],
)
def test_bad_bank_flags_are_named(tiny_bundle, tmp_path, flag, value, says):
    video = _video(tmp_path / "drive.avi", 3)
    args = ["stream", str(video), "--bundle", str(tiny_bundle), "--adapt", flag, value]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError) and str(result.exception) == says


def test_more_kept_stages_than_the_model_has_stops_the_stream_before_it_writes(trained, tmp_path):
    bundle, _ = trained
    video = _video(tmp_path / "drive.avi", 3)
    stats, state = tmp_path / "stats.jsonl", tmp_path / "state.pt"
    args = ["stream", str(video), "--bundle", str(bundle), "--stats", str(stats), "--adapt",
            "--adapt-state", str(state), "--adapt-source-stages", "5"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == (
        "--adapt-source-stages must be at most 4 (the backbone's stages), got 5"
    )
    assert not stats.exists() and not state.exists()


def test_a_source_without_usable_frames_writes_nothing(trained, tmp_path):
    bundle, _ = trained
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not an image")
    stats, state = tmp_path / "stats.jsonl", tmp_path / "state.pt"
    args = ["stream", str(folder), "--bundle", str(bundle), "--stats", str(stats), "--adapt",
            "--adapt-state", str(state)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert "no usable frames" in str(result.exception)
    assert not stats.exists() and not state.exists()


def test_the_worker_skips_frames_over_budget_but_never_a_shift(trained):
    bundle, _ = trained
    worker = AdaptWorker(
        adapter_for(bundle, every=1, budget=1e-6), None, ShiftDetector(warmup=5, cooldown=10)
    ).start()
    frame = shifted(varied_scene(np.random.default_rng(11), *SIZE)[0])
    steady, changed = np.full(19, 0.3), np.full(19, 0.9)
    assert worker.offer(frame, steady, 0) == "adapt"  # nothing spent yet
    deadline = time.monotonic() + 60
    while worker.summary.adapted < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.summary.adapted == 1
    assert [worker.offer(frame, steady, i) for i in range(1, 6)] == ["budget"] * 5
    assert worker.offer(frame, changed, 6) == "adapt"  # a detected shift is always adapted
    summary = worker.close()
    assert (summary.adapted, summary.skipped_budget, summary.shifts) == (2, 5, 1)
    assert [e["event"] for e in worker.events()].count("update") == 2


def test_every_loss_term_runs_and_only_the_chosen_parameters_move(trained):
    bundle, _ = trained
    adapter = adapter_for(
        bundle, params="bn+head", entropy_weight=1.0, pixel_weight=1.0, prototype_weight=0.5,
        restore=0.0, confidence=0.5,
    )  # fmt: skip
    rng = np.random.default_rng(12)
    for _ in range(2):
        report = adapter.step(shifted(varied_scene(rng, *SIZE)[0]))
    assert set(report.losses) == {"weak", "entropy", "pixel", "prototype"}
    assert all(np.isfinite(v) for v in report.losses.values())
    student = adapter.student.state_dict()
    moved = {k for k, v in adapter.source_state.items() if not torch.equal(student[k], v)}
    assert any(k.startswith("head.") for k in moved)
    assert any(k.endswith("bn1.weight") for k in moved)
    assert not any(k.endswith("conv1.weight") for k in moved)  # convs are not trained


def test_the_worker_saves_its_state_while_adapting(trained, tmp_path):
    bundle, _ = trained
    path = tmp_path / "state.pt"
    worker = AdaptWorker(adapter_for(bundle, every=1), None, inline=True, state=path, save_every=0)
    frame = shifted(varied_scene(np.random.default_rng(13), *SIZE)[0])
    worker.offer(frame, np.full(19, 0.5), 0)
    assert path.is_file()  # a process killed now still resumes from this update
    again = adapter_for(bundle)
    assert resume(again, path) and again.counters.updates == 1


def test_the_perception_loop_example_adapts_beside_its_loop(trained, tmp_path):
    bundle, _ = trained
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(14)
    for i in range(6):
        image = shifted(varied_scene(rng, *SIZE)[0])
        cv2.imwrite(str(folder / f"{i}.png"), image[:, :, ::-1])
    example = Path(__file__).parents[1] / "examples" / "perception_loop.py"
    command = [sys.executable, str(example), str(bundle), str(folder), "--adapt", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "6 frames" in result.stdout and "adaptation:" in result.stdout


def test_the_adapter_trains_on_the_segmenters_gpu_only_where_torch_reaches_it() -> None:
    from adapt_deploy.tta.session import adapter_device

    assert adapter_device("cpu") == "cpu"
    expected = "cuda:1" if torch.cuda.is_available() else "cpu"
    assert adapter_device("cuda:1") == expected  # TensorRT / ORT CUDA segmenters included
