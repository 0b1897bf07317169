"""The pieces of on-device adaptation: mixed BatchNorm, options, shift detector, safety, and
how the worker stops."""

from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from adapt_deploy.errors import UserError
from adapt_deploy.tta.adapter import StepReport
from adapt_deploy.tta.bn import MixedBatchNorm2d, mix_batchnorms, set_adapting
from adapt_deploy.tta.options import AdaptOptions, ResetPolicy, parse_threshold
from adapt_deploy.tta.safety import CollapseMonitor, Observation, ema_update, stochastic_restore
from adapt_deploy.tta.session import AdaptSetup, finish_adaptation, setup_from_flags
from adapt_deploy.tta.shift import ShiftDetector
from adapt_deploy.tta.worker import AdaptWorker


def _bn(channels: int = 4, seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


def test_mixed_bn_equals_a_plain_bn_with_its_deployed_statistics():
    bn = _bn()
    mixed = MixedBatchNorm2d(bn, prior=0.3, momentum=0.2)
    x = torch.randn(1, 4, 5, 7) * 3 + 1
    mixed.adapting = True
    mixed(x)  # one frame moves the test statistics
    mixed.adapting = False
    plain = _bn()
    plain.running_mean, plain.running_var = mixed.deployed()
    plain.load_state_dict({**mixed.state_dict(), "running_mean": plain.running_mean,
                           "running_var": plain.running_var})  # fmt: skip
    torch.testing.assert_close(mixed(x), plain(x), rtol=1e-5, atol=1e-5)
    assert set(mixed.state_dict()) == set(bn.state_dict())  # loads into a plain model


def test_mixed_bn_prior_one_keeps_the_source_and_prior_zero_follows_the_stream():
    x = torch.randn(1, 4, 6, 6) * 4 + 3  # one frame (batch size 1) far from the source
    anchored = MixedBatchNorm2d(_bn(), prior=1.0, momentum=0.5)
    following = MixedBatchNorm2d(_bn(), prior=0.0, momentum=1.0)
    for layer in (anchored, following):
        layer.adapting = True
        layer(x)
        layer.adapting = False
    torch.testing.assert_close(anchored.deployed()[0], _bn().running_mean)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(following.deployed()[0], mean)
    torch.testing.assert_close(following.deployed()[1], var)
    following.reset_statistics()
    torch.testing.assert_close(following.running_mean, _bn().running_mean)


def test_the_test_average_is_the_mean_of_its_frames_until_each_weighs_the_floor():
    layer = MixedBatchNorm2d(_bn(), prior=0.0, momentum=0.25)
    torch.manual_seed(1)
    frames = [torch.randn(1, 4, 5, 5) * (1 + i) + i for i in range(6)]
    means = [torch.var_mean(f, dim=(0, 2, 3), unbiased=False)[1] for f in frames]
    layer.adapting = True
    for k, frame in enumerate(frames[:4]):  # frame k weighs 1/(k+1) >= 0.25: a plain mean
        layer(frame)
        torch.testing.assert_close(layer.running_mean, torch.stack(means[: k + 1]).mean(0))
    before = layer.running_mean.clone()
    layer(frames[4])  # 1/5 < 0.25: the floor
    torch.testing.assert_close(layer.running_mean, before + 0.25 * (means[4] - before))
    layer.restart()  # a shift: the next frame replaces the average
    layer(frames[5])
    torch.testing.assert_close(layer.running_mean, means[5])
    assert int(layer.num_batches_tracked) == 1
    layer.reset_statistics()
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_mean, _bn().running_mean)


