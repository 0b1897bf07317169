"""Fast inference without TensorRT (issue 15, item 3), what of it runs on a CPU.

- The selection rule for precisions (bf16 on the torch backend, fp16 on CUDA only) and CUDA
  graphs (on by default for torch on CUDA, opt-in for ONNX Runtime, never TensorRT; notes for
  what cannot be honoured; ADAPT_DEPLOY_CUDA_GRAPHS=0).
- The torch backend in bf16 on the CPU against fp32 on a briefly trained tiny DeepLab (a random
  one has near-tied logits everywhere, which says nothing about a real model's agreement).
- `GraphedForward` on the CPU: static inputs per shape, and a capture that fails (it always does
  on the CPU) falling back to eager with a note and a warning, through a Segmenter too.
- ONNX Runtime's `cuda_graph` refused without the CUDA provider, and noted through `from_bundle`
  and `adapt-deploy stream --cuda-graph`.
- The adapter's teacher forward in bf16 on the CPU, reading in-place weight updates.
- Pushes into a torch Segmenter reuse the replaced backend (a captured graph stays valid) and
  keep its precision.

The CUDA paths themselves (graph replay, fp16, pinned buffers) are in tests/test_gpu.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_gta5
from helpers import CAFFE_INPUT, RGB_INPUT, band_model, write_source_checkpoint
from typer.testing import CliRunner

from adapt_deploy.bundle.meta import load_meta
from adapt_deploy.cli import app
from adapt_deploy.config import ExperimentConfig, InputConfig
from adapt_deploy.data.normalize import normalize
from adapt_deploy.errors import UserError
from adapt_deploy.export.adaptation_package import load_package
from adapt_deploy.export.parity import target_frames
from adapt_deploy.export.pipeline import export_bundle
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.backend import as_runner
from adapt_deploy.runtime.cuda_graphs import GraphedForward
from adapt_deploy.runtime.graph_policy import (
    GRAPHS_ENV,
    decide,
    graphs_env_off,
    replay_mismatch,
)
from adapt_deploy.runtime.onnxruntime_backend import (
    OnnxRuntimeBackend,
    create_session,
    cuda_provider_options,
    graph_support,
)
from adapt_deploy.runtime.selection import Device, choose
from adapt_deploy.runtime.torch_backend import ModelBackend
from adapt_deploy.runtime.torch_inference import LogitsInference, check_precision, graph_safe
from adapt_deploy.tta.adapter import OnlineAdapter
from adapt_deploy.tta.options import AdaptOptions
from adapt_deploy.tta.session import teacher_precision
from adapt_deploy.tta.sync import make_sync

Array = np.ndarray
SIZE = (64, 96)  # frames inside TINY_SHAPES: they run at their own size
FP16_FLOOR = 0.995  # export.verify's fp16 label-agreement floor, also the goal


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeepLab, ExperimentConfig, Array]:
    """A tiny DeepLab trained 30 steps on band scenes, and four other scenes (`band_model`)."""
    return band_model(tmp_path_factory.mktemp("trained") / "tiny.pt")


@pytest.fixture(scope="module")
def package_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with an adaptation package (the checkpoint inside, source statistics)."""
    work = tmp_path_factory.mktemp("runtime_fast")
    source = write_gta5(work / "source", 6)
    checkpoint = write_source_checkpoint(work / "checkpoints" / "tiny.pt", source)
    shapes = {"min": [1, 16, 16], "opt": [1, 64, 96], "max": [2, 128, 192]}
    return export_bundle(checkpoint, work / "bundle", shapes=shapes).bundle


def _backend(model: DeepLab, config: ExperimentConfig, precision: str) -> ModelBackend:
    return ModelBackend(
        DeployModel(copy.deepcopy(model), config.input, GraphSpec()), "cpu", precision
    )


# ------------------------------------------------------------------------- selection rule


