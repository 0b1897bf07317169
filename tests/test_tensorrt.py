"""TensorRT engines: names, sidecars, the compatibility check, build planning, layer reports.

Everything that does not need TensorRT runs here for real (plain functions, real ONNX graphs,
real files). The builds themselves need tensorrt and a CUDA GPU: those tests are marked and
skip with that reason elsewhere; bench/tensorrt_check.py is the script for a GPU owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from adapt_deploy.atomic import atomic_write
from adapt_deploy.bundle.engine_files import (
    EngineError,
    EngineMismatchError,
    EngineRecord,
    Platform,
    check_compatible,
    engine_path,
    gpu_slug,
    layer_report_path,
    parse_version,
    read_engine,
    read_record,
    read_timing_cache,
    record_path,
    select_engine,
    sm_tag,
    timing_cache_path,
    write_record,
)
from adapt_deploy.bundle.meta import BundleError, load_meta, sha256_file
from adapt_deploy.bundle.platform import import_tensorrt, parse_nvidia_smi
from adapt_deploy.cli import app
from adapt_deploy.export.refit import plan_refit, plan_refit_file
from adapt_deploy.export.tensorrt import build_engines
from adapt_deploy.export.trt_layers import keep_in_fp32, layer_precision, parse_layer_report
from adapt_deploy.export.trt_plan import build_mode, prepare_build, profile_shapes
from bench.tensorrt_check import tiny_onnx, write_tiny_bundle

DATA = Path(__file__).parent / "data"
H100 = Platform("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
ORIN = Platform("10.3.0.30", "Orin", "8.7")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_tiny_bundle(tmp_path / "bundle")


def fake_engine(bundle: Path, precision: str, built_on: Platform, plan_bytes=b"plan") -> Path:
    """A plan file with its sidecar as build_engines writes them (the plan bytes are opaque)."""
    meta = load_meta(bundle)
    model = "fp16" if precision == "fp16" and "fp16" in meta["models"] else "fp32"
    plan = engine_path(bundle, precision, built_on)
    atomic_write(plan, plan_bytes)
    record = EngineRecord(
        engine=plan.name,
        engine_sha256=hashlib.sha256(plan_bytes).hexdigest(),
        tensorrt_version=built_on.tensorrt_version,
        gpu_name=built_on.gpu_name,
        compute_capability=built_on.compute_capability,
        precision=precision,
        fp16_source="strongly typed model_fp16.onnx" if precision == "fp16" else "none",
        onnx_model=model,
        onnx_file=meta["models"][model]["file"],
        onnx_sha256=meta["models"][model]["sha256"],
        input_name="image",
        profile={"min": [1, 32, 32, 3], "opt": [1, 64, 96, 3], "max": [2, 128, 192, 3]},
        refittable=False,
        refit_mode="none",
        refittable_weights=[],
        layers=parse_layer_report((DATA / "trt10_inspector_fp16.json").read_text()).to_dict(),
        build_seconds=12.5,
        built_at="2025-01-01T00:00:00+00:00",
        adapt_deploy_version="0.1.0",
    )
    write_record(plan, record)
    return plan


# --------------------------------------------------------------------------------------------
# No torch, no eager tensorrt
# --------------------------------------------------------------------------------------------


def test_tensorrt_modules_import_without_torch_or_tensorrt():
    code = (
        "import sys\n"
        "import adapt_deploy.export.tensorrt, adapt_deploy.bundle.engine_files\n"
        "import adapt_deploy.export.trt_plan, adapt_deploy.export.trt_layers\n"
        "import adapt_deploy.export.refit\n"
        "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_build_engine_without_tensorrt_is_one_clear_line_and_needs_no_torch(bundle):
    """The CLI path up to the missing-TensorRT error runs with torch and tensorrt unimportable."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['tensorrt'] = None\n"
        f"sys.argv = ['adapt-deploy', 'build-engine', {str(bundle)!r}, '--fp16']\n"
        "from adapt_deploy.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())  # rich wraps at the terminal width
    assert message.startswith("error: TensorRT is not installed")
    assert "pip install 'adapt-deploy[trt]'" in message
    assert "Traceback" not in result.stderr
    assert not (bundle / "engines").exists()


def test_build_engine_help_lists_its_options():
    result = CliRunner().invoke(app, ["build-engine", "--help"])
    assert result.exit_code == 0, result.output
    options = ("--fp16", "--no-fp16", "--refit", "--timing-cache", "--workspace-gb", "--device")
    for option in options:
        assert option in result.output


