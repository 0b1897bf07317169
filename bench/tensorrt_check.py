"""TensorRT check for a GPU owner: export a tiny bundle, build and inspect engines, load them back.

    python -m bench.tensorrt_check [--out DIR] [--checkpoint CKPT] [--refit]

Without --checkpoint it writes a hand-built bundle (a three-conv segmenter in ONNX, made here
without torch, with the real fp16 conversion of adapt_deploy.export.precision); with one it
runs `adapt_deploy.export.pipeline.export_bundle` (needs torch). Then, for fp32 and fp16:
build_engines, the engine inspector's fp16 share, load_engine on this machine, and the refusal
of an engine whose sidecar claims another GPU, and the runtime's Segmenter on the TensorRT
backend against ONNX Runtime. With --refit it also builds refittable engines
and refits them from the bundle's ONNX (OnnxParserRefitter). Results go to
bench/results/tensorrt_check.md.

Has not been run by us: our machines have no GPU and cannot install TensorRT.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
CLASSES = ["road", "building", "vegetation", "sky"]
PALETTE = [[128, 64, 128], [70, 70, 70], [107, 142, 35], [70, 130, 180]]
MEAN, STD = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]


def tiny_onnx(num_classes: int = len(CLASSES), fold_bn: bool = True, seed: int = 0) -> Any:
    """A small segmenter with the deployed interface: uint8 NHWC image -> labels, presence.

    Two conv(+BN)+ReLU blocks (stride 2 in the second), a biased 1x1 classifier, bilinear
    upsampling to the input size, argmax (int32 labels) and sigmoid(LogSumExp) presence.
    `fold_bn=False` keeps BatchNormalization nodes; True gives the convs a bias instead, as
    torch's exporter does with optimize=True.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list[Any] = []

    def const(name: str, values: np.ndarray) -> str:
        array = np.asarray(values)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        inits.append(numpy_helper.from_array(array, name))
        return name

    const("mean", np.array(MEAN, np.float32).reshape(1, 3, 1, 1))
    const("std", np.array(STD, np.float32).reshape(1, 3, 1, 1))
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["image_f"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["x_nchw", "mean"], ["x_centred"]),
        helper.make_node("Div", ["x_centred", "std"], ["x0"]),
    ]
    x, channels = "x0", 3
    for i, (out_ch, stride) in enumerate(((8, 1), (8, 2)), start=1):
        w = const(f"block{i}.conv.weight", rng.normal(0, 0.3, (out_ch, channels, 3, 3)))
        conv_inputs = [w]
        if fold_bn:
            conv_inputs.append(const(f"block{i}.conv.bias", rng.normal(0, 0.1, out_ch)))
        conv_out = f"block{i}.conv_out"
        nodes.append(
            helper.make_node(
                "Conv", [x, *conv_inputs], [conv_out], pads=[1, 1, 1, 1], strides=[stride] * 2
            )
        )
        if not fold_bn:
            bn = [
                const(f"block{i}.bn.{name}", value)
                for name, value in (
                    ("weight", rng.uniform(0.5, 1.5, out_ch)),
                    ("bias", rng.normal(0, 0.1, out_ch)),
                    ("running_mean", rng.normal(0, 0.1, out_ch)),
                    ("running_var", rng.uniform(0.5, 1.5, out_ch)),
                )
            ]
            nodes.append(helper.make_node("BatchNormalization", [conv_out, *bn], [f"block{i}.bn"]))
            conv_out = f"block{i}.bn"
        nodes.append(helper.make_node("Relu", [conv_out], [f"block{i}.relu"]))
        x, channels = f"block{i}.relu", out_ch
    wc = const("classifier.weight", rng.normal(0, 0.3, (num_classes, channels, 1, 1)))
    bc = const("classifier.bias", rng.normal(0, 0.1, num_classes))
    const("hw_start", np.array([1], np.int64))
    const("hw_end", np.array([3], np.int64))
    const("nc_start", np.array([0], np.int64))
    const("nc_end", np.array([2], np.int64))
    nodes += [
        helper.make_node("Conv", [x, wc, bc], ["logits"]),
        helper.make_node("ReduceLogSumExp", ["logits"], ["lse"], axes=[2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["lse"], ["presence"]),
        helper.make_node("Shape", ["image"], ["image_shape"]),
        helper.make_node("Slice", ["image_shape", "hw_start", "hw_end"], ["hw"]),
        helper.make_node("Shape", ["logits"], ["logits_shape"]),
        helper.make_node("Slice", ["logits_shape", "nc_start", "nc_end"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["logits", "", "", "sizes"],
            ["upsampled"],
            mode="linear",
            coordinate_transformation_mode="align_corners",
        ),
        helper.make_node("ArgMax", ["upsampled"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.INT32),
    ]
    dims = ["batch", "height", "width"]
    graph = helper.make_graph(
        nodes,
        "tiny_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [*dims, 3])],
        [
            helper.make_tensor_value_info("labels", TensorProto.INT32, dims),
            helper.make_tensor_value_info("presence", TensorProto.FLOAT, ["batch", num_classes]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_bundle(
    out: Path,
    fp16: bool = True,
    fold_bn: bool = True,
    shapes: dict[str, list[int]] | None = None,
) -> Path:
    """A complete bundle (meta.json valid for adapt_deploy.bundle.meta) around tiny_onnx."""
    import onnx

    from adapt_deploy import __version__
    from adapt_deploy.bundle.meta import SCHEMA_VERSION, sha256_file, write_meta
    from adapt_deploy.export.precision import convert_to_mixed_fp16

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx(fold_bn=fold_bn)
    files = {"fp32": out / "model.onnx"}
    onnx.save(model, str(files["fp32"]))
    if fp16:
        files["fp16"] = out / "model_fp16.onnx"
        onnx.save(convert_to_mixed_fp16(model), str(files["fp16"]))
    models = {
        p: {"file": f.name, "sha256": sha256_file(f), "files": {f.name: sha256_file(f)}}
        for p, f in files.items()
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": CLASSES,
        "num_classes": len(CLASSES),
        "palette": PALETTE,
        "input": {
            "name": "image",
            "layout": "NHWC",
            "dtype": "uint8",
            "color_order": "RGB",
            "normalization": "in_graph",
            "mean": MEAN,
            "std": STD,
        },
        "shapes": shapes or {"min": [1, 32, 32], "opt": [1, 64, 96], "max": [2, 128, 192]},
        "outputs": [
            {"name": "labels", "dtype": "int32", "dims": ["batch", "height", "width"]},
            {"name": "presence", "dtype": "float32", "dims": ["batch", "classes"]},
        ],
        "opset": 17,
        "models": models,
        "precision": list(files),
        "checkpoint": {"file": "none (hand-built test model)", "sha256": ""},
        "tools": {"adapt_deploy": __version__, "onnx": onnx.__version__},
        "parity": {},
        "samples": [],
    }
    write_meta(out, meta)
    return out


# --------------------------------------------------------------------------------------------
# The check itself (GPU + TensorRT)
# --------------------------------------------------------------------------------------------


def _export_checkpoint(checkpoint: Path, out: Path) -> Path:
    from adapt_deploy.export.pipeline import export_bundle

    export_bundle(checkpoint, out, fp16=True, force=True)
    return out


def _mismatch_refused(plan: Path, bundle: Path, precision: str) -> str:
    """Copy the plan under a foreign GPU's name and check load_engine's selection refuses it."""
    from adapt_deploy.bundle.engine_files import (
        EngineMismatchError,
        Platform,
        read_record,
        select_engine,
    )

    record = read_record(plan)
    elsewhere = Platform(record.tensorrt_version, "NVIDIA Imaginary GPU", "1.0")
    try:
        select_engine(bundle, precision, elsewhere)
    except EngineMismatchError as exc:
        return f"refused: {exc}"
    return "NOT refused (bug)"


def _refit_from_onnx(plan: Path, record: Any, bundle: Path) -> str:
    """Refit the engine with the same weights from its ONNX (OnnxParserRefitter)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    ok = parser_refitter.refit_from_file(str(bundle / record.onnx_file))
    done = ok and refitter.refit_cuda_engine()
    return f"refit from {record.onnx_file}: {'ok' if done else 'FAILED'}"


def _segmenter_check(bundle: Path, precision: str) -> str:
    """The runtime's TensorRT backend against ONNX Runtime (CPU, fp32) on a few frames."""
    import time

    from adapt_deploy.runtime import Segmenter

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), np.uint8) for _ in range(8)]
    with Segmenter.from_bundle(bundle, backend="onnxruntime", device="cpu") as cpu:
        expected = [cpu(f).labels for f in frames]
    with Segmenter.from_bundle(bundle, backend="tensorrt", precision=precision) as seg:
        seg(frames[0])  # warm-up
        start = time.perf_counter()
        got = [seg(f).labels for f in frames]
        per_frame = (time.perf_counter() - start) / len(frames)
        batched = seg.batch(frames[:2])
    agreement = float(np.mean([np.mean(a == b) for a, b in zip(got, expected, strict=True)]))
    same = all(np.array_equal(b.labels, g) for b, g in zip(batched, got, strict=True))
    return (
        f"Segmenter(backend=tensorrt): label agreement with ONNX Runtime fp32 "
        f"{100 * agreement:.3f}%, {1e3 * per_frame:.2f} ms/frame at 64x96, "
        f"batch of 2 equals single calls: {same}"
    )


def run_check(bundle: Path, refit: bool) -> list[str]:
    """Build, inspect and load every engine; the report's lines."""
    from adapt_deploy.bundle.engine_files import read_record
    from adapt_deploy.export.tensorrt import build_engines, load_engine
    from adapt_deploy.progress import RichReporter

    reporter = RichReporter()
    lines = []
    for fp16 in (False, True):
        for with_refit in (False, True) if refit else (False,):
            precision = "fp16" if fp16 else "fp32"
            (plan,) = build_engines(bundle, fp16=fp16, refit=with_refit, reporter=reporter)
            record = read_record(plan)
            data, loaded = load_engine(bundle, precision)
            lines += [
                f"## {plan.name}{' (refit)' if with_refit else ''}",
                "",
                f"- built in {record.build_seconds:.1f} s, {len(data)} bytes, "
                f"fp16 from: {record.fp16_source}",
                f"- layers: {json.dumps(record.layers)}",
                f"- load_engine on this machine: ok ({loaded.engine})",
                f"- engine claiming another GPU: {_mismatch_refused(plan, bundle, precision)}",
            ]
            if not with_refit:
                lines.append(f"- {_segmenter_check(bundle, precision)}")
            if with_refit:
                lines += [
                    f"- refit mode {record.refit_mode}, "
                    f"{len(record.refittable_weights)} refittable weights",
                    f"- {_refit_from_onnx(plan, record, bundle)}",
                ]
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="bundle directory (default: a temp directory)")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint (needs torch)")
    parser.add_argument(
        "--refit", action="store_true", help="also build and refit refittable engines"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="trt-check-")) / "bundle"
    bundle = _export_checkpoint(args.checkpoint, out) if args.checkpoint else write_tiny_bundle(out)
    lines = run_check(bundle, args.refit)
    import tensorrt as trt

    from adapt_deploy.bundle.platform import detect_platform

    here = detect_platform(trt.__version__)
    header = [
        "# TensorRT check",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {json.dumps(dataclasses.asdict(here))}",
        f"- python {platform.python_version()}, bundle: {bundle}",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "tensorrt_check.md"
    path.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