def test_precision_rule_of_the_torch_backend():
    """auto is fp32 on the torch backend everywhere (it is the comparison path); bf16 runs on
    the CPU and CUDA; fp16 on CUDA only; bf16 on no other backend."""
    cpu, gpu = Device(None), Device(0)
    assert choose("torch", "auto", gpu, ["fp32"], {}, False, True).precision == "fp32"
    assert choose("torch", "bf16", cpu, ["fp32"], {}, False).precision == "bf16"
    got = choose("torch", "fp16", gpu, ["fp32"], {}, False, True)
    assert (got.precision, got.cuda) == ("fp16", 0)
    with pytest.raises(UserError, match="fp16 on a CUDA GPU only"):
        choose("torch", "fp16", gpu, ["fp32"], {}, False, torch_cuda=False)
    for backend in ("auto", "onnxruntime", "tensorrt"):
        with pytest.raises(UserError, match="'bf16' runs on the torch backend only"):
            choose(backend, "bf16", gpu, ["fp32", "fp16"], {}, True, True)


GRAPH_CASES = [
    # backend, device, ort_cuda / torch_cuda, asked, env off -> cuda_graph, note contains
    ("torch", Device(0), True, None, False, True, None),
    ("torch", Device(0), True, False, False, False, None),
    ("torch", Device(0), True, None, True, False, GRAPHS_ENV),
    ("torch", Device(None), False, None, False, False, None),
    ("torch", Device(None), False, True, False, False, "need a CUDA device"),
    ("onnxruntime", Device(0), True, None, False, False, None),
    ("onnxruntime", Device(0), True, True, False, True, None),
    ("onnxruntime", Device(0), True, True, True, False, GRAPHS_ENV),
    ("onnxruntime", Device(0), False, True, False, False, "need a CUDA device"),
    ("onnxruntime", Device(None), False, True, False, False, "need a CUDA device"),
    ("tensorrt", Device(0), False, True, False, False, "engine runs as built"),
]  # fmt: skip


@pytest.mark.parametrize(("backend", "device", "cuda", "asked", "env", "want", "note"), GRAPH_CASES)
def test_cuda_graph_rule(backend, device, cuda, asked, env, want, note):
    engines = {"fp16": None, "fp32": None}
    choice = choose(backend, "auto", device, ["fp32"], engines, cuda, cuda, asked, env)
    assert choice.cuda_graph is want
    notes = " ".join(choice.notes)
    assert (note in notes) if note else "graph" not in notes.lower(), choice.notes


def test_cuda_graph_request_and_environment_values_are_checked():
    with pytest.raises(UserError, match="cuda_graph: expected True, False or None"):
        choose("torch", "auto", Device(None), ["fp32"], {}, False, False, "yes")
    assert graphs_env_off({GRAPHS_ENV: "0"}) and graphs_env_off({GRAPHS_ENV: " Off "})
    assert not graphs_env_off({}) and not graphs_env_off({GRAPHS_ENV: "1"})
    with pytest.raises(UserError, match=f"{GRAPHS_ENV}: expected 0/off"):
        graphs_env_off({GRAPHS_ENV: "sometimes"})
    assert decide(None, True, True, "teacher", False) == (True, ())


def test_replay_mismatch_accepts_eager_and_names_what_differs():
    labels = np.arange(2000, dtype=np.int32).reshape(1, 40, 50) % 19
    presence = np.linspace(0, 1, 19, dtype=np.float32)[None]
    assert replay_mismatch([labels, presence], [labels.copy(), presence + 1e-6]) is None
    moved = labels.copy()
    moved.flat[:10] += 1  # 0.5% of the labels
    assert "99.500% of the values equal" in replay_mismatch([labels], [moved])
    assert "max |difference|" in replay_mismatch([presence], [presence + 0.01])
    assert "non-finite" in replay_mismatch([presence], [presence * np.nan])
    assert "expected int32[1, 40, 50]" in replay_mismatch([labels], [labels[0]])


# --------------------------------------------------------------------- reduced precision


def test_precision_checks_name_what_runs_where():
    check_precision("bf16", "cpu")
    with pytest.raises(UserError, match=r"expected one of \['fp32', 'bf16'\], got 'fp16'"):
        check_precision("fp16", "cpu")
    with pytest.raises(UserError, match="got 'int8'"):
        check_precision("int8", "cpu")


