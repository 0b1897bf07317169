"""Mixed fp16: convolutions in half precision, everything numerically delicate kept in fp32.

An allow-list pass over the exported graph (BatchNorm already folded into the convolutions):
only Conv, Relu, Add and MaxPool on float tensors run in fp16, the bulk of the compute. The
in-graph normalization, Resize, ArgMax, ReduceLogSumExp, Softmax, Sigmoid and every other
reduction stay fp32 (LogSumExp over H×W overflows in fp16), so are the graph's inputs and outputs.
Casts are inserted where the two regions meet, one per tensor. Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_OPS = frozenset({"Conv", "Relu", "Add", "MaxPool"})
_FP16_MAX = float(np.finfo(np.float16).max)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (inputs, initializers, inferred values, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    return types


def _runs_in_fp16(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """An allow-listed op whose every input and output is a known fp32 tensor."""
    names = [n for n in (*node.input, *node.output) if n]
    return node.op_type in FP16_OPS and all(types.get(n) == TensorProto.FLOAT for n in names)


def convert_to_mixed_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with FP16_OPS in fp16 and fp32 everywhere else, inputs/outputs fp32."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    types = _float_types(model)
    graph = model.graph
    half = [_runs_in_fp16(n, types) for n in graph.node]
    half_tensors = {o for n, h in zip(graph.node, half, strict=True) if h for o in n.output}
    # Graph outputs produced in fp16 are renamed; a Cast right after restores the fp32 name.
    renamed = {o.name: f"{o.name}__fp16" for o in graph.output if o.name in half_tensors}
    initializers = {t.name: t for t in graph.initializer}
    new_inits: list[onnx.TensorProto] = []
    casts: dict[tuple[str, int], str] = {}  # (tensor, target type) -> cast tensor
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            suffix = "__fp16" if to == TensorProto.FLOAT16 else "__fp32"
            casts[(name, to)] = dst = f"{name}{suffix}"
            if name in initializers and to == TensorProto.FLOAT16:
                values = numpy_helper.to_array(initializers[name])
                values = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
                new_inits.append(numpy_helper.from_array(values, dst))
            else:
                nodes.append(_cast(name, dst, to))
        return casts[(name, to)]

    def as_fp16(name: str) -> str:
        if name in renamed:
            return renamed[name]
        return name if name in half_tensors else cast(name, TensorProto.FLOAT16)

    def as_fp32(name: str) -> str:
        return cast(name, TensorProto.FLOAT) if name in half_tensors - renamed.keys() else name

    for node, in_fp16 in zip(graph.node, half, strict=True):
        node = _copy(node)
        if in_fp16:
            _rewire(node.input, as_fp16)
            outputs = [o for o in node.output if o in renamed]
            _rewire(node.output, lambda n: renamed.get(n, n))
            nodes.append(node)
            nodes.extend(_cast(renamed[o], o, TensorProto.FLOAT) for o in outputs)
        else:
            _rewire(node.input, as_fp32)
            nodes.append(node)

    used = {i for n in nodes for i in n.input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend([t for t in graph.initializer if t.name in used] + new_inits)
    del out.graph.value_info[:]  # stale element types; re-inferred below
    return onnx.shape_inference.infer_shapes(out, strict_mode=True)


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], name=f"cast_{dst}", to=to)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _rewire(names, mapping) -> None:
    """Replace each non-empty name in a repeated field through `mapping` (in place)."""
    for i, name in enumerate(list(names)):
        if name:
            names[i] = mapping(name)


def node_dtypes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """{op type: element types of its first input, one per node} — to check what runs in fp16."""
    types = _float_types(model)
    result: dict[str, list[int]] = {}
    for node in model.graph.node:
        result.setdefault(node.op_type, []).append(types.get(node.input[0], 0))
    return result