def test_build_engine_makes_the_chosen_device_current_before_naming_its_gpu(bundle, monkeypatch):
    """--device N: the device is made current (the builder builds there) before the platform
    (the engine's GPU name) is read for that same index; a negative index is a usage error."""
    import adapt_deploy.export.tensorrt as builder

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(builder, "import_tensorrt", lambda: SimpleNamespace(__version__="10.8.0"))
    monkeypatch.setattr(builder, "prepare_build", lambda *args: "inputs")
    monkeypatch.setattr(builder, "select_device", lambda device: calls.append(("select", device)))

    def detect(version: str, device: int) -> Platform:
        calls.append(("detect", device))
        return Platform(version, "NVIDIA L4", "8.9")

    monkeypatch.setattr(builder, "detect_platform", detect)
    built: list[Platform] = []
    monkeypatch.setattr(builder, "_build_engine", lambda trt, b, i, here, *rest: built.append(here))
    builder.build_engines(bundle, fp16=True, refit=False, device=1)
    assert calls == [("select", 1), ("detect", 1)]
    assert built[0].gpu_name == "NVIDIA L4"
    result = CliRunner().invoke(app, ["build-engine", str(bundle), "--device", "-1"])
    assert result.exit_code == 2
    assert "--device" in result.output


# --------------------------------------------------------------------------------------------
# Bad input: meta.json and model hashes are checked before TensorRT is needed
# --------------------------------------------------------------------------------------------


def test_missing_meta_json_is_named(bundle):
    (bundle / "meta.json").unlink()
    with pytest.raises(BundleError, match=r"meta\.json is missing"):
        build_engines(bundle, fp16=True, refit=False)


def test_malformed_meta_json_is_named(bundle):
    (bundle / "meta.json").write_text('{"schema_version": 1, "classes": [')
    with pytest.raises(BundleError, match=r"meta\.json: not valid JSON"):
        build_engines(bundle, fp16=False, refit=False)


def test_meta_json_from_a_newer_schema_is_refused(bundle):
    meta = json.loads((bundle / "meta.json").read_text())
    meta["schema_version"] = 99
    (bundle / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema_version 99 is newer"):
        build_engines(bundle, fp16=True, refit=False)


def test_missing_bundle_directory_is_named(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        build_engines(tmp_path / "nowhere", fp16=True, refit=False)


@pytest.mark.parametrize(
    ("version", "precision", "damaged"),
    [
        ("10.8.0.43", "fp16", "model.onnx"),
        ("10.12.0.36", "fp16", "model_fp16.onnx"),
        ("11.0.0.1", "fp16", "model_fp16.onnx"),
    ],
)
def test_a_model_whose_hash_does_not_match_meta_json_is_refused(
    bundle, version, precision, damaged
):
    """The file the chosen TensorRT path reads is verified (before 10.12 fp16 reads model.onnx)."""
    meta = load_meta(bundle)
    with open(bundle / damaged, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=rf"{damaged}: sha256 .* does not match meta\.json"):
        prepare_build(bundle, meta, precision, version, refit=False)


@pytest.mark.parametrize("version", ["10.12.0", "11.1.0"])
def test_strongly_typed_fp16_needs_the_fp16_model(tmp_path, version):
    bundle = write_tiny_bundle(tmp_path / "fp32only", fp16=False)
    meta = load_meta(bundle)
    with pytest.raises(BundleError, match=r"models\.fp16.*10\.12 and later.*export --fp16"):
        prepare_build(bundle, meta, "fp16", version, refit=False)
    # before 10.12, fp16 is built from model.onnx with the builder flag: no fp16 model needed
    assert prepare_build(bundle, meta, "fp16", "10.8.0", refit=False).onnx_path.name == (
        "model.onnx"
    )


def test_workspace_must_be_positive(bundle):
    from adapt_deploy.errors import UserError

    with pytest.raises(UserError, match="--workspace-gb"):
        build_engines(bundle, fp16=True, refit=False, workspace_gb=0)


# --------------------------------------------------------------------------------------------
# Weakly typed (TensorRT before 10.12) vs strongly typed (10.12 and later), profile shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["10.0.1.6", "10.8.0.43", "10.11.0.33"])
def test_tensorrt_10_uses_the_builder_fp16_flag_on_the_fp32_model(version):
    """Until 10.11; 10.12 deprecated the flag (see the strongly typed test below)."""
    mode = build_mode(version, "fp16")
    assert (mode.model, mode.fp16_flag, mode.pin_fp32, mode.strongly_typed) == (
        "fp32",
        True,
        True,
        False,
    )
    assert mode.fp16_source == "builder FP16 flag"
    assert build_mode(version, "fp32") == replace(
        mode, precision="fp32", fp16_flag=False, pin_fp32=False
    )


@pytest.mark.parametrize("version", ["10.12.0.36", "10.14.1", "11.0.0.1", "11.4.1", "12.0"])
def test_tensorrt_10_12_and_later_are_strongly_typed_from_model_fp16(version):
    """TensorRT 10.12 deprecated weak typing (BuilderFlag.FP16, ILayer.precision); 11 removed it."""
    mode = build_mode(version, "fp16")
    assert (mode.model, mode.fp16_flag, mode.strongly_typed) == ("fp16", False, True)
    assert mode.fp16_source == "strongly typed model_fp16.onnx"
    assert build_mode(version, "fp32").model == "fp32"


@pytest.mark.parametrize("version", ["8.6.1.6", "9.3.0"])
def test_tensorrt_before_10_is_refused(version):
    with pytest.raises(EngineError, match="too old"):
        build_mode(version, "fp16")


def test_unreadable_version_is_an_error():
    with pytest.raises(EngineError, match="cannot read a TensorRT version"):
        parse_version("unknown")
    assert parse_version("10.8.0.43") == (10, 8, 0)
    assert parse_version("11.1") == (11, 1, 0)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("NHWC", {"min": (1, 32, 32, 3), "opt": (1, 64, 96, 3), "max": (2, 128, 192, 3)}),
        ("NCHW", {"min": (1, 3, 32, 32), "opt": (1, 3, 64, 96), "max": (2, 3, 128, 192)}),
    ],
)
def test_profile_shapes_follow_the_input_layout(bundle, layout, expected):
    meta = load_meta(bundle)
    meta["input"]["layout"] = layout
    assert profile_shapes(meta) == expected