def test_gradient_flows_through_the_frame_share_of_the_statistics():
    layer = MixedBatchNorm2d(_bn(), prior=0.0, momentum=0.5)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    layer.adapting = True
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_mix_batchnorms_replaces_every_layer_and_keeps_outputs_in_eval():
    from adapt_deploy.models.deeplab import DeepLab

    torch.manual_seed(0)
    model = DeepLab("resnet18", 5, width=8, freeze_bn=False).eval()
    x = torch.randn(1, 3, 32, 48)
    before = model(x)["logits"]
    layers = mix_batchnorms(model, prior=0.2, momentum=0.1)
    assert len(layers) == len(model.batchnorms()) > 0
    torch.testing.assert_close(model(x)["logits"], before)
    set_adapting(layers, True)
    model(x)
    set_adapting(layers, False)
    assert not torch.allclose(model(x)["logits"], before)


@pytest.mark.parametrize(
    ("text", "collapse", "every"),
    [("collapse", True, None), ("periodic:50", False, 50), ("collapse+periodic:9", True, 9),
     ("none", False, None)],
)  # fmt: skip
def test_reset_policies(text, collapse, every):
    policy = ResetPolicy.parse(text)
    assert (policy.on_collapse, policy.every) == (collapse, every)
    assert ResetPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["sometimes", "periodic:", "periodic:0", "periodic:x"])
def test_bad_reset_policy_names_the_flag(text):
    with pytest.raises(UserError, match="--reset-policy"):
        ResetPolicy.parse(text)


def test_options_check_names_each_bad_flag():
    with pytest.raises(UserError) as info:
        AdaptOptions(every=0, params="everything", lr=-1.0, budget=0.0, source_stages=-1).check()
    for flag in (
        "--adapt-every",
        "--adapt-params",
        "--lr",
        "--adapt-budget",
        "--adapt-source-stages",
    ):
        assert flag in str(info.value)
    assert parse_threshold("auto") is None and parse_threshold("0.2") == 0.2
    with pytest.raises(UserError, match=r"student_precision must be one of .*got 'fp16'"):
        AdaptOptions(student_precision="fp16").check()  # fp16 would need a gradient scaler
    with pytest.raises(UserError, match="--threshold"):
        parse_threshold("1.5")


def test_adapt_set_reaches_every_field_without_a_flag_and_refuses_the_others():
    setup = setup_from_flags(
        True, lr=0.1, settings=["prior_fade=1.5", "condition_distance=0.2", "size=96x160"]
    )
    assert setup is not None and setup.options == AdaptOptions(
        lr=0.1, prior_fade=1.5, condition_distance=0.2, size=(96, 160)
    )
    assert setup_from_flags(True, settings=[]).options == AdaptOptions()
    with pytest.raises(UserError) as info:
        setup_from_flags(True, lr=0.1, settings=["lr=0.2", "bank_size=3", "ema=0.8"])
    assert str(info.value) == (
        "--adapt-set is for the fields without a flag (lr: use --lr; bank_size: use --adapt-bank)"
    )
    with pytest.raises(UserError, match="--adapt-set only apply with --adapt"):
        setup_from_flags(False, settings=["ema=0.8"])
    with pytest.raises(UserError, match=r"--adapt-set 'fade=2': expected FIELD=VALUE"):
        setup_from_flags(True, settings=["fade=2"])


def test_shift_detector_fires_once_on_a_change_not_on_noise():
    rng = np.random.default_rng(0)
    detector = ShiftDetector(warmup=20, cooldown=30)
    base = rng.uniform(0.2, 0.8, 19)
    noisy = [np.clip(base + rng.normal(0, 0.02, 19), 0, 1) for _ in range(200)]
    assert not any(detector.update(p) for p in noisy)
    shifted = np.clip(base[::-1] + 0.1, 0, 1)
    fired = [detector.update(np.clip(shifted + rng.normal(0, 0.02, 19), 0, 1)) for _ in range(20)]
    assert fired[0] and sum(fired) == 1


def test_ema_and_stochastic_restore():
    teacher, student = [torch.zeros(1000)], [torch.ones(1000)]
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((1000,), 0.1))
    param = nn.Parameter(torch.ones(10000))
    stochastic_restore([param], [torch.zeros(10000)], 0.1, torch.Generator().manual_seed(0))
    restored = float((param == 0).float().mean())
    assert 0.08 < restored < 0.12


