"""Mixed-precision training on the CPU (autocast bf16 and fp16, the fp16 gradient scaler),
channels_last and torch.compile, on the tiny model: the numerics path the GPU runs, checked here.

CPU autocast casts convolutions and matmuls as CUDA autocast does; the differences between the
two (speed, cuDNN's algorithms) are bench/train_speed.py's and tests/test_gpu.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import method_overrides
from helpers import assert_same_weights

from adapt_deploy.adapt import losses as L
from adapt_deploy.config import METHODS, load_config
from adapt_deploy.data.weak import write_class_stats, write_points
from adapt_deploy.engine import train as train_module
from adapt_deploy.engine.precision import MixedPrecision
from adapt_deploy.engine.train import build_learner, train, train_step
from adapt_deploy.errors import ConfigError
from adapt_deploy.models.checkpoints import read_checkpoint

CPU = torch.device("cpu")


@pytest.fixture
def weak_labels(cityscapes_root: Path) -> Path:
    """The target's class statistics and point labels (wda_image, wda_point)."""
    write_class_stats(cityscapes_root, "cityscapes", "train")
    write_points(cityscapes_root, "cityscapes", "train", seed=0)
    return cityscapes_root


def _metrics(run: Path) -> list[dict[str, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    # Training records (not evaluations), without the throughput (a timing, not a result).
    return [
        {k: v for k, v in r.items() if k != "images_per_second"} for r in records if "loss" in r
    ]


def _source_batch() -> dict[str, torch.Tensor]:
    """A seeded labelled batch of two 32x64 images with their image-level labels (WDA)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (2, 3, 32, 64), generator=gen, dtype=torch.uint8),
        "label": torch.randint(0, 19, (2, 32, 64), generator=gen),
        "image_labels": torch.randint(0, 2, (2, 19), generator=gen).float(),
    }


@pytest.mark.parametrize("method", METHODS)
def test_bf16_training_follows_fp32_and_keeps_fp32_weights(
    tmp_path: Path, tiny_config_file: Path, weak_labels: Path, method: str
) -> None:
    """Two iterations of every method under bf16 autocast: finite losses near fp32's, every
    loss term logged as in fp32, and the checkpoint's weights in fp32."""
    base = [f"train.method={method}", "train.iterations=2", "adapt.lambda_adv=0.1"]
    base += method_overrides(method, tiny_config_file, tmp_path)
    runs = {}
    for precision in ("fp32", "bf16"):
        config = load_config(tiny_config_file, [*base, f"train.precision={precision}"])
        result = train(config, tmp_path / precision, evaluate_at_end=False)
        runs[precision] = (_metrics(tmp_path / precision), result.checkpoint)
    (fp32, _), (bf16, checkpoint) = runs["fp32"], runs["bf16"]
    for low, full in zip(bf16, fp32, strict=True):
        assert low.keys() == full.keys()
        assert all(math.isfinite(v) for v in low.values())
        # bf16 keeps 8 bits of mantissa: the losses agree to a few percent.
        assert low["loss"] == pytest.approx(full["loss"], rel=0.05, abs=0.02)
    weights = read_checkpoint(checkpoint)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_losses_are_computed_in_fp32_under_autocast(tiny_config_file: Path) -> None:
    """Every loss of wda_uda (segmentation, adversarial, weak, category, both discriminators)
    comes out in fp32 under bf16 autocast, while the model's convolutions ran in bf16."""
    config = load_config(tiny_config_file, ["train.method=wda_uda", "train.precision=bf16"])
    learner = build_learner(config, CPU)
    source = _source_batch()
    image = source["image"]
    with learner.amp.autocast():
        out = learner.model(learner.method.input(source))
        assert out["logits"].dtype == torch.bfloat16  # the forward did run in bf16
        losses = learner.method.source_losses(source)
        losses |= learner.method.target_losses({"image": image})
        losses |= learner.method.discriminator_losses()
    assert set(losses) == {"seg", "adv", "weak", "cat_adv", "d_out", "d_cat"}
    assert {k: v.dtype for k, v in losses.items()} == dict.fromkeys(losses, torch.float32)


def test_loss_functions_upcast_half_inputs_and_keep_fp64() -> None:
    logits = torch.randn(2, 19, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 19, (2, 4, 5))
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        x = logits.to(dtype)
        assert L.segmentation_loss(x, labels).dtype == expected
        assert L.entropy_loss(x).dtype == expected
        assert L.adversarial_loss(x, L.SOURCE_LABEL).dtype == expected
        d, y = x[:, :, 0, 0], (logits[:, :, 0, 0] > 0).float()
        assert L.category_adversarial_loss(d, y).dtype == expected
        assert L.weak_label_loss(d, y).dtype == expected


def test_fp16_scales_the_losses_and_resumes_with_its_scale(
    tmp_path: Path, tiny_config_file: Path
) -> None:
    """fp16 runs with a gradient scaler whose state is saved and restored: a run stopped after
    two iterations and resumed for two more equals four straight iterations."""
    common = ["train.method=adaptsegnet", "train.precision=fp16", "optim.schedule_iters=4"]
    straight = load_config(tiny_config_file, [*common, "train.iterations=4"])
    train(straight, tmp_path / "straight", evaluate_at_end=False)
    first = load_config(tiny_config_file, [*common, "train.iterations=2"])
    train(first, tmp_path / "split", evaluate_at_end=False)
    state = torch.load(tmp_path / "split" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # the loss scale of fp16 (65536 at the start)
    train(straight, tmp_path / "split", resume=True, evaluate_at_end=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert [m["loss"] for m in _metrics(tmp_path / "straight")] == pytest.approx(
        [m["loss"] for m in _metrics(tmp_path / "split")], rel=1e-5
    )
    final = torch.load(tmp_path / "split" / "trainer_state.pt", weights_only=True)["scaler"]
    assert final == torch.load(tmp_path / "straight" / "trainer_state.pt")["scaler"]


def test_fp16_skips_a_step_whose_gradients_overflow(tiny_config_file: Path) -> None:
    """A scale so large that the fp16 gradients overflow: the step is skipped (weights
    unchanged) and the scale is lowered, as the scaler's contract says."""
    config = load_config(tiny_config_file, ["train.precision=fp16"])
    learner = build_learner(config, CPU)
    learner.amp.scaler.load_state_dict(
        {"scale": 2.0**120, "growth_factor": 2.0, "backoff_factor": 0.5,
         "growth_interval": 2000, "_growth_tracker": 0}
    )  # fmt: skip
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    source = {
        "image": torch.randint(0, 256, (2, 3, 36, 64), generator=gen, dtype=torch.uint8),
        "label": torch.randint(0, 19, (2, 36, 64), generator=gen),
    }
    train_step(learner, source, None, config, 0)
    after = learner.model.state_dict()
    weights = [k for k in before if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(before[k], after[k]) for k in weights)  # BN statistics do move
    assert learner.amp.scaler.get_scale() == 2.0**119


def test_channels_last_gives_the_same_step(tiny_config_file: Path) -> None:
    """The CUDA layout (channels_last model and inputs) computes the same losses and weights
    as the contiguous layout, here on the CPU."""
    config = load_config(tiny_config_file, ["train.method=wda_uda"])
    source = _source_batch()
    image = source["image"]
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        learner = build_learner(config, CPU)
        learner.amp = MixedPrecision("fp32", CPU, channels_last=channels_last)
        learner.model.to(memory_format=learner.amp.memory_format)
        learner.method.memory_format = learner.amp.memory_format
        torch.manual_seed(1)
        metrics = train_step(learner, source, {"image": image}, config, 0)
        conv = learner.model.state_dict()["backbone.conv1.weight"]
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        results.append((metrics, learner.model.state_dict()))
    (m0, w0), (m1, w1) = results
    assert m1 == pytest.approx(m0, rel=1e-4, abs=1e-6)
    for key in w0:
        torch.testing.assert_close(w1[key], w0[key], rtol=1e-4, atol=1e-5)


def test_compile_wraps_the_forward_and_keeps_the_checkpoint_keys(
    tmp_path: Path, tiny_config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.compile: the method runs a torch.compile wrapper (here with the aot_eager backend:
    TorchDynamo's capture and AOT autograd, without inductor's codegen, to stay fast), the
    checkpoint holds the plain module's keys and loads, and the losses equal eager's."""
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    runs = {}
    for compiled in (False, True):
        overrides = ["train.iterations=2", f"train.compile={str(compiled).lower()}"]
        config = load_config(tiny_config_file, overrides)
        if compiled:
            learner = build_learner(config, CPU)
            assert isinstance(learner.method.model, torch._dynamo.eval_frame.OptimizedModule)
            assert learner.model is learner.method.model._orig_mod
        train(config, tmp_path / str(compiled), evaluate_at_end=False)
        runs[compiled] = _metrics(tmp_path / str(compiled))
    keys = read_checkpoint(tmp_path / "True" / "checkpoint.pt")["model"].keys()
    assert not any(k.startswith("_orig_mod") for k in keys)
    assert keys == read_checkpoint(tmp_path / "False" / "checkpoint.pt")["model"].keys()
    assert [m["loss"] for m in runs[True]] == pytest.approx(
        [m["loss"] for m in runs[False]], rel=1e-4
    )


def test_an_unknown_precision_is_a_config_error(tiny_config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.precision.*one of \['fp32', 'bf16', 'fp16'\]"):
        load_config(tiny_config_file, ["train.precision=tf32"])


def test_precision_and_compile_may_change_on_resume(tmp_path: Path, tiny_config_file: Path) -> None:
    first = load_config(tiny_config_file, ["train.iterations=1"])
    train(first, tmp_path / "run", evaluate_at_end=False)
    more = load_config(tiny_config_file, ["train.iterations=2", "train.precision=bf16"])
    assert train(more, tmp_path / "run", resume=True, evaluate_at_end=False).iterations == 2
