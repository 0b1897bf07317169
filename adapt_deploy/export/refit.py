"""Which weights a refittable engine exposes: those on-device adaptation changes.

On-device adaptation (tta/) updates BatchNorm (affine parameters and running statistics) and
may update the classifier. Nothing else moves, so only these weights need to stay refittable;
every other weight can be folded and fused freely by the builder.

BatchNorm does not survive as its own weights in the engine:

- The bundle's ONNX normally has BN already folded into the preceding conv (torch's exporter
  with optimize=True). A folded conv is the only kind that gains a bias, so "Conv with a bias"
  = "BN-folded conv or the classifier" (DeepLab-v2's ASPP classifier convs carry a bias and no
  BN). Their weight and bias initializers are the refittable set; the adapter re-folds BN into
  them and refits by ONNX initializer name (`Refitter.set_named_weights`).
- If the ONNX still has BatchNormalization nodes, TensorRT's ONNX parser folds each into
  scale/shift weights with generated names (onnx-tensorrt ModelRefitter.cpp,
  batchnormWeightRefitter), which cannot be marked individually. Then the engine is built with
  BuilderFlag.REFIT (every weight refittable) and can only be refit from a whole ONNX file
  through OnnxParserRefitter (as bench/tensorrt_check.py does): its Refitter lists the parser's
  names, not the initializers on-device adaptation writes, so adaptation (--adapt,
  tta/sync_tensorrt.check_refittable) refuses such an engine at set-up and says how to get one
  it can push into (a BN-folded export, built with REFIT_INDIVIDUAL).

TensorRT facts above are from its documentation and the onnx-tensorrt sources; the build that
uses this plan has not been run here (no TensorRT on our machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Nodes that pass an initializer through unchanged in value (a dtype cast in model_fp16.onnx).
_PASS_THROUGH = {"Cast", "Identity"}


@dataclass(frozen=True)
class RefitPlan:
    """The weights to keep refittable and how: 'individual' (REFIT_INDIVIDUAL) or 'all' (REFIT)."""

    weights: tuple[str, ...]
    mode: str
    reason: str


def plan_refit(graph: Any) -> RefitPlan:
    """The refit plan for an ONNX GraphProto (see the module docstring for the rule)."""
    initializers = {init.name for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def resolve(name: str) -> list[str]:
        """The initializer behind `name` (through casts), with the cast outputs on the way."""
        chain = []
        while name and name not in initializers:
            node = producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return []
            chain.append(name)
            name = node.input[0]
        return [name, *chain] if name else []

    weights: list[str] = []
    has_bn = False
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        conv_weight = resolve(node.input[1])
        conv_bias = resolve(node.input[2]) if len(node.input) > 2 else []
        users = consumers.get(node.output[0], [])
        bn = [u for u in users if u.op_type == "BatchNormalization"]
        if bn:
            has_bn = True
            weights += conv_weight + conv_bias
            for param in bn[0].input[1:5]:
                weights += resolve(param)
        elif conv_bias:
            weights += conv_weight + conv_bias
    unique = tuple(dict.fromkeys(weights))
    if has_bn:
        return RefitPlan(
            unique,
            "all",
            "the ONNX keeps BatchNormalization nodes, which TensorRT folds into weights with "
            "generated names that cannot be marked one by one: every weight is refittable, "
            "from the whole ONNX only (on-device adaptation cannot push into it)",
        )
    return RefitPlan(
        unique,
        "individual",
        "BN is folded into the convs: the weights and biases of BN-folded convs and of the "
        "classifier (every Conv with a bias) are refittable, nothing else",
    )


def plan_refit_file(onnx_path: Path) -> RefitPlan:
    """plan_refit for an ONNX file, reading the graph only (never the external weight data)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return plan_refit(model.graph)