def test_prepare_build_reads_everything_from_the_bundle(bundle):
    inputs = prepare_build(bundle, load_meta(bundle), "fp16", "11.0.0", refit=True)
    assert inputs.onnx_path == bundle / "model_fp16.onnx"
    assert inputs.onnx_sha256 == sha256_file(bundle / "model_fp16.onnx")
    assert inputs.input_name == "image"
    assert inputs.shapes["opt"] == (1, 64, 96, 3)
    assert inputs.refit is not None and inputs.refit.mode == "individual"
    assert prepare_build(bundle, load_meta(bundle), "fp32", "11.0.0", refit=False).refit is None


# --------------------------------------------------------------------------------------------
# Engine names, sidecars, compatibility
# --------------------------------------------------------------------------------------------


def test_engine_files_are_named_by_precision_tensorrt_version_and_gpu(tmp_path):
    plan = engine_path(tmp_path, "fp16", H100)
    assert plan == tmp_path / "engines" / "model_fp16.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.plan"
    assert record_path(plan).name == "model_fp16.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.json"
    assert layer_report_path(plan).name == (
        "model_fp16.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.layers.json"
    )
    assert engine_path(tmp_path, "fp32", ORIN).name == "model.trt10.3.0_Orin_sm87.plan"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA GeForce RTX 4090", "NVIDIA-GeForce-RTX-4090"),
        ("Tesla T4", "Tesla-T4"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        ("  ", "unknown-GPU"),
    ],
)
def test_gpu_names_become_file_name_safe(name, slug):
    assert gpu_slug(name) == slug


def test_compute_capability_tags():
    assert [sm_tag(c) for c in ("9.0", "8.7", "12.0")] == ["sm90", "sm87", "sm120"]
    with pytest.raises(EngineError, match="compute capability"):
        sm_tag("nine")