def test_collapse_monitor_reasons():
    monitor = CollapseMonitor(source_entropy=0.2, source_classes=10.0, warmup=2)
    healthy = Observation(entropy=0.25, predicted_classes=11, present_classes=9)
    for _ in range(5):
        monitor.observe(healthy)
    assert monitor.check(0.3, True) is None
    assert monitor.check(float("nan"), True) == "non-finite loss or weights"
    for _ in range(20):
        monitor.observe(Observation(entropy=0.01, predicted_classes=2, present_classes=1))
    assert "predicted classes" in (monitor.check(0.3, True) or "")


class SlowAdapter:
    """What AdaptWorker uses of an OnlineAdapter, with an update that runs until `release`."""

    def __init__(self) -> None:
        self.options = AdaptOptions(every=1, budget=1.0)
        self.teacher = None
        self.entered, self.release = threading.Event(), threading.Event()

    def step(self, frame: np.ndarray, shifted: bool) -> StepReport:
        self.entered.set()
        assert self.release.wait(30)
        return StepReport(1, 0.0, {}, Observation(0.5, 5, 5), 0.01)

    def mark_synced(self) -> None:
        pass

    def on_own_stream(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class CountingSync:
    def __init__(self) -> None:
        self.pushes = self.closes = 0

    def push(self, model: object) -> SimpleNamespace:
        self.pushes += 1
        return SimpleNamespace(ok=True, seconds=0.0, reason=None)

    def close(self) -> None:
        self.closes += 1


FRAME, PRESENCE = np.zeros((8, 8, 3), np.uint8), np.full(19, 0.5)


def _busy_worker() -> tuple[AdaptWorker, SlowAdapter, CountingSync]:
    """A started worker in the middle of an update."""
    adapter, sync = SlowAdapter(), CountingSync()
    worker = AdaptWorker(adapter, sync).start()
    assert worker.offer(FRAME, PRESENCE, 0) == "adapt"
    assert adapter.entered.wait(30)
    return worker, adapter, sync


def test_close_reports_an_unfinished_update_and_closes_the_sync_once_it_ends():
    worker, adapter, sync = _busy_worker()
    summary = worker.close(timeout=0.05)
    assert summary.still_running and sync.closes == 0  # the update may still push
    assert "closed with an update still running" in summary.lines()[-1]
    began = time.perf_counter()
    assert worker.close().still_running  # closing again does not wait another 60 s
    assert time.perf_counter() - began < 1.0
    assert worker.offer(FRAME, PRESENCE, 1) == "stopped"
    adapter.release.set()
    deadline = time.monotonic() + 30
    while worker.close().still_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.summary.still_running
    assert (sync.pushes, sync.closes) == (1, 1)  # the update pushed, then the sync was closed
    worker.close()
    assert sync.closes == 1


def test_close_of_a_worker_never_started_closes_its_sync():
    sync = CountingSync()
    worker = AdaptWorker(SlowAdapter(), sync, inline=True)
    assert not worker.close().still_running and sync.closes == 1
    assert worker.offer(FRAME, PRESENCE, 0) == "stopped"  # inline: no update after close


def test_the_state_is_not_saved_while_an_update_is_still_running(tmp_path):
    worker, adapter, _ = _busy_worker()
    worker.close(timeout=0.05)  # what `stream` does when the update does not end in time
    setup = AdaptSetup(AdaptOptions(), tmp_path / "state.pt")
    began = time.perf_counter()
    lines = finish_adaptation(worker, setup, frames=3)  # SlowAdapter cannot be saved: no try
    assert time.perf_counter() - began < 1.0
    assert not setup.state.exists()
    assert lines[-1] == (
        f"adaptation state not saved: an update was still running; {setup.state} was not written"
    )
    adapter.release.set()
