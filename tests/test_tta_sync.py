"""Pushing adapted weights into a running Segmenter (tta.sync, tta.folding).

Real ONNX Runtime sessions on the shared `tiny_bundle` (a random ResNet-18 DeepLab at width 8,
fp32 + fp16; its checkpoint `tiny.pt` lies beside it). Its folded conv biases are all zero,
which torch's exporter alone would drop; export keeps one per conv so that pushes (and
TensorRT refits) have a tensor to write. TensorRT paths run only where tensorrt and a CUDA GPU
exist.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import corrupting, write_checkpoint
from torch import nn

from adapt_deploy.bundle.engine_files import EngineRecord
from adapt_deploy.bundle.meta import load_meta, model_path
from adapt_deploy.config import ExperimentConfig
from adapt_deploy.errors import UserError
from adapt_deploy.export import folding
from adapt_deploy.export.folding import build_folding_map, conv_bn_pairs, own_initializers
from adapt_deploy.export.parity import target_frames, torch_outputs
from adapt_deploy.export.verify import tolerance_for
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.deploy import DeployModel
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.torch_backend import ModelBackend
from adapt_deploy.tta.push import check_samples, graph_spec
from adapt_deploy.tta.sync import make_sync
from adapt_deploy.tta.sync_tensorrt import check_refittable

FRAME = target_frames(1, 64, 96, first=11)[0]  # inside the tiny bundle's range: runs as is


@pytest.fixture(scope="module")
def source(tiny_bundle: Path) -> tuple[DeepLab, ExperimentConfig]:
    return load_checkpoint(tiny_bundle.parent / "tiny.pt")


def adapted(model: DeepLab, seed: int = 0) -> DeepLab:
    """A copy with what adaptation can change moved: BN affine and statistics, the head, and
    (option `all`) every other weight."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * torch.randn(t.shape, generator=gen)

    with torch.no_grad():
        for bn in model.batchnorms():
            bn.weight.mul_(1 + noise(bn.weight, 0.3))
            bn.bias.add_(noise(bn.bias, 0.3))
            bn.running_mean.add_(noise(bn.running_mean, 0.3))
            bn.running_var.mul_(torch.exp(noise(bn.running_var, 0.3)))
        for param in model.head.parameters():
            param.add_(noise(param, 0.05))
        for conv in model.backbone.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.mul_(1 + noise(conv.weight, 0.05))
    return model


def reference(model: DeepLab, segmenter: Segmenter, config: ExperimentConfig) -> dict:
    deploy = DeployModel(copy.deepcopy(model), config.input, graph_spec(segmenter.meta))
    return torch_outputs(deploy, FRAME[None])


def assert_matches(result, expected: dict, tolerance: dict[str, float]) -> None:
    agreement = float(np.mean(result.labels == expected["labels"][0]))
    assert agreement >= tolerance["min_label_agreement"]
    assert np.abs(result.presence - expected["presence"][0]).max() <= tolerance["max_presence_diff"]


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------