def test_sidecar_round_trips_every_field(bundle):
    plan = fake_engine(bundle, "fp16", H100)
    record = read_record(plan)
    assert record.platform == H100
    assert record.precision == "fp16"
    assert record.onnx_file == "model_fp16.onnx"
    assert record.onnx_sha256 == sha256_file(bundle / "model_fp16.onnx")
    assert record.profile["opt"] == [1, 64, 96, 3]
    assert record.layers["fp16_share"] == pytest.approx(0.4)
    data = json.loads(record_path(plan).read_text())
    expected = {
        "tensorrt_version", "gpu_name", "compute_capability", "precision", "refittable",
        "refit_mode", "refittable_weights", "onnx_file", "onnx_sha256", "profile", "layers",
        "build_seconds", "built_at", "engine_sha256", "schema_version",
    }  # fmt: skip
    assert expected <= data.keys()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("gpu_name"), "missing field 'gpu_name'"),
        (lambda d: d.update(refittable="yes"), "field 'refittable': expected bool"),
        (lambda d: d.update(schema_version=7), "schema_version 7 is newer"),
        (lambda d: d.update(precision="int8"), "field 'precision'"),
    ],
)
def test_damaged_sidecars_are_named_with_the_field(bundle, edit, message):
    plan = fake_engine(bundle, "fp16", H100)
    data = json.loads(record_path(plan).read_text())
    edit(data)
    record_path(plan).write_text(json.dumps(data))
    with pytest.raises(EngineError, match=message) as info:
        read_record(plan)
    assert record_path(plan).name in str(info.value)


def test_sidecar_that_is_not_json(bundle):
    plan = fake_engine(bundle, "fp32", H100)
    record_path(plan).write_text("{")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_record(plan)


def test_an_engine_for_this_machine_passes_the_check(bundle):
    plan = fake_engine(bundle, "fp16", H100)
    check_compatible(plan, read_record(plan), H100, bundle)


@pytest.mark.parametrize(
    ("here", "which"),
    [
        (replace(H100, tensorrt_version="10.9.0.34"), "the TensorRT version differ"),
        (replace(H100, gpu_name="NVIDIA A100-SXM4-40GB", compute_capability="8.0"), "the GPU"),
        (ORIN, "the TensorRT version and the GPU differ"),
    ],
)
def test_an_engine_from_another_tensorrt_or_gpu_is_refused_saying_which(bundle, here, which):
    plan = fake_engine(bundle, "fp16", H100)
    with pytest.raises(EngineMismatchError) as info:
        check_compatible(plan, read_record(plan), here, bundle)
    message = str(info.value)
    assert which in message
    assert "TensorRT 10.8.0.43 on NVIDIA H100 80GB HBM3" in message  # what built it
    assert here.describe() in message  # what this machine has
    assert f"adapt-deploy build-engine {bundle} --fp16" in message


def test_same_gpu_name_with_a_different_compute_capability_is_another_gpu(bundle):
    plan = fake_engine(bundle, "fp32", H100)
    with pytest.raises(EngineMismatchError, match="the GPU differ"):
        check_compatible(plan, read_record(plan), replace(H100, compute_capability="9.1"), bundle)


def test_select_engine_finds_this_machines_plan_among_others(bundle):
    fake_engine(bundle, "fp16", ORIN)
    mine = fake_engine(bundle, "fp16", H100)
    fake_engine(bundle, "fp32", H100)
    plan, record = select_engine(bundle, "fp16", H100)
    assert plan == mine and record.platform == H100


def test_select_engine_refuses_when_only_foreign_engines_exist(bundle):
    fake_engine(bundle, "fp16", ORIN)
    with pytest.raises(EngineMismatchError, match=r"built for TensorRT 10\.3\.0\.30 on Orin"):
        select_engine(bundle, "fp16", H100)


def test_select_engine_without_any_engine_says_how_to_build(bundle):
    fake_engine(bundle, "fp32", H100)  # another precision does not count
    with pytest.raises(EngineError, match=f"no fp16 TensorRT engine.*build-engine {bundle} --fp16"):
        select_engine(bundle, "fp16", H100)


def test_a_plan_without_its_sidecar_is_refused(bundle):
    plan = fake_engine(bundle, "fp16", H100)
    record_path(plan).unlink()
    with pytest.raises(EngineError, match="has no sidecar"):
        select_engine(bundle, "fp16", H100)


def test_read_engine_returns_the_plan_and_its_record(bundle):
    fake_engine(bundle, "fp16", H100, plan_bytes=b"serialized plan")
    data, record = read_engine(bundle, load_meta(bundle), "fp16", H100)
    assert data == b"serialized plan" and record.precision == "fp16"


def test_read_engine_refuses_a_damaged_plan(bundle):
    plan = fake_engine(bundle, "fp16", H100)
    plan.write_bytes(b"something else")
    with pytest.raises(EngineError, match="does not match its sidecar"):
        read_engine(bundle, load_meta(bundle), "fp16", H100)


def test_read_engine_refuses_a_plan_built_from_a_replaced_model(bundle):
    fake_engine(bundle, "fp16", H100)
    meta = load_meta(bundle)
    meta["models"]["fp16"]["sha256"] = "0" * 64  # the bundle was re-exported since
    with pytest.raises(EngineError, match="no longer the bundle's fp16 model"):
        read_engine(bundle, meta, "fp16", H100)


