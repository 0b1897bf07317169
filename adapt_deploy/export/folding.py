"""BatchNorm folding of a PyTorch DeepLab onto the initializers of its exported ONNX graph.

The bundle's graphs have every BatchNorm folded into the conv before it (torch's exporter), so
pushing adapted weights to a runtime means re-folding: W' = W·γ/√(var+eps) and
b' = β + (b − μ)·γ/√(var+eps) per conv, then writing W', b' into the conv's initializers, which
model_fp16.onnx holds in fp16 (`name__fp16`, our precision pass). Which BN follows which conv
is found by running the model (tensor identity in forward hooks), and which initializer belongs
to which conv is found once, at set-up, by value: the template (the checkpoint the bundle was
exported from) folded must reproduce every conv initializer of the file, else the bundle and
its checkpoint do not match and nothing could be pushed safely.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from adapt_deploy.errors import UserError

FP16_MAX = float(np.finfo(np.float16).max)
_PASS_THROUGH = {"Cast", "Identity"}  # nodes that hand an initializer to a conv unchanged
Folded = dict[str, tuple[np.ndarray, np.ndarray | None]]  # conv name -> (weight, bias)


def conv_bn_pairs(model: nn.Module, size: int = 33) -> dict[str, str | None]:
    """{conv name: name of the BatchNorm2d that consumes its output, or None} for every Conv2d
    that runs in the forward pass, in execution order. Found by running the model (eval, no
    grad) on a small input and matching BN inputs to conv outputs by tensor identity."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("the model has no Conv2d layer: nothing to fold")
    first = modules[convs[0]]
    assert isinstance(first, nn.Conv2d)
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive: ids stay unique
    pairs: dict[str, str | None] = {}
    unpaired_bn: list[str] = []

    def conv_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            outputs[id(output)] = (name, output)
            pairs.setdefault(name, None)

        return hook

    def bn_hook(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            found = outputs.get(id(inputs[0]))
            if found is None or found[1] is not inputs[0]:
                unpaired_bn.append(name)
            elif pairs[found[0]] not in (None, name):
                raise UserError(f"conv {found[0]} feeds two BatchNorms: cannot fold it")
            else:
                pairs[found[0]] = name

        return hook

    handles = []
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, first.in_channels, size, size, dtype=param.dtype).to(param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if unpaired_bn:
        raise UserError(
            f"BatchNorm {unpaired_bn[0]} does not directly follow a conv, so it cannot be folded "
            "into one and adapted weights could not reach the runtime"
        )
    return pairs


def fold(model: nn.Module, pairs: dict[str, str | None]) -> Folded:
    """{conv: (W', b')} as new float32 numpy arrays (copies: the model may keep training).
    b' is None only for a conv without bias and without BN."""
    modules = dict(model.named_modules())
    folded: Folded = {}
    with torch.no_grad():
        for conv_name, bn_name in pairs.items():
            conv = modules[conv_name]
            assert isinstance(conv, nn.Conv2d)
            weight = conv.weight.detach().float()
            bias = None if conv.bias is None else conv.bias.detach().float()
            if bn_name is not None:
                bn = modules[bn_name]
                assert isinstance(bn, nn.BatchNorm2d)
                if bn.running_mean is None or bn.running_var is None:
                    raise UserError(f"{bn_name} keeps no running statistics: cannot fold it")
                scale = torch.rsqrt(bn.running_var.float() + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.float()
                mean = bn.running_mean.float()
                shift = -mean if bias is None else bias - mean
                bias = shift * scale + (0.0 if bn.bias is None else bn.bias.float())
                weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            folded[conv_name] = (
                weight.cpu().numpy().copy(),
                None if bias is None else bias.cpu().numpy().copy(),
            )
    return folded


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in an initializer's element type (fp16 clipped to its range, as export does)."""
    if dtype == np.float16:
        values = np.clip(values, -FP16_MAX, FP16_MAX)
    return np.ascontiguousarray(values.astype(dtype, copy=False))


def matches(stored: np.ndarray, folded: np.ndarray) -> bool:
    """Whether an initializer holds `folded` up to rounding: fp32 tightly (the exporter's fold
    rounds differently by an ulp or so), fp16 to two ulps (it rounds twice, fp32 then fp16)."""
    if stored.shape != folded.shape:
        return False
    got = stored.astype(np.float32)
    if stored.dtype == np.float16:
        ref = np.clip(folded, -FP16_MAX, FP16_MAX)
        return bool(np.all(np.abs(got - ref) <= 2.0**-9 * np.abs(ref) + 2.0**-23))
    scale = float(np.max(np.abs(folded))) if folded.size else 0.0
    return bool(np.allclose(got, folded, rtol=1e-5, atol=1e-6 * scale))


@dataclass(frozen=True)
class Slot:
    """One conv input of the graph: input `index` (1: weight, 2: bias) of the graph's node
    number `node` reads initializer `initializer` (element type `dtype`; the conv reads it as
    `read_as`, through a Cast if they differ), which holds conv `conv`'s folded `role`."""

    node: int
    index: int
    initializer: str
    dtype: np.dtype
    read_as: np.dtype
    conv: str
    role: str  # "weight" | "bias"


@dataclass
class FoldingMap:
    """Which ONNX initializer receives which folded conv tensor; see `build_folding_map`."""

    pairs: dict[str, str | None]
    slots: list[Slot]
    # Conv nodes (graph position -> conv) the exporter left without a bias because it was all
    # zeros: their bias can only be pushed into a rewritten graph (`own_initializers`).
    biasless: dict[int, str] = field(default_factory=dict)

    def shared(self) -> dict[str, list[Slot]]:
        """Initializers that several different conv tensors read (the exporter merges equal
        initializers, e.g. the ASPP branches' biases): adaptation can make them differ."""
        by_name: dict[str, list[Slot]] = {}
        for slot in self.slots:
            by_name.setdefault(slot.initializer, []).append(slot)
        return {
            name: slots
            for name, slots in by_name.items()
            if len({(s.conv, s.role) for s in slots}) > 1
        }

    def initializers(self, model: nn.Module) -> dict[str, np.ndarray]:
        """{initializer name: new value in its element type} from `model`'s current state.
        ValueError when conv tensors sharing one initializer no longer agree, or a conv
        without a bias in the graph now needs one."""
        return self.values(fold(model, self.pairs))

    def values(self, folded: Folded) -> dict[str, np.ndarray]:
        """`initializers` from already folded tensors."""
        for conv in self.biasless.values():
            bias = folded[conv][1]
            if bias is not None and np.any(bias):
                raise ValueError(
                    f"{conv} has no bias in the graph (the exporter dropped it while it was all "
                    "zeros), but its folded bias is no longer zero"
                )
        out: dict[str, np.ndarray] = {}
        source: dict[str, Slot] = {}
        for slot in self.slots:
            value = _tensor(folded, slot)
            array = cast_like(value, slot.dtype)
            if slot.initializer in out:
                if not np.array_equal(out[slot.initializer], array):
                    first = source[slot.initializer]
                    raise ValueError(
                        f"initializer {slot.initializer} is shared by {first.conv} "
                        f"({first.role}) and {slot.conv} ({slot.role}), which now differ"
                    )
                continue
            out[slot.initializer] = array
            source[slot.initializer] = slot
        return out


def _tensor(folded: Folded, slot: Slot) -> np.ndarray:
    weight, bias = folded[slot.conv]
    if slot.role == "weight":
        return weight
    return bias if bias is not None else np.zeros(weight.shape[0], np.float32)


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _resolve(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[str, np.dtype] | None:
    """The initializer behind a conv input (through Cast/Identity nodes) and the element type
    the conv reads it as; None when the input is computed."""
    read_as: int | None = None
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        if node.op_type == "Cast" and read_as is None:
            read_as = next(a.i for a in node.attribute if a.name == "to")
        name = node.input[0]
    return name, _np_dtype(read_as if read_as is not None else inits[name].data_type)


def _name_hint(initializer: str, convs: Iterable[str]) -> str | None:
    """The conv whose dotted name the initializer's name contains (longest such), a hint only."""
    found = [c for c in convs if f".{c}." in f".{initializer}"]
    return max(found, key=len) if found else None


def build_folding_map(template: nn.Module, graph: onnx.ModelProto | Path) -> FoldingMap:
    """Map every conv of `template` that runs to the initializers of its Conv node(s), and check
    it by value: folding the template must reproduce each of them (fp32 tightly, fp16 up to its
    rounding), every conv must be found, and every Conv node must be accounted for. UserError
    otherwise: the bundle's ONNX does not match its checkpoint."""
    where = str(graph) if isinstance(graph, Path) else "the bundle's ONNX"
    proto = onnx.load(str(graph)) if isinstance(graph, Path) else graph
    pairs = conv_bn_pairs(template)
    folded = fold(template, pairs)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    arrays: dict[str, np.ndarray] = {}
    slots: list[Slot] = []
    biasless: dict[int, str] = {}
    unmatched: list[str] = []
    for position, node in enumerate(proto.graph.node):
        if node.op_type != "Conv":
            continue
        label = node.name or f"Conv #{position}"
        resolved = [_resolve(n, inits, producers) if n else None for n in node.input[1:3]]
        if resolved[0] is None:
            unmatched.append(f"{label} (its weight is not an initializer)")
            continue
        weight_name = resolved[0][0]
        for name, _ in (r for r in resolved if r is not None):
            if name not in arrays:
                arrays[name] = numpy_helper.to_array(inits[name])
        conv = _match_conv(weight_name, arrays[weight_name], folded)
        if conv is None:
            unmatched.append(f"{label} (weight {weight_name})")
            continue
        bias = folded[conv][1]
        if len(resolved) < 2 or resolved[1] is None:
            if bias is not None and np.any(bias):
                unmatched.append(f"{label} (no bias input, but {conv}'s folded bias is not 0)")
                continue
            if bias is not None:
                biasless[position] = conv
        else:
            bias_name = resolved[1][0]
            expected = bias if bias is not None else np.zeros(folded[conv][0].shape[0], np.float32)
            if not matches(arrays[bias_name], expected):
                unmatched.append(f"{label} (bias {bias_name} is not {conv}'s folded bias)")
                continue
        for index, found in enumerate(resolved, start=1):
            if found is not None:
                name, read_as = found
                role = "weight" if index == 1 else "bias"
                dtype = arrays[name].dtype
                slots.append(Slot(position, index, name, dtype, read_as, conv, role))
    missing = [c for c in pairs if c not in {s.conv for s in slots}]
    if unmatched or missing:
        problems = [f"Conv nodes without a matching conv: {unmatched[:3]}"] if unmatched else []
        if missing:
            problems.append(f"convs of the checkpoint not found in the graph: {missing[:3]}")
        raise UserError(
            f"{where} does not match its checkpoint (folding the checkpoint's BatchNorms into "
            f"its convs does not reproduce the graph's weights): {'; '.join(problems)}. Pass the "
            "checkpoint the bundle was exported from, or re-export the bundle"
        )
    return FoldingMap(pairs, slots, biasless)


def _match_conv(name: str, stored: np.ndarray, folded: Folded) -> str | None:
    """The conv whose folded weight the initializer holds: the name hint first, then by value."""
    hint = _name_hint(name, folded)
    if hint is not None and matches(stored, folded[hint][0]):
        return hint
    for conv, (weight, _) in folded.items():
        if conv != hint and weight.shape == stored.shape and matches(stored, weight):
            return conv
    return None


def own_initializers(proto: onnx.ModelProto, fmap: FoldingMap) -> FoldingMap:
    """Rewrite `proto` in place so that every conv tensor adaptation changes has an initializer
    of its own: initializers shared between different convs are split, and convs left without a
    bias get a zero one. Returns the map of the rewritten graph, whose values never conflict;
    for runtimes that load a rewritten graph (ONNX Runtime), not for a built engine."""
    nodes = proto.graph.node
    inits = {t.name: t for t in proto.graph.initializer}
    taken = set(inits) | {o for n in nodes for o in n.output}

    def add(slot: Slot, value: np.ndarray) -> Slot:
        name = f"{slot.conv}.{slot.role}__sync"
        while name in taken:
            name += "_"
        taken.add(name)
        proto.graph.initializer.append(numpy_helper.from_array(value, name))
        inputs = nodes[slot.node].input
        if len(inputs) <= slot.index:
            inputs.append(name)
        else:
            inputs[slot.index] = name  # read directly, no Cast between
        return Slot(slot.node, slot.index, name, slot.read_as, slot.read_as, slot.conv, slot.role)

    renamed: dict[Slot, Slot] = {}
    for name, slots in fmap.shared().items():
        first = (slots[0].conv, slots[0].role)
        for slot in slots:
            if (slot.conv, slot.role) != first:
                value = cast_like(numpy_helper.to_array(inits[name]), slot.read_as)
                renamed[slot] = add(slot, value)
    slots = [renamed.get(s, s) for s in fmap.slots]
    for position, conv in fmap.biasless.items():
        weight = next(s for s in slots if s.node == position and s.index == 1)
        channels = int(inits[weight.initializer].dims[0])
        bias = Slot(position, 2, "", weight.read_as, weight.read_as, conv, "bias")
        slots.append(add(bias, np.zeros(channels, weight.read_as)))
    return FoldingMap(fmap.pairs, slots)
