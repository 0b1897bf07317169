"""The ONNX export of the deployed graph (models/deploy.py's `DeployModel`) with
torch.onnx.export (the dynamo exporter), and the meta.json entries that describe its input and
outputs."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from adapt_deploy.config import InputConfig
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.deploy import INPUT_NAME, DeployModel, GraphSpec
from adapt_deploy.ops.pooling import onnx_translations

OPSET = 20
MIN_OPSET = 18  # ReduceLogSumExp with axes as an input (the LSE pooling translation)
MAX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph


def input_meta(spec: InputConfig, graph: GraphSpec) -> dict[str, Any]:
    """meta.json `input`: always RGB; mean/std in RGB order and 0-255 pixel units."""
    rgb = spec.color_order == "RGB"
    mean = list(spec.mean) if rgb else list(spec.mean)[::-1]
    std = list(spec.std) if rgb else list(spec.std)[::-1]
    nhwc = graph.layout == "NHWC"
    return {
        "name": INPUT_NAME,
        "layout": graph.layout,
        "dtype": "uint8" if nhwc else "float32",
        "color_order": "RGB",
        "normalization": "in_graph" if nhwc else "external",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dims": ["batch", "height", "width", 3] if nhwc else ["batch", 3, "height", "width"],
        "pixel_range": [0, 255],
    }


def outputs_meta(graph: GraphSpec) -> list[dict[str, Any]]:
    """meta.json `outputs`."""
    outputs: list[dict[str, Any]] = [
        {"name": "labels", "dtype": "int32", "dims": ["batch", "height", "width"]},
        {"name": "presence", "dtype": "float32", "dims": ["batch", "classes"]},
    ]
    if graph.logits:
        dims = ["batch", "classes", "logits_height", "logits_width"]
        outputs.append({"name": "logits", "dtype": "float32", "dims": dims})
    return outputs


def example_input(graph: GraphSpec, batch: int = 2, height: int = 64, width: int = 96):
    """A tracing input of the deployed layout (its sizes are never baked in: all dynamic)."""
    if graph.layout == "NHWC":
        return torch.zeros(batch, height, width, 3, dtype=torch.uint8)
    return torch.zeros(batch, 3, height, width, dtype=torch.float32)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (optional torchvision ops, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: DeployModel, path: Path, opset: int = OPSET, max_batch: int = 64, max_side: int = 8192
) -> list[Path]:
    """Export with dynamic batch, height and width; returns the files written (model first).

    One self-contained file when the weights fit protobuf's 2 GiB, else model + external data.
    """
    graph = model.graph
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    height = torch.export.Dim("height", min=16, max=max_side)
    width = torch.export.Dim("width", min=16, max=max_side)
    dims = (
        {0: batch, 1: height, 2: width}
        if graph.layout == "NHWC"
        else {0: batch, 2: height, 3: width}
    )
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    single = weight_bytes < MAX_SINGLE_FILE_BYTES
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            model,
            (example_input(graph),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=graph.output_names,
            dynamic_shapes=(dims,),
            custom_translation_table=onnx_translations(),
            opset_version=opset,
            optimize=True,
            external_data=not single,
            verbose=False,
        )
    if single:
        proto = onnx.load(str(path))
        _name_output_dims(proto)
        _separate_conv_weights(proto, model.model)
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


def graph_opset(path: Path) -> int:
    """The default-domain opset a saved model declares (what a runtime must support)."""
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _name_output_dims(proto: onnx.ModelProto) -> None:
    """Readable names for the logits' symbolic sizes (the exporter writes formulas there)."""
    for output in proto.graph.output:
        if output.name != "logits":
            continue
        dims = output.type.tensor_type.shape.dim
        for dim, name in zip(dims[2:], ("logits_height", "logits_width"), strict=False):
            if dim.dim_param:
                dim.dim_param = name


def _separate_conv_weights(proto: onnx.ModelProto, model: DeepLab) -> None:
    """Give every conv its own weight and bias initializers (a zero bias where the exporter
    dropped an all-zero one, a copy where it merged equal tensors of different convs): on-device
    adaptation refits exactly these tensors, and a built TensorRT engine cannot be rewired."""
    from adapt_deploy.export.folding import build_folding_map, own_initializers

    own_initializers(proto, build_folding_map(model, proto))