# --------------------------------------------------------------------------------------------
# Timing cache
# --------------------------------------------------------------------------------------------


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path):
    assert timing_cache_path(tmp_path, H100) == (
        tmp_path / "engines" / "timing.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.cache"
    )
    assert timing_cache_path(tmp_path, ORIN) != timing_cache_path(tmp_path, H100)
    assert timing_cache_path(tmp_path, H100, tmp_path / "shared.cache") == tmp_path / "shared.cache"


def test_timing_cache_persists_between_builds(tmp_path):
    path = timing_cache_path(tmp_path, H100)
    assert read_timing_cache(path) == b""  # first build: an empty cache
    atomic_write(path, b"\x01timing")
    assert read_timing_cache(path) == b"\x01timing"  # the next build starts from it
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "engines" / "x.plan"
    atomic_write(path, b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["x.plan"]


# --------------------------------------------------------------------------------------------
# The engine inspector's layer report
# --------------------------------------------------------------------------------------------


def test_tensorrt_10_layer_report_fp16_share():
    report = parse_layer_report((DATA / "trt10_inspector_fp16.json").read_text())
    assert report.total == 13  # the NoOp is not counted
    assert report.by_precision == {"uint8": 1, "fp32": 6, "fp16": 4, "int64": 1, "int32": 1}
    assert report.fp16_share == pytest.approx(4 / 10)  # of the layers computing in floats
    assert report.with_weights == {"fp16": 3}
    assert report.fp16_share_with_weights == 1.0
    assert "fp16 share of float layers 40%" in report.summary()


def test_tensorrt_11_layer_report_with_separate_datatype_fields():
    report = parse_layer_report((DATA / "trt11_inspector_fp16.json").read_text())
    assert report.by_precision == {"uint8": 1, "fp16": 3, "fp32": 3}
    assert report.fp16_share == pytest.approx(0.5)
    assert report.fp16_share_with_weights == 1.0


def test_an_fp32_engine_has_no_fp16_share():
    layers = json.loads((DATA / "trt10_inspector_fp16.json").read_text())
    text = json.dumps(layers).replace("FP16", "FP32").replace('"Half"', '"Float"')
    report = parse_layer_report(text)
    assert report.fp16_share == 0.0 and report.by_precision.get("fp16") is None


def test_layer_names_only_report_says_detailed_verbosity_is_needed():
    text = json.dumps({"Layers": ["/Conv", "/Relu"], "Bindings": ["image", "labels"]})
    with pytest.raises(EngineError, match=r"ProfilingVerbosity\.DETAILED"):
        parse_layer_report(text)


def test_layer_precision_rules():
    dynamic = {"Format/Datatype": "N/A due to dynamic shapes"}
    assert layer_precision({"Weights": {"Type": "Half"}, "Outputs": [dynamic]}) == "fp16"
    assert layer_precision({"LayerType": "Reformat", "Outputs": [dynamic]}) == "unknown"
    bf16 = {"Format/Datatype": "Row major linear BFloat16 format"}
    assert layer_precision({"Inputs": [bf16]}) == "bf16"
    uint8 = {"Format/Datatype": "Channel major UInt8 format"}
    assert layer_precision({"Inputs": [uint8]}) == "uint8"
    assert layer_precision({"Inputs": [dynamic], "Outputs": [{"DataType": "Float"}]}) == "fp32"


def test_not_json_is_an_engine_error():
    with pytest.raises(EngineError, match="not JSON"):
        parse_layer_report("Layers: none")


@pytest.mark.parametrize(
    ("layer", "op", "pinned"),
    [
        ("REDUCE", None, True),
        ("SOFTMAX", None, True),
        ("UNARY", "EXP", True),
        ("UNARY", "LOG", True),
        ("UNARY", "ABS", False),
        ("CONVOLUTION", None, False),
        ("ACTIVATION", None, False),
    ],
)
def test_tensorrt_10_fp16_keeps_reductions_and_exp_in_fp32(layer, op, pinned):
    assert keep_in_fp32(layer, op) is pinned


# --------------------------------------------------------------------------------------------
# Which weights a refittable engine exposes
# --------------------------------------------------------------------------------------------


def test_refit_plan_of_a_bn_folded_model_is_the_convs_and_the_classifier():
    plan = plan_refit(tiny_onnx(fold_bn=True).graph)
    assert plan.mode == "individual"
    assert set(plan.weights) == {
        "block1.conv.weight", "block1.conv.bias", "block2.conv.weight", "block2.conv.bias",
        "classifier.weight", "classifier.bias",
    }  # fmt: skip
    assert "mean" not in plan.weights and "std" not in plan.weights  # normalization stays fixed


def test_refit_plan_with_batchnorm_nodes_makes_everything_refittable():
    plan = plan_refit(tiny_onnx(fold_bn=False).graph)
    assert plan.mode == "all"
    assert {"block1.bn.weight", "block1.bn.running_var", "classifier.weight"} <= set(plan.weights)
    assert "BatchNormalization" in plan.reason


def test_refit_plan_of_model_fp16_names_the_fp16_initializers(bundle):
    plan = plan_refit_file(bundle / "model_fp16.onnx")
    assert plan.mode == "individual"
    assert "classifier.weight__fp16" in plan.weights
    assert "block1.conv.bias__fp16" in plan.weights


def test_refit_plan_skips_a_conv_without_bias_or_batchnorm_and_follows_casts():
    w = helper.make_tensor("fixed.weight", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    c = helper.make_tensor("cls.weight", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    b = helper.make_tensor("cls.bias", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("Conv", ["x", "fixed.weight"], ["y"]),
        helper.make_node("Cast", ["cls.weight"], ["cls.weight_cast"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["y", "cls.weight_cast", "cls.bias"], ["z"]),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [value("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [value("z", TensorProto.FLOAT, [1, 1, 4, 4])],
        [w, c, b],
    )
    onnx.checker.check_model(helper.make_model(graph))
    plan = plan_refit(graph)
    assert plan.weights == ("cls.weight", "cls.weight_cast", "cls.bias")


# --------------------------------------------------------------------------------------------
# GPU identification
# --------------------------------------------------------------------------------------------


def test_nvidia_smi_output_is_parsed():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\n") == ("NVIDIA H100 80GB HBM3", "9.0")
    assert parse_nvidia_smi("\nOrin, 8.7") == ("Orin", "8.7")
    with pytest.raises(EngineError, match="cannot read a GPU name"):
        parse_nvidia_smi("No devices were found")


# --------------------------------------------------------------------------------------------
# Real builds: need tensorrt and a CUDA GPU
# --------------------------------------------------------------------------------------------


def _tensorrt_reason() -> str | None:
    """Why the real-build tests cannot run here, or None when they can."""
    try:
        import_tensorrt()
    except Exception:
        return "tensorrt not importable"
    from adapt_deploy.bundle.platform import _gpu_from_cuda_python, _gpu_from_nvidia_smi

    try:
        found = _gpu_from_cuda_python(0) or _gpu_from_nvidia_smi(0)
    except Exception:
        found = None
    return None if found else "no CUDA GPU"


_REASON = _tensorrt_reason()
needs_tensorrt = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_build_and_load_engines_on_this_gpu(bundle, fp16):
    precision = "fp16" if fp16 else "fp32"
    (plan,) = build_engines(bundle, fp16=fp16, refit=False)
    record = read_record(plan)
    assert plan.is_file() and layer_report_path(plan).is_file()
    assert record.precision == precision and not record.refittable
    share = record.layers["fp16_share"]
    assert (share > 0) if fp16 else (share == 0)
    cache = next((bundle / "engines").glob("timing.*.cache"))
    assert cache.stat().st_size > 0
    from adapt_deploy.export.tensorrt import load_engine

    data, loaded = load_engine(bundle, precision)
    assert loaded == record and len(data) == plan.stat().st_size
    (again,) = build_engines(bundle, fp16=fp16, refit=False)  # reuses the timing cache
    assert any("reused" in note for note in read_record(again).notes)


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("fold_bn", [True, False], ids=["bn-folded", "bn-nodes"])
def test_refittable_engine_exposes_the_adapted_weights(tmp_path, fold_bn):
    bundle = write_tiny_bundle(tmp_path / "bundle", fold_bn=fold_bn)
    (plan,) = build_engines(bundle, fp16=True, refit=True)
    record = read_record(plan)
    assert record.refittable and record.refit_mode in ("individual", "all")
    if fold_bn and record.refit_mode == "individual":
        assert "classifier.weight" in record.refittable_weights or (
            "classifier.weight__fp16" in record.refittable_weights
        )
    from bench.tensorrt_check import _refit_from_onnx

    assert _refit_from_onnx(plan, record, bundle).endswith("ok")