def test_each_conv_is_paired_with_the_batchnorm_that_reads_its_output(source):
    model, _ = source
    pairs = conv_bn_pairs(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(pairs) == sorted(convs)  # every conv runs
    assert pairs["backbone.conv1"] == "backbone.bn1"
    assert pairs["backbone.layer2.0.downsample.0"] == "backbone.layer2.0.downsample.1"
    assert all(pairs[f"head.branches.{i}"] is None for i in range(4))
    assert sum(bn is not None for bn in pairs.values()) == len(model.batchnorms())


def test_folding_reproduces_batchnorm_in_eval(source):
    model = adapted(source[0])
    folded = folding.fold(model, conv_bn_pairs(model))
    x = torch.randn(1, 8, 9, 9)
    conv, bn = model.backbone.layer1[0].conv1, model.backbone.layer1[0].bn1
    weight, bias = folded["backbone.layer1.0.conv1"]
    with torch.no_grad():
        expected = bn(conv(x))
        got = nn.functional.conv2d(x, torch.from_numpy(weight), torch.from_numpy(bias), 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_folding_map_is_validated_by_value_on_both_models(tiny_bundle, source, precision):
    model, _ = source
    proto = onnx.load(str(model_path(tiny_bundle, load_meta(tiny_bundle), precision)))
    fmap = build_folding_map(model, proto)
    inits = {t.name for t in proto.graph.initializer}
    assert {s.conv for s in fmap.slots} == set(fmap.pairs)  # every conv found
    assert all(s.initializer in inits for s in fmap.slots)
    wanted = np.float16 if precision == "fp16" else np.float32
    assert {s.dtype for s in fmap.slots} == {np.dtype(wanted)}
    # Export gives every conv its own weight and bias, so any adapted state maps onto the graph.
    assert not fmap.biasless and not fmap.shared()
    assert len(fmap.initializers(adapted(model))) == 2 * len(fmap.pairs)
    # torch's exporter alone drops all-zero biases (all of them in this random model): such a
    # graph cannot take an adapted BN shift until `own_initializers` gives the convs a bias.
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3:
            del node.input[2]
    fmap = build_folding_map(model, proto)
    assert set(fmap.biasless.values()) == set(fmap.pairs)
    with pytest.raises(ValueError, match="no bias in the graph"):
        fmap.initializers(adapted(model))  # what a built engine could not take
    own = own_initializers(proto, fmap)
    onnx.checker.check_model(proto, full_check=True)
    assert not own.biasless and not own.shared()
    assert len(own.initializers(adapted(model))) == 2 * len(fmap.pairs)


def test_a_template_that_is_not_the_bundles_checkpoint_is_refused(tiny_bundle, tmp_path):
    other, config = load_checkpoint(write_checkpoint(tmp_path / "other.pt", seed=1))
    seg = Segmenter.from_bundle(tiny_bundle, "onnxruntime", device="cpu")
    with seg, pytest.raises(UserError, match="does not match its checkpoint"):
        make_sync(seg, other, config.input)


# --------------------------------------------------------------------------------------------
# Pushes
# --------------------------------------------------------------------------------------------


def test_a_bf16_runtime_is_checked_against_its_own_floor():
    """bf16 (the torch backend only) rounds to 8 significant bits: held to 99% of the labels and
    2e-2 on presence, not fp16's 99.5% and 1e-2; a meta.json cannot loosen either."""
    floor = {"min_label_agreement": 0.99, "max_presence_diff": 2e-2}
    assert tolerance_for({}, "bf16") == floor
    loose = {"tolerances": {"bf16": {"min_label_agreement": 0.5, "max_presence_diff": 1.0}}}
    assert tolerance_for(loose, "bf16") == floor
    assert tolerance_for({}, "fp16") == {"min_label_agreement": 0.995, "max_presence_diff": 1e-2}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_push_to_onnxruntime_changes_what_the_runtime_computes(tiny_bundle, source, precision):
    model, config = source
    with Segmenter.from_bundle(tiny_bundle, "onnxruntime", "cpu", precision, threads=1) as seg:
        before = seg(FRAME)
        sync = make_sync(seg, model, config.input)
        student = adapted(model)
        result = sync.push(student)
        assert result.ok, result.reason
        assert result.seconds > 0 and result.reason is None
        tolerance = seg.meta["tolerances"][precision]
        assert result.labels_agreement >= tolerance["min_label_agreement"]
        assert result.presence_max_abs_diff <= tolerance["max_presence_diff"]
        after = seg(FRAME)
        assert_matches(after, reference(student, seg, config), tolerance)
        assert np.abs(after.presence - before.presence).max() > 0.01  # it did change

        with torch.no_grad():  # training goes on: the runtime keeps what was pushed
            for bn in student.batchnorms():
                bn.running_mean.add_(1.0)
        again = seg(FRAME)
        np.testing.assert_array_equal(again.labels, after.labels)
        np.testing.assert_array_equal(again.presence, after.presence)


def test_a_push_is_checked_on_the_single_frame_samples(tiny_bundle, source):
    """A push changes weights, not how a batch runs: the samples of one frame are enough, and
    a bundle with batch samples only is checked on the first frame of each."""
    one, three = np.zeros((1, 8, 8, 3), np.uint8), np.ones((3, 8, 8, 3), np.uint8)
    assert [n for n, _ in check_samples([("a", one), ("b", three), ("c", one)])] == ["a", "c"]
    only_batches = check_samples([("b", three)])
    assert [n for n, _ in only_batches] == ["b[0]"] and only_batches[0][1].shape == (1, 8, 8, 3)
    model, config = source
    with Segmenter.from_bundle(tiny_bundle, "onnxruntime", "cpu", threads=1) as seg:
        sync = make_sync(seg, model, config.input)
        batches = {e["file"]: e["shape"][0] for e in seg.meta["samples"]}
        assert any(n > 1 for n in batches.values())  # the bundle has a batch sample
        checked = [name for name, _ in sync._samples]
        assert checked and all(batches[name] == 1 for name in checked)


def test_push_to_the_torch_backend(tiny_bundle, source):
    model, config = source
    with Segmenter.from_bundle(tiny_bundle, "torch", device="cpu") as seg:
        before = seg(FRAME)
        student = adapted(model, seed=1)
        result = make_sync(seg, model, config.input).push(student)
        assert result.ok, result.reason
        after = seg(FRAME)
        assert_matches(after, reference(student, seg, config), seg.meta["tolerances"]["fp32"])
        assert np.abs(after.presence - before.presence).max() > 0.01


def test_a_failed_push_leaves_the_runtime_as_it_was(tiny_bundle, source, monkeypatch):
    model, config = source
    with Segmenter.from_bundle(tiny_bundle, "onnxruntime", "cpu", "fp32", threads=1) as seg:
        sync = make_sync(seg, model, config.input)
        assert sync.push(adapted(model, seed=2)).ok
        before = seg(FRAME)
        fold = folding.fold
        monkeypatch.setattr(folding, "fold", corrupting(fold))
        result = sync.push(adapted(model, seed=3))
        assert not result.ok
        assert "sample check" in result.reason and "presence max |diff|" in result.reason
        assert result.presence_max_abs_diff > seg.meta["tolerances"]["fp32"]["max_presence_diff"]
        after = seg(FRAME)
        np.testing.assert_array_equal(after.labels, before.labels)
        np.testing.assert_array_equal(after.presence, before.presence)

        monkeypatch.setattr(folding, "fold", fold)  # the next good push goes through
        assert sync.push(adapted(model, seed=3)).ok


def test_a_push_of_another_model_fails_without_raising(tiny_bundle, source):
    model, config = source
    with Segmenter.from_bundle(tiny_bundle, "torch", device="cpu") as seg:
        before = seg(FRAME)
        result = make_sync(seg, model, config.input).push(nn.Conv2d(3, 8, 3))
        assert not result.ok and "does not match the bundle's model" in result.reason
        np.testing.assert_array_equal(seg(FRAME).presence, before.presence)


def test_swap_backend_refuses_another_kind_of_backend(tiny_bundle, source):
    model, config = source
    deploy = DeployModel(copy.deepcopy(model), config.input, graph_spec(load_meta(tiny_bundle)))
    seg = Segmenter.from_bundle(tiny_bundle, "onnxruntime", device="cpu")
    with seg, pytest.raises(ValueError, match="expected a onnxruntime backend"):
        seg.swap_backend(ModelBackend(deploy, "cpu"))


def test_an_engine_built_without_refit_is_refused_with_the_rebuild_command(tmp_path):
    record = EngineRecord(
        engine="model_fp16.trt10.8.0_NVIDIA-H100_sm90.plan",
        engine_sha256="0" * 64,
        tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp16",
        fp16_source="builder FP16 flag",
        onnx_model="fp32",
        onnx_file="model.onnx",
        onnx_sha256="0" * 64,
        input_name="image",
        profile={"min": [1, 16, 16, 3], "opt": [1, 64, 96, 3], "max": [4, 256, 512, 3]},
        refittable=False,
        refit_mode="none",
        refittable_weights=[],
        layers={},
        build_seconds=1.0,
        built_at="2026-01-01T00:00:00+00:00",
        adapt_deploy_version="0",
    )
    with pytest.raises(UserError, match=r"build-engine .* --fp16 --refit"):
        check_refittable(record, tmp_path)


@pytest.mark.gpu
def test_push_refits_a_tensorrt_engine(tiny_bundle, source, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from adapt_deploy.export.tensorrt import build_engines

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    build_engines(bundle, fp16=False, refit=True)
    model, config = source
    with Segmenter.from_bundle(bundle, "tensorrt", "cuda:0", "fp32") as seg:
        student = copy.deepcopy(model)
        with torch.no_grad():
            for bn in student.batchnorms():
                bn.weight.mul_(1.5)
                bn.running_var.mul_(0.7)
        sync = make_sync(seg, model, config.input)
        result = sync.push(student)
        assert result.ok, result.reason
        assert_matches(seg(FRAME), reference(student, seg, config), seg.meta["tolerances"]["fp32"])
        moved = adapted(model)  # BN shifts too: export gave every conv a bias to refit
        result = sync.push(moved)
        assert result.ok, result.reason
        assert_matches(seg(FRAME), reference(moved, seg, config), seg.meta["tolerances"]["fp32"])
        sync.close()


class FakeTensorRT:
    """The part of the tensorrt module TensorRTSync's set-up touches; the engine can refit
    `refittable` (by ONNX initializer name)."""

    __version__ = "10.8.0"

    def __init__(self, refittable: set[str]) -> None:
        names = sorted(refittable)

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Refitter:
            def __init__(self, engine: object, logger: object) -> None:
                pass

            def get_all_weights(self) -> list[str]:
                return names

        self.Logger, self.Refitter = Logger, Refitter


@pytest.mark.parametrize("refittable", [True, False])
def test_a_tensorrt_sync_whose_set_up_fails_closes_its_standby_engine(
    tiny_bundle, source, monkeypatch, refittable
):
    from types import SimpleNamespace

    from adapt_deploy.tta import sync_tensorrt

    model, config = source
    meta = load_meta(tiny_bundle)
    proto = onnx.load(str(model_path(tiny_bundle, meta, "fp32")))
    names = {slot.initializer for slot in build_folding_map(model, proto).slots}
    closed: list[object] = []

    class Standby:  # the TensorRTBackend the sync holds as its standby
        engine = object()

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def close(self) -> None:
            closed.append(self)

    record = SimpleNamespace(
        refittable=True, refit_mode="individual", onnx_model="fp32", engine="m.plan",
        precision="fp32",
    )  # fmt: skip
    trt = FakeTensorRT(names if refittable else set())
    monkeypatch.setattr(sync_tensorrt, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(sync_tensorrt, "detect_platform", lambda version, device: None)
    monkeypatch.setattr(sync_tensorrt, "read_engine", lambda *args: (b"", record))
    monkeypatch.setattr(sync_tensorrt, "TensorRTBackend", Standby)
    seg = SimpleNamespace(bundle=tiny_bundle, meta=meta, precision="fp32", device="cuda:0")
    graph = graph_spec(meta)
    if refittable:
        sync = sync_tensorrt.TensorRTSync(seg, model, config.input, graph)
        assert not closed
        sync.close()
        sync.close()
    else:
        with pytest.raises(UserError, match="not refittable"):
            sync_tensorrt.TensorRTSync(seg, model, config.input, graph)
    assert len(closed) == 1  # at once, not when garbage collected
