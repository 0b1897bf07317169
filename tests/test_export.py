"""Export: the deployed graph, parity gates, fp16, the bundle on disk, verify, evaluate a bundle.

Real exports of tiny DeepLabs (ResNet-18 at width 8) and real ONNX Runtime sessions; the two
module-scoped bundles are shared by the tests that only read them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_gta5
from helpers import (
    CAFFE_INPUT,
    RGB_INPUT,
    tiny_config,
    write_checkpoint,
    write_source_checkpoint,
)
from onnx import TensorProto
from typer.testing import CliRunner

from adapt_deploy.bundle.meta import (
    BundleError,
    load_meta,
    model_path,
    sha256_file,
    validate_meta,
    verify_hashes,
)
from adapt_deploy.cli import app
from adapt_deploy.engine.evaluate import evaluate_checkpoint, predict_logits
from adapt_deploy.errors import UserError
from adapt_deploy.export import parity
from adapt_deploy.export.evaluate_bundle import evaluate_bundle
from adapt_deploy.export.parity import ParityError, target_frames, torch_outputs
from adapt_deploy.export.pipeline import export_bundle, parse_shape
from adapt_deploy.export.precision import node_dtypes
from adapt_deploy.export.verify import (
    check_samples,
    compare_outputs,
    graph_input,
    verify_bundle,
)
from adapt_deploy.labels import CLASS_NAMES, PALETTE
from adapt_deploy.models.checkpoints import build_model, checkpoint_meta, load_checkpoint
from adapt_deploy.models.checkpoints import save_checkpoint as save_weights
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.ops.pooling import lse_pool
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return write_checkpoint(work / "rgb.pt")


@pytest.fixture(scope="module")
def bundle(work: Path, checkpoint: Path) -> Path:
    """NHWC uint8 input, fp32 + fp16, with logits."""
    return export_bundle(checkpoint, work / "bundle", fp16=True, logits=True).bundle


@pytest.fixture(scope="module")
def nchw_bundle(work: Path) -> Path:
    """NCHW float input from a Caffe-style (BGR, mean only) checkpoint."""
    caffe = write_checkpoint(work / "caffe.pt", CAFFE_INPUT, seed=1)
    return export_bundle(caffe, work / "nchw", layout="nchw").bundle


# --------------------------------------------------------------------------------------------
# The deployed graph
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_spec", [RGB_INPUT, CAFFE_INPUT], ids=["rgb", "caffe-bgr"])
def test_deploy_model_computes_what_evaluation_and_adaptation_compute(input_spec, tmp_path):
    model, config = load_checkpoint(write_checkpoint(tmp_path / "c.pt", input_spec))
    deploy = DeployModel(model, config.input, GraphSpec(logits=True))
    frames = target_frames(2, 41, 75)
    labels, presence, logits = deploy(torch.from_numpy(frames))
    nchw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    expected = predict_logits(model, nchw, config.input, (41, 75))
    torch.testing.assert_close(labels, expected.argmax(1).to(torch.int32), rtol=0, atol=0)
    torch.testing.assert_close(presence, torch.sigmoid(lse_pool(logits)))
    assert labels.dtype == torch.int32 and presence.shape == (2, 19) and logits.shape[2:] == (6, 10)


def test_bundle_layout_and_meta(bundle: Path, checkpoint: Path):
    meta = load_meta(bundle)
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == ["meta.json", "model.onnx", "model_fp16.onnx"] + [
        f"samples/{i:03d}.npz" for i in range(3)
    ]
    assert meta["schema_version"] == 1 and meta["precision"] == ["fp32", "fp16"]
    assert meta["classes"] == list(CLASS_NAMES) and meta["num_classes"] == 19
    assert meta["palette"] == [list(c) for c in PALETTE]
    assert meta["input"] == {
        **meta["input"],
        **{"name": "image", "layout": "NHWC", "dtype": "uint8", "color_order": "RGB"},
        **{"normalization": "in_graph", "mean": RGB_INPUT["mean"], "std": RGB_INPUT["std"]},
    }
    assert meta["shapes"] == {"min": [1, 32, 64], "opt": [1, 32, 64], "max": [4, 1024, 2048]}
    assert [o["name"] for o in meta["outputs"]] == ["labels", "presence", "logits"]
    assert meta["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert meta["checkpoint"]["backbone"] == "resnet18" and meta["opset"] == 20
    assert set(meta["tools"]) >= {"adapt_deploy", "torch", "onnx", "onnxruntime"}
    for precision in ("fp32", "fp16"):
        verify_hashes(bundle, meta, precision)
        onnx.checker.check_model(str(model_path(bundle, meta, precision)), full_check=True)


def test_graph_has_named_dynamic_inputs_and_outputs(bundle: Path):
    graph = onnx.load(str(bundle / "model.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input]
    assert [i.name for i in graph.input] == ["image"]
    assert dims == [["batch", "height", "width", 3]]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    outputs = {o.name: o.type.tensor_type for o in graph.output}
    assert list(outputs) == ["labels", "presence", "logits"]
    assert outputs["labels"].elem_type == TensorProto.INT32
    shape = [d.dim_param or d.dim_value for d in outputs["logits"].shape.dim]
    assert shape == ["batch", 19, "logits_height", "logits_width"]
    assert not any(n.domain not in ("", "ai.onnx") for n in graph.node)  # standard ops only


# --------------------------------------------------------------------------------------------
# Parity and fp16
# --------------------------------------------------------------------------------------------


def test_parity_report_covers_odd_sizes_and_batches_one_and_three(bundle: Path):
    report = load_meta(bundle)["parity"]
    shapes = [tuple(c["shape"]) for c in report["cases"]]
    assert (1, 97, 211) in shapes and (3, 97, 211) in shapes
    assert len({s[1:] for s in shapes}) >= 3 and {s[0] for s in shapes} == {1, 3}
    assert report["passed"]
    for case in report["cases"]:
        assert case["fp32"]["label_agreement"] >= 0.999
        assert case["fp32"]["presence_max_abs_diff"] <= 1e-4
        assert case["fp16"]["label_agreement"] >= 0.995
        assert case["fp16"]["presence_max_abs_diff"] <= 1e-2


@pytest.mark.parametrize("shape", [(1, 33, 47), (2, 75, 133), (3, 64, 128)])
def test_onnxruntime_matches_pytorch_at_shapes_never_exported(bundle, checkpoint, shape):
    model, config = load_checkpoint(checkpoint)
    deploy = DeployModel(model, config.input, GraphSpec(logits=True))
    frames = target_frames(*shape, first=50)
    reference = torch_outputs(deploy, frames)
    got = OnnxRuntimeBackend(bundle / "model.onnx").outputs(frames)
    assert got["labels"].shape == shape and got["presence"].shape == (shape[0], 19)
    metrics = compare_outputs(reference, got)
    assert metrics["label_agreement"] >= 0.999
    assert metrics["presence_max_abs_diff"] < 1e-4 and metrics["logits_max_abs_diff"] < 1e-3


def test_fp16_keeps_reductions_in_fp32_and_agrees_with_fp32(bundle: Path):
    mixed = onnx.load(str(bundle / "model_fp16.onnx"))
    dtypes = node_dtypes(mixed)
    assert set(dtypes["Conv"]) == {TensorProto.FLOAT16}
    for op in ("ReduceLogSumExp", "Resize", "ArgMax", "Sigmoid", "Sub"):
        assert set(dtypes[op]) == {TensorProto.FLOAT}, op
    outputs = {o.name: o.type.tensor_type.elem_type for o in mixed.graph.output}
    assert outputs == {"labels": TensorProto.INT32, "presence": TensorProto.FLOAT, "logits": 1}
    frames = target_frames(3, 96, 160, first=60)
    fp32 = OnnxRuntimeBackend(bundle / "model.onnx").outputs(frames)
    metrics = compare_outputs(fp32, OnnxRuntimeBackend(bundle / "model_fp16.onnx").outputs(frames))
    assert metrics["label_agreement"] >= 0.995 and metrics["presence_max_abs_diff"] <= 1e-2


def test_nchw_float_input_with_a_bgr_checkpoint(nchw_bundle: Path, work: Path):
    meta = load_meta(nchw_bundle)
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["dtype"] == "float32"
    assert meta["input"]["normalization"] == "external" and meta["input"]["color_order"] == "RGB"
    assert meta["input"]["mean"] == CAFFE_INPUT["mean"][::-1]  # given in RGB order
    model, config = load_checkpoint(work / "caffe.pt")
    frames = target_frames(2, 57, 90, first=70)
    expected = predict_logits(
        model, torch.from_numpy(frames).permute(0, 3, 1, 2), config.input, (57, 90)
    )
    got = OnnxRuntimeBackend(nchw_bundle / "model.onnx").outputs(graph_input(frames, meta["input"]))
    assert np.mean(got["labels"] == expected.argmax(1).numpy()) >= 0.999


def test_a_failed_gate_writes_nothing_and_says_by_how_much(work, checkpoint, monkeypatch):
    out = work / "gated"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # an old bundle that must survive
    monkeypatch.setitem(
        parity.GATES, "fp32", {"min_label_agreement": 1.0, "max_presence_diff": 0.0}
    )
    with pytest.raises(
        ParityError, match=r"fp32 vs PyTorch at 1x97x211: presence max \|diff\| .* > 0e\+00"
    ):
        export_bundle(checkpoint, out, force=True)
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert not [p for p in work.iterdir() if p.name.startswith(".gated")]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_existing_output_is_refused_unless_forced(work: Path, bundle: Path, checkpoint: Path):
    before = sha256_file(bundle / "meta.json")
    with pytest.raises(BundleError, match="already exists; pass --force"):
        export_bundle(checkpoint, bundle)
    assert sha256_file(bundle / "meta.json") == before
    other = work / "not_a_bundle"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        export_bundle(checkpoint, other, force=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_missing_or_foreign_checkpoints_are_clear(tmp_path: Path):
    with pytest.raises(UserError, match="checkpoint not found"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "out")
    config = tiny_config(RGB_INPUT)
    sixteen = build_model(tiny_config(RGB_INPUT, num_classes=16).model)
    save_weights(tmp_path / "classes.pt", sixteen, checkpoint_meta(config, 0))
    with pytest.raises(
        UserError,
        match=r"branches.0.weight: checkpoint \(16, 64, 3, 3\) vs architecture \(19, 64, 3, 3\)",
    ):
        export_bundle(tmp_path / "classes.pt", tmp_path / "out")
    resnet50 = build_model(tiny_config(RGB_INPUT, backbone="resnet50").model)
    save_weights(tmp_path / "arch.pt", resnet50, checkpoint_meta(config, 0))
    with pytest.raises(
        UserError, match=r"\(resnet18, width 8, 19 classes\): \d+ with another shape .* unexpected"
    ):
        export_bundle(tmp_path / "arch.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def edit_meta(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / "meta.json").read_text())
    meta.update(changes)
    (bundle / "meta.json").write_text(json.dumps(meta))


def test_meta_json_problems_name_the_file_and_field(copy: Path):
    meta_file = copy / "meta.json"
    edit_meta(copy, schema_version=2)
    with pytest.raises(BundleError, match=r"meta.json: schema_version 2 is newer .* upgrade"):
        load_meta(copy)
    edit_meta(copy, schema_version=1, input={**load_meta_raw(copy)["input"], "layout": "HWC"})
    with pytest.raises(BundleError, match=r"meta.json: field 'input.layout': expected one of"):
        load_meta(copy)
    meta = load_meta_raw(copy)
    del meta["shapes"], meta["opset"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"missing required field\(s\) \['shapes', 'opset'\]"):
        load_meta(copy)
    meta_file.write_text('{"schema_version": 1,')
    with pytest.raises(BundleError, match=r"meta\.json: not valid JSON"):
        load_meta(copy)
    meta_file.unlink()
    with pytest.raises(BundleError, match=r"meta\.json is missing"):
        load_meta(copy)


def load_meta_raw(bundle: Path) -> dict:
    return json.loads((bundle / "meta.json").read_text())


def test_validate_meta_rejects_inconsistent_classes_and_escaping_paths(bundle: Path):
    meta = load_meta(bundle)
    with pytest.raises(BundleError, match="'classes', 'num_classes' and 'palette' disagree"):
        validate_meta({**meta, "num_classes": 16}, Path("m.json"))
    models = {"fp32": {**meta["models"]["fp32"], "file": "../model.onnx"}}
    with pytest.raises(BundleError, match=r"models\.fp32\.file': expected a relative path inside"):
        validate_meta({**meta, "models": models, "precision": ["fp32"]}, Path("m.json"))


# --------------------------------------------------------------------------------------------
# verify and evaluate
# --------------------------------------------------------------------------------------------


def test_verify_passes_and_catches_a_changed_model(copy: Path):
    reports = verify_bundle(copy)
    assert [r.precision for r in reports] == ["fp32", "fp16"] and all(r.passed for r in reports)
    assert all(s.metrics["label_agreement"] == 1.0 for s in reports[0].samples)
    with open(copy / "model.onnx", "r+b") as f:  # flip one byte of the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model.onnx: sha256 .* does not match meta.json"):
        verify_bundle(copy, precisions=["fp32"])


def test_verify_reports_outputs_that_drift(bundle: Path):
    meta = load_meta(bundle)
    run = OnnxRuntimeBackend(bundle / "model.onnx").outputs

    def drifting(batch):
        out = run(batch)
        return {**out, "presence": out["presence"] + 0.05}

    report = check_samples(bundle, meta, "fp32", drifting)
    assert not report.passed
    assert "presence max |diff| 5.00e-02 > 1e-03" in report.samples[0].problems[0]


def test_verify_and_bundle_reading_need_no_torch(bundle: Path):
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from adapt_deploy.export.verify import verify_bundle\n"
        f"reports = verify_bundle({str(bundle)!r})\n"
        "assert all(r.passed for r in reports)\n"
        "import adapt_deploy.bundle.meta, adapt_deploy.export.precision\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_evaluate_bundle_gives_the_checkpoint_miou(bundle, checkpoint, cityscapes_root):
    expected = evaluate_checkpoint(checkpoint, cityscapes_root).miou
    fp32, mode = evaluate_bundle(bundle, cityscapes_root)
    assert mode == "logits" and abs(100 * fp32.miou - 100 * expected) < 0.1
    fp16, _ = evaluate_bundle(bundle, cityscapes_root, precision="fp16")
    assert abs(100 * fp16.miou - 100 * expected) < 0.5
    deployed, mode = evaluate_bundle(bundle, cityscapes_root, use_logits=False)
    assert mode == "labels" and deployed.confusion.sum() == fp32.confusion.sum()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_verify_and_evaluate_a_bundle(bundle: Path, cityscapes_root: Path):
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(bundle), "--precision", "fp32"])
    assert result.exit_code == 0 and "verified on onnxruntime" in result.output
    result = runner.invoke(app, ["evaluate", str(bundle), "--data", str(cityscapes_root)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime fp32" in result.output and "mIoU" in result.output


def test_verify_device_picks_the_gpu_of_the_gpu_backends(bundle: Path, monkeypatch):
    """--device N reaches the TensorRT backend and ONNX Runtime's CUDA provider; the CPU
    backend refuses any GPU but 0, and a negative index is a usage error."""
    from adapt_deploy.export import verify as verifying
    from adapt_deploy.runtime import tensorrt_backend

    opened: list[int] = []

    class Engine:
        def __init__(self, bundle, meta, precision, device=0):
            opened.append(device)
            raise UserError("no engine here")

    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", Engine)
    with pytest.raises(UserError, match="no engine here"):
        verifying.verify_bundle(bundle, "tensorrt", ["fp32"], gpu=2)
    assert opened == [2]
    monkeypatch.setattr(verifying, "require_cuda", lambda what: None)
    assert verifying.ort_device("onnxruntime-cuda", 3) == 3
    with pytest.raises(UserError, match="--device 1: backend onnxruntime runs on the CPU"):
        verifying.verify_bundle(bundle, "onnxruntime", ["fp32"], gpu=1)
    result = CliRunner().invoke(app, ["verify", str(bundle), "--device", "-1"])
    assert result.exit_code == 2 and "--device" in result.output


def test_cli_errors_are_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "adapt_deploy.cli", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "meta.json is missing" in result.stderr
    assert "Traceback" not in result.stderr
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "missing.pt"), "--out", "b"])
    assert isinstance(result.exception, UserError) and "checkpoint not found" in str(
        result.exception
    )
    result = runner.invoke(app, ["evaluate", "x.pt", "--data", ".", "--backend", "onnxruntime"])
    assert isinstance(result.exception, UserError) and "export it first" in str(result.exception)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_export_engine_without_tensorrt_keeps_the_bundle(tmp_path: Path, checkpoint: Path):
    out = tmp_path / "b"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(out), "--engine"])
    assert isinstance(result.exception, UserError)
    assert "TensorRT is not installed here" in str(result.exception)
    assert f"adapt-deploy build-engine {out}" in str(result.exception)
    assert load_meta(out)["precision"] == ["fp32"]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT not installed")
def test_export_engine_builds_with_tensorrt(tmp_path: Path, checkpoint: Path):
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--out", str(tmp_path / "b"), "--fp16", "--engine"]
    )
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "b" / "engines").glob("*"))


def test_parse_shape():
    assert parse_shape("1,512,1024") == [1, 512, 1024] == parse_shape("1x512x1024")
    with pytest.raises(UserError, match="--max-shape: expected N,H,W"):
        parse_shape("512x1024", "--max-shape")


def test_opset_outside_what_the_graph_and_runtimes_support_is_refused(tmp_path, checkpoint):
    with pytest.raises(UserError, match="--opset must be between 18 and 21, got 17"):
        export_bundle(checkpoint, tmp_path / "b", opset=17)


def test_no_adapt_package_keeps_the_training_weights_out(tmp_path: Path):
    source = write_gta5(tmp_path / "source", 2)
    checkpoint = write_source_checkpoint(tmp_path / "c.pt", source)
    out = tmp_path / "bundle"
    runner = CliRunner()
    args = ["export", str(checkpoint), "--out", str(out), "--no-adapt-package"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "package" not in load_meta(out)["adaptation"] and not (out / "adapt").exists()
    both = ["--source-data", str(source), "--no-adapt-package"]
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "b2"), *both])
    # a UserError: main() prints it as one line (tests/test_cli.py)
    assert isinstance(result.exception, UserError)
    assert "drop --no-adapt-package" in str(result.exception) and not (tmp_path / "b2").exists()