def test_bf16_torch_backend_on_the_cpu_agrees_with_fp32(trained):
    """bf16 autocast in channels_last: labels int32, presence float32, labels agree with fp32
    on at least the fp16 verify floor and presence within its 1e-2; not bit-identical (bf16
    really ran)."""
    model, config, frames = trained
    outputs = {}
    for precision in ("fp32", "bf16"):
        backend = _backend(model, config, precision)
        assert backend.precision == precision
        outputs[precision] = as_runner(backend, "NHWC")(frames)
        conv = backend.network.backbone.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (precision == "bf16")
        assert conv.dtype == torch.float32  # autocast casts per call: the weights stay fp32
    low, full = outputs["bf16"], outputs["fp32"]
    assert low["labels"].dtype == np.int32 and low["presence"].dtype == np.float32
    agreement = float(np.mean(low["labels"] == full["labels"]))
    assert agreement >= FP16_FLOOR, agreement
    diff = float(np.abs(low["presence"] - full["presence"]).max())
    assert 0 < diff <= 1e-2


def test_logits_inference_returns_float32_logits_of_the_low_precision_forward(trained):
    model, config, frames = trained
    x = normalize(torch.from_numpy(frames[:1]).permute(0, 3, 1, 2), config.input)
    wrapped = LogitsInference(copy.deepcopy(model), "bf16", "cpu")
    with torch.no_grad():
        reference = model(x)["logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x)["logits"].float()
        got = wrapped(x)["logits"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, reference)
    with pytest.raises(ValueError, match="precision: expected fp32, fp16 or bf16"):
        LogitsInference(model, "fp64", "cpu")


@pytest.mark.parametrize("spec", [RGB_INPUT, CAFFE_INPUT], ids=["rgb", "bgr"])
def test_the_graph_safe_deployed_graph_is_the_exported_one(trained, spec):
    """The torch backend's graph (normalization constants held as buffers, so a CUDA graph can
    capture it) gives DeployModel's outputs bit for bit, for RGB and BGR checkpoints."""
    model, _, frames = trained
    config = InputConfig(spec["color_order"], spec["mean"], spec["std"])
    deploy = DeployModel(copy.deepcopy(model), config, GraphSpec(logits=True))
    safe = graph_safe(deploy)
    assert safe is not deploy
    with torch.no_grad():
        expected, got = deploy(torch.from_numpy(frames)), safe(torch.from_numpy(frames))
    assert len(got) == 3
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    nchw = DeployModel(model, config, GraphSpec(layout="NCHW"))
    assert graph_safe(nchw) is nchw


def test_segmenter_opens_the_torch_backend_in_bf16_and_refuses_fp16_on_the_cpu(tiny_bundle):
    frame = target_frames(1, *SIZE, first=3)[0]
    with Segmenter.from_bundle(tiny_bundle, "torch", "cpu", "bf16") as seg:
        assert (seg.backend, seg.precision, seg.device, seg.notes) == ("torch", "bf16", "cpu", ())
        result = seg(frame)
    assert result.labels.shape == SIZE and result.presence.dtype == np.float32
    with pytest.raises(UserError, match="fp16 on a CUDA GPU only"):
        Segmenter.from_bundle(tiny_bundle, "torch", "cpu", "fp16")


# ---------------------------------------------------------------------------- CUDA graphs


def test_graphed_forward_keeps_one_static_input_per_shape():
    calls = []

    def double(x: torch.Tensor) -> tuple[torch.Tensor]:
        calls.append(tuple(x.shape))
        return (x * 2,)

    forward = GraphedForward(double, "cpu", torch.float32, graphs=False, shapes=2)
    first = forward.input((1, 3, 4, 5))
    first.fill_(1.5)
    (out,) = forward.run((1, 3, 4, 5))
    assert forward.input((1, 3, 4, 5)) is first and torch.equal(out, torch.full_like(first, 3))
    (out,) = forward(torch.ones(2, 3, 4, 5))
    assert torch.equal(out, torch.full((2, 3, 4, 5), 2.0))
    forward.input((3, 3, 4, 5))  # a third shape drops the least recently used
    assert forward.input((1, 3, 4, 5)) is not first
    assert calls == [(1, 3, 4, 5), (2, 3, 4, 5)] and forward.captured == []
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedForward(double, "cpu", torch.float32, graphs=True)


def test_a_capture_that_fails_runs_eager_with_a_note_and_a_warning():
    """On the CPU a capture always fails (no CUDA): the call still returns eager's outputs."""
    forward = GraphedForward(lambda x: (x + 1,), "cpu", torch.float32, graphs=False)
    forward.graphs = True  # as if on CUDA: the capture itself is what fails here
    with pytest.warns(RuntimeWarning, match="CUDA graphs off, running eager: capturing input"):
        (out,) = forward(torch.zeros(1, 3, 2, 2))
    assert torch.equal(out, torch.ones(1, 3, 2, 2))
    assert not forward.graphs and forward.captured == []
    assert len(forward.notes) == 1 and "shape [1, 3, 2, 2] failed" in forward.notes[0]
    (out,) = forward(torch.ones(1, 3, 2, 2))  # eager from now on, without another note
    assert torch.equal(out, torch.full((1, 3, 2, 2), 2.0)) and len(forward.notes) == 1


def test_graphs_asked_for_on_the_cpu_run_eager_with_a_note(tiny_bundle, trained):
    frame = target_frames(1, *SIZE, first=4)[0]
    with Segmenter.from_bundle(tiny_bundle, "torch", "cpu") as plain:
        expected = plain(frame)
        assert plain.notes == ()
    with Segmenter.from_bundle(tiny_bundle, "torch", "cpu", cuda_graph=True) as seg:
        assert seg.notes == ("torch: CUDA graphs need a CUDA device; running eager on the CPU",)
        result = seg(frame)
        assert seg.current_backend().captured == []
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_array_equal(result.presence, expected.presence)
    model, config, _ = trained
    deploy = DeployModel(copy.deepcopy(model), config.input, GraphSpec())
    with pytest.raises(UserError, match="CUDA graphs need a CUDA device, got 'cpu'"):
        ModelBackend(deploy, "cpu", cuda_graph=True)


def test_a_failed_capture_in_a_segmenter_shows_in_its_notes(tiny_bundle):
    frame = target_frames(1, *SIZE, first=5)[0]
    with Segmenter.from_bundle(tiny_bundle, "torch", "cpu") as seg:
        expected = seg(frame)
        backend = seg.current_backend()
        backend._forward.graphs = True  # a capture is tried on the next new shape
        with pytest.warns(RuntimeWarning, match="torch: CUDA graphs off"):
            result = seg.batch([frame, frame])
        assert len(seg.notes) == 1 and "capturing input shape [2, 64, 96, 3]" in seg.notes[0]
    for got in result:
        np.testing.assert_array_equal(got.labels, expected.labels)


# --------------------------------------------------------------------------- ONNX Runtime


def test_onnxruntime_cuda_graph_needs_the_cuda_provider(tiny_bundle, tmp_path):
    """Refused where it is asked of the backend directly; a note (and a plain CPU session)
    through from_bundle, which may fall back to the CPU; the provider options it would set."""
    model = tiny_bundle / "model.onnx"
    with pytest.raises(UserError, match="cuda_graph: ONNX Runtime's CUDA graphs need the CUDA"):
        OnnxRuntimeBackend(model, "NHWC", 19, "fp32", cuda_device=None, cuda_graph=True)
    with pytest.raises(UserError, match="need the CUDA provider"):
        create_session(model, None, 1, cuda_graph=True)
    frame = target_frames(1, *SIZE, first=6)[0]
    with Segmenter.from_bundle(tiny_bundle, "onnxruntime", 0, cuda_graph=True) as seg:
        assert seg.device == "cpu" and not seg.current_backend().cuda_graph
        assert any("onnxruntime: CUDA graphs need a CUDA device" in n for n in seg.notes)
        assert seg.current_backend().session.get_providers() == ["CPUExecutionProvider"]
        assert seg(frame).labels.shape == SIZE
    assert cuda_provider_options(1, True) == {"device_id": 1, "enable_cuda_graph": "1"}
    assert cuda_provider_options(0) == {"device_id": 0}
    assert graph_support("1.32.0") is None and graph_support("1.18.1") is None
    assert "1.18 or newer needed" in graph_support("1.17.3")


def test_stream_cuda_graph_flag_reaches_the_segmenter(tiny_bundle, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(target_frames(2, *SIZE, first=7)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image[:, :, ::-1])
    labels = tmp_path / "labels"
    args = ["stream", str(frames), "--bundle", str(tiny_bundle), "--labels-dir", str(labels)]
    args += ["--backend", "onnxruntime", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--cuda-graph"])
    assert result.exit_code == 0, result.output
    assert "CUDA graphs need a CUDA device" in result.output
    assert len(list(labels.glob("*.png"))) == 2
    quiet = CliRunner().invoke(app, [*args, "--no-cuda-graph", "--force"])
    assert quiet.exit_code == 0 and "CUDA graphs" not in quiet.output
    help_text = CliRunner().invoke(app, ["stream", "--help"]).output
    assert "--cuda-graph" in help_text and "--no-cuda-graph" in help_text


# ----------------------------------------------------------------- the adapter's teacher


def _adapter(bundle: Path, **kwargs) -> OnlineAdapter:
    meta = load_meta(bundle)
    package = load_package(bundle, meta)
    model, config = load_checkpoint(package.checkpoint)
    size = tuple(meta["evaluation"]["size"])
    return OnlineAdapter(
        model, config.input, package.stats, AdaptOptions(threads=None), size, package.lse_k,
        meta["checkpoint"]["sha256"], **kwargs,
    )  # fmt: skip


def test_teacher_forward_in_bf16_on_the_cpu_reads_in_place_updates(package_bundle):
    frame = target_frames(1, *SIZE, first=8)[0]
    full, low = _adapter(package_bundle), _adapter(package_bundle, teacher_precision="bf16")
    x = full.prepare(frame)
    with torch.no_grad():
        eager = full.teacher(x)["logits"]
    torch.testing.assert_close(full.teacher_logits(x), eager, rtol=0, atol=0)  # fp32: as before
    logits = low.teacher_logits(x)
    assert low.teacher_precision == "bf16" and logits.dtype == torch.float32
    assert low.teacher.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    error = float((logits - eager).abs().max() / eager.abs().max())
    assert 0 < error < 0.05, error
    with torch.no_grad():  # as the EMA update writes: in place
        low.teacher.head.branches[0].bias.add_(1.0)
    moved = low.teacher_logits(x)
    assert float((moved - logits).mean()) == pytest.approx(1.0, abs=0.05)
    report = low.step(frame)
    assert np.isfinite(report.loss) and low.notes == []


def test_teacher_precision_and_graph_requests_are_checked(package_bundle):
    with pytest.raises(UserError, match="teacher_precision: precision on cpu"):
        _adapter(package_bundle, teacher_precision="fp16")
    adapter = _adapter(package_bundle, cuda_graph=True)
    assert adapter.notes == ["teacher: CUDA graphs need a CUDA device; running eager on the CPU"]


def test_teacher_precision_follows_the_runtime_where_torch_computes_it():
    assert teacher_precision("fp16", "cuda:0") == "fp16"
    assert teacher_precision("bf16", "cuda:1") == "bf16"
    assert teacher_precision("bf16", "cpu") == "bf16"
    assert teacher_precision("fp16", "cpu") == "fp32"  # ONNX Runtime's fp16 model on the CPU
    assert teacher_precision("fp32", "cuda:0") == "fp32"


# ------------------------------------------------------------------ pushes into torch


def test_pushes_reuse_the_replaced_torch_backend_and_keep_its_precision(tiny_bundle, trained):
    """The first push builds a standby like the running backend (bf16 here: the swap accepts
    only the same precision); the backend it replaces takes the second push in place. The
    pushed weights are the trained model's (same architecture as the bundle's): the random
    bundle's own weights miss the sample check's bf16 floor by a few near-tied pixels."""
    model, config = load_checkpoint(tiny_bundle.parent / "tiny.pt")
    frame = target_frames(1, *SIZE, first=9)[0]
    with Segmenter.from_bundle(tiny_bundle, "torch", "cpu", "bf16") as seg:
        original = seg.current_backend()
        sync = make_sync(seg, model, config.input)
        pushed = copy.deepcopy(trained[0])
        results = []
        for step in range(2):
            with torch.no_grad():
                for param in pushed.head.parameters():
                    param.mul_(1.2)
            result = sync.push(pushed)
            assert result.ok, result.reason
            results.append(seg(frame))
            assert seg.precision == "bf16"
            assert (seg.current_backend() is original) == (step == 1)
        sync.close()
    assert not np.array_equal(results[0].presence, results[1].presence)
    expected = as_runner(_backend(pushed, config, "bf16"), "NHWC")(frame[None])
    np.testing.assert_array_equal(results[1].labels, expected["labels"][0])
    np.testing.assert_allclose(results[1].presence, expected["presence"][0], rtol=0, atol=1e-6)
