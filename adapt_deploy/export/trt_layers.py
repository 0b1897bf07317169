"""What the engine's layers compute in: the engine inspector's JSON report, and fp32 pins.

`IEngineInspector.get_engine_information(LayerInformationFormat.JSON)` on an engine built with
`ProfilingVerbosity.DETAILED` returns {"Layers": [...], "Bindings" | "I/O Tensors": [...]}.
Each layer is an object with "Name", "LayerType", "Inputs"/"Outputs" (tensor objects) and, for
layers with weights, "Weights": {"Type": "Half", "Count": n}. The tensor's type is written

- TensorRT 10: "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"
  (NVIDIA's trt-engine-explorer, trex/activations.py, lists the strings it knows);
- TensorRT 11: separate "Format" and "DataType" fields (the 10.x→11.x migration guide,
  "IEngineInspector JSON Output"; "Bindings" became "I/O Tensors").

Not verified against a real engine here (no TensorRT on our machines): the parser accepts both
spellings and reports layers whose type it cannot read as "unknown" instead of guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from adapt_deploy.bundle.engine_files import EngineError

# Names a tensor type goes by in the report → our precision names (word-bounded: "BFloat16" is
# not "Float"; "FP16" inside "Channel major FP16 format ..." is).
_TYPE_WORDS = (
    (r"\b(?:BFloat16|BF16)\b", "bf16"),
    (r"\b(?:Half|FP16|kHALF|HALF)\b", "fp16"),
    (r"\b(?:Float|FP32|kFLOAT|FLOAT)\b", "fp32"),
    (r"\b(?:FP8|kFP8)\b", "fp8"),
    (r"\b(?:Int8|INT8|kINT8)\b", "int8"),
    (r"\b(?:UInt8|UINT8|kUINT8)\b", "uint8"),
    (r"\b(?:Int32|INT32|kINT32)\b", "int32"),
    (r"\b(?:Int64|INT64|kINT64)\b", "int64"),
    (r"\b(?:Bool|BOOL|kBOOL)\b", "bool"),
)
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# Layers that compute nothing: bookkeeping the share should not count.
_SKIPPED_TYPES = {"NoOp", "signal", "wait"}


def type_of(text: str) -> str | None:
    """Our precision name for a type or format string of the report, or None."""
    for pattern, name in _TYPE_WORDS:
        if re.search(pattern, text):
            return name
    return None


def _tensor_type(tensor: Any) -> str | None:
    if not isinstance(tensor, dict):
        return None
    for key in ("DataType", "Datatype", "Format/Datatype", "Format/DataType"):
        value = tensor.get(key)
        if isinstance(value, str) and (found := type_of(value)):
            return found
    return None


def layer_precision(layer: dict[str, Any]) -> str:
    """The precision a layer computes in: its weights' type, else its first typed input/output.

    Weights decide for conv/deconv/matmul layers (an fp16 kernel reads fp16 weights even when
    its input is reformatted); other layers take the type of their data, as trex does.
    """
    weights = layer.get("Weights")
    if isinstance(weights, dict) and isinstance(weights.get("Type"), str):
        found = type_of(weights["Type"])
        if found:
            return found
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or []:
            found = _tensor_type(tensor)
            if found:
                return found
    return "unknown"


def _share(counts: dict[str, int]) -> float | None:
    """fp16 count / count of layers computing in a float type (None when there are none)."""
    floats = sum(counts.get(p, 0) for p in FLOAT_PRECISIONS)
    return counts.get("fp16", 0) / floats if floats else None


@dataclass(frozen=True)
class LayerReport:
    """How many engine layers compute in each precision, overall and among layers with weights.

    The fp16 share counts layers, not FLOPs: reformats and pointwise layers weigh as much as a
    convolution. The share among layers with weights (convolutions, the bulk of the compute)
    is the sharper proof that fp16 kernels were chosen.
    """

    total: int
    by_precision: dict[str, int]
    with_weights: dict[str, int]

    @property
    def fp16_share(self) -> float | None:
        return _share(self.by_precision)

    @property
    def fp16_share_with_weights(self) -> float | None:
        return _share(self.with_weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_precision": dict(sorted(self.by_precision.items())),
            "with_weights": dict(sorted(self.with_weights.items())),
            "fp16_share": self.fp16_share,
            "fp16_share_with_weights": self.fp16_share_with_weights,
        }

    def summary(self) -> str:
        def shown(share: float | None) -> str:
            return "n/a" if share is None else f"{100 * share:.0f}%"

        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.by_precision.items()))
        return (
            f"{self.total} layers ({counts}); fp16 share of float layers "
            f"{shown(self.fp16_share)}, of layers with weights "
            f"{shown(self.fp16_share_with_weights)}"
        )


def parse_layer_report(text: str) -> LayerReport:
    """Count layer precisions in the inspector's JSON; EngineError if it lacks layer details."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"engine inspector output is not JSON: {exc}") from None
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise EngineError("engine inspector output has no 'Layers' list")
    if layers and not all(isinstance(layer, dict) for layer in layers):
        raise EngineError(
            "engine inspector lists layer names only: the engine was not built with "
            "ProfilingVerbosity.DETAILED, so layer precisions cannot be read"
        )
    counts: dict[str, int] = {}
    weighted: dict[str, int] = {}
    total = 0
    for layer in layers:
        if layer.get("LayerType") in _SKIPPED_TYPES or layer.get("ParameterType") == "NoOp":
            continue
        total += 1
        precision = layer_precision(layer)
        counts[precision] = counts.get(precision, 0) + 1
        if isinstance(layer.get("Weights"), dict):
            weighted[precision] = weighted.get(precision, 0) + 1
    return LayerReport(total, counts, weighted)


# --------------------------------------------------------------------------------------------
# TensorRT before 10.12 with the FP16 builder flag: which layers stay fp32
# --------------------------------------------------------------------------------------------

# exp over logits and sums over H×W overflow in fp16 (DESIGN §5); keep them and every other
# reduction in fp32, as model_fp16.onnx does for strongly typed builds (TensorRT 10.12+). Only
# layers that compute on floats are pinned (export.tensorrt._computes_in_float): integer
# reductions and TopK, and the ArgMax, stay as they are.
_FP32_LAYER_TYPES = {"REDUCE", "SOFTMAX", "NORMALIZATION", "TOPK"}
_FP32_UNARY_OPS = {"EXP", "LOG"}


def keep_in_fp32(layer_type: str, unary_op: str | None = None) -> bool:
    """Whether a layer of this kind (TensorRT LayerType name, UnaryOperation name) computing on
    floats is pinned to fp32."""
    if layer_type in _FP32_LAYER_TYPES:
        return True
    return layer_type == "UNARY" and unary_op in _FP32_UNARY_OPS
