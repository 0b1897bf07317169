"""Foreign weights for `model.init`: this project's checkpoints, official DeepLab-v2, torchvision.

A state dict is read as one of three layouts, named or detected from its keys, and its tensors are
renamed to this model's keys (`backbone.*`, `head.branches.{i}.*`) and checked for shape:

- `adapt_deploy`: this project's checkpoints (`model` + `meta`) or a bare state dict of its keys.
- `deeplab_v2`: the layout of the AdaptSegNet, ADVENT and weak-da-seg (WDA) releases and of the
  MSCOCO init `DeepLab_resnet_pretrained_init-f81d91e8.pth`: ResNet keys (`conv1.weight`,
  `layer1.0.downsample.1.running_mean`, ...) with or without a `Scale.` prefix, and ASPP
  classifiers `layer5.conv2d_list.{0..3}` / `layer6.conv2d_list.{0..3}`. In the multi-level
  models `layer6` (on layer4) is the main classifier and `layer5` (on layer3) an auxiliary one
  this model does not have; a classifier of another class count (the MSCOCO init's) is skipped,
  as the official recipe does, and the head keeps its init.
- `torchvision`: a torchvision/timm ResNet (`conv1.weight` ... `layer4.2.bn3.*`, `fc.*`): the
  backbone only; `fc` is skipped and the head keeps its init.

Stride: this ResNet, like DeepLab-v2 (Caffe), puts the stride 2 of layer2's first bottleneck on
its first 1x1 conv; torchvision (ResNet v1.5) puts it on the 3x3. The shapes are the same, so
torchvision weights load, but that block then subsamples before its 3x3: a slightly different
function from the one the weights were trained as, which fine-tuning absorbs.

Normalization: DeepLab-v2 weights expect BGR minus (104.008, 116.669, 122.679); torchvision weights
expect RGB normalized with the ImageNet mean and std (in 0-255 units). Set `input.color_order`,
`input.mean` and `input.std` to match (`input_for_format`); the summary line says which.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from adapt_deploy.config import INIT_FORMATS, InputConfig, ModelConfig
from adapt_deploy.errors import UserError

FORMATS = INIT_FORMATS[1:]  # the layouts; "auto" detects one of them
DEEPLAB_V2_INPUT = InputConfig("BGR", [104.008, 116.669, 122.679], [1.0, 1.0, 1.0])
TORCHVISION_INPUT = InputConfig("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])

# Released DeepLab-v2 ResNet-101 checkpoints, by the code that wrote them (docs/weights.md).
ARCH_PRESETS: dict[str, ModelConfig] = {
    "deeplab_v2_r101": ModelConfig("resnet101", 19, 64, True, 4),  # ADVENT, the paper
    "adaptsegnet_r101": ModelConfig("resnet101", 19, 64, True, 2),  # returns after branch 2
    "wda_r101": ModelConfig("resnet101", 19, 64, True, 2),  # weak-da-seg: AdaptSegNet's head
    "deeplab_v2_r50": ModelConfig("resnet50", 19, 64, True, 4),  # e.g. a torchvision ResNet-50
}

_BACKBONE = re.compile(r"^(conv1|bn1|layer[1-4])\.")
_CLASSIFIER = re.compile(r"^(layer[56])\.conv2d_list\.(\d+)\.(weight|bias)$")
_EXAMPLES = 3  # keys quoted per kind in a message


def arch_preset(name: str) -> ModelConfig:
    """The ModelConfig of a preset name (`--arch`); a UserError lists the presets."""
    if name not in ARCH_PRESETS:
        raise UserError(f"--arch must be one of {sorted(ARCH_PRESETS)}, got {name!r}")
    return dataclasses.replace(ARCH_PRESETS[name])


def input_for_format(fmt: str) -> InputConfig | None:
    """The pixel normalization weights of a layout expect; None for this project's (in meta)."""
    spec = {"deeplab_v2": DEEPLAB_V2_INPUT, "torchvision": TORCHVISION_INPUT}.get(fmt)
    return None if spec is None else InputConfig(spec.color_order, [*spec.mean], [*spec.std])


def state_dict_of(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, meta or None) of a loaded file: a project checkpoint, a bare state dict, or one
    wrapped under `state_dict` or `model` (as many releases are)."""
    meta = None
    for _ in range(3):  # {"state_dict": {"model": ...}} at worst
        if not isinstance(obj, dict):
            break
        if isinstance(obj.get("meta"), dict) and isinstance(obj.get("model"), dict):
            obj, meta = obj["model"], obj["meta"]
        elif isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj.get("model"), dict):
            obj = obj["model"]
        else:
            break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{source}: expected a state dict (names to tensors), got {_kind(obj)}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if len(tensors) != len(obj):
        other = [k for k in obj if k not in tensors][:_EXAMPLES]
        raise UserError(f"{source}: expected a state dict of tensors; not tensors: {other}")
    return tensors, meta


def _kind(obj: Any) -> str:
    return "an empty dict" if obj == {} else type(obj).__name__


def _strip(keys: list[str], prefix: str) -> bool:
    return bool(keys) and all(k.startswith(prefix) for k in keys)


def detect_format(keys: list[str]) -> tuple[str, str]:
    """(layout, why) from the keys (after any `module.` prefix); UserError when none fits."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith(("backbone.", "head.")) for k in keys):
        return "adapt_deploy", "keys backbone.*/head.*"
    if any(k.startswith("Scale.") for k in keys):
        return "deeplab_v2", "keys prefixed Scale."
    if any(_CLASSIFIER.match(k) for k in keys):
        return "deeplab_v2", "ASPP classifier layer5/layer6.conv2d_list"
    if "fc.weight" in keys:
        return "torchvision", "a ResNet with an fc layer"
    if any(_BACKBONE.match(k) for k in keys):
        return "deeplab_v2", (
            "a bare ResNet backbone, no classifier and no fc: deeplab_v2 and torchvision name it "
            "alike and map it identically"
        )
    raise UserError(
        f"unrecognized weights: keys such as {keys[:_EXAMPLES]} fit none of the formats "
        f"{list(FORMATS)} (docs/weights.md); name one with model.init_format / --init-format"
    )


@dataclass
class MatchedWeights:
    """Weights keyed as the model (only those that load, shapes checked) and what was left out."""

    format: str
    why: str  # how the format was chosen
    weights: dict[str, torch.Tensor]
    skipped: list[str] = field(default_factory=list)  # one line per reason, for the summary
    head_loaded: bool = False
    meta: dict[str, Any] | None = None  # a project checkpoint's meta

    def summary(self, source: str) -> str:
        """One line: the format, how many tensors loaded, what was skipped and why, and the
        input normalization the weights expect."""
        line = f"{source}: format {self.format} ({self.why}), {len(self.weights)} tensors loaded"
        if self.skipped:
            line += "; skipped: " + "; ".join(self.skipped)
        if self.format == "deeplab_v2":
            line += (
                "; these weights expect BGR minus mean 104.008/116.669/122.679, std 1 "
                "(input.color_order=BGR, input.mean=[104.008, 116.669, 122.679], "
                "input.std=[1, 1, 1]: the defaults)"
            )
        elif self.format == "torchvision":
            line += (
                "; these weights expect RGB with the ImageNet mean/std: set "
                "input.color_order=RGB input.mean=[123.675, 116.28, 103.53] "
                "input.std=[58.395, 57.12, 57.375]; layer2's first block strides on its 1x1 "
                "here, on its 3x3 in torchvision (docs/weights.md)"
            )
        return line


def _to_model_keys(
    state: dict[str, torch.Tensor], fmt: str, num_classes: int
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str], bool]:
    """({our key: (file key, tensor)}, skip notes, whether a classifier was mapped)."""
    if _strip(list(state), "module."):  # DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if fmt == "adapt_deploy":
        has_head = any(k.startswith("head.") for k in state)
        return {k: (k, v) for k, v in state.items()}, [], has_head
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    notes: list[str] = []
    classifiers: dict[str, dict[str, torch.Tensor]] = {}
    fc = []
    for key, value in state.items():
        name = key.removeprefix("Scale.") if fmt == "deeplab_v2" else key
        hit = _CLASSIFIER.match(name)
        if hit and fmt == "deeplab_v2":
            classifiers.setdefault(hit.group(1), {})[key] = value
        elif fmt == "torchvision" and name.startswith("fc."):
            fc.append(key)
        else:  # the backbone, or a key that will be reported as unexpected
            mapped[f"backbone.{name}"] = (key, value)
    if fc:
        notes.append(f"{', '.join(fc)} (the ImageNet classifier; the head keeps its init)")
    main = "layer6" if "layer6" in classifiers else "layer5"
    if "layer6" in classifiers and "layer5" in classifiers:
        n = len(classifiers["layer5"])
        notes.append(f"layer5 ({n} tensors: a multi-level model's auxiliary classifier on layer3)")
    has_head = False
    if main in classifiers:
        weights = classifiers[main]
        counts = {v.shape[0] for k, v in weights.items() if k.endswith("weight")}
        if counts and counts != {num_classes}:
            notes.append(
                f"{main} (a classifier for {sorted(counts)[0]} classes, the model has "
                f"{num_classes}: the head keeps its init)"
            )
        else:
            has_head = True
            for key, value in weights.items():
                _, index, kind = _CLASSIFIER.match(key.removeprefix("Scale.")).groups()
                mapped[f"head.branches.{index}.{kind}"] = (key, value)
    elif fmt == "deeplab_v2":
        notes.append("no classifier in the file (the head keeps its init)")
    return mapped, notes, has_head


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _examples(items: list[str]) -> str:
    more = f", ... ({len(items) - _EXAMPLES} more)" if len(items) > _EXAMPLES else ""
    return ", ".join(items[:_EXAMPLES]) + more


def match_weights(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    arch: ModelConfig,
    fmt: str = "auto",
    strict: bool = True,
    source: str = "weights",
) -> MatchedWeights:
    """Rename `state` (a file's state dict) to the keys of `expected` (the state dict of the model
    `arch` builds) and check the shapes. Strict: any mismatch left after the deliberate skips
    (fc, an auxiliary or other-class classifier, BN counters old files lack) is a UserError naming
    the format and the first keys and shapes that differ; otherwise those are skipped and listed."""
    if fmt not in INIT_FORMATS:
        raise UserError(f"{source}: format must be one of {list(INIT_FORMATS)}, got {fmt!r}")
    why = "as named"
    if fmt == "auto":
        try:
            fmt, why = detect_format(list(state))
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
    mapped, notes, has_head = _to_model_keys(state, fmt, arch.num_classes)
    loaded, shapes, unexpected = {}, [], []
    for key, (file_key, value) in mapped.items():
        if key not in expected:
            unexpected.append(file_key)
        elif value.shape != expected[key].shape:
            shapes.append(f"{file_key}: file {_shape(value)} vs model {_shape(expected[key])}")
        else:
            loaded[key] = value
    missing = [
        k
        for k in expected
        if k not in mapped
        and not k.endswith("num_batches_tracked")  # files of old PyTorch versions lack them
        and not (k.startswith("head.") and not has_head)  # no classifier: the head keeps its init
    ]
    problems = [
        (shapes, "with another shape"),
        (missing, "missing from the file"),
        (unexpected, "in the file but not in the model"),
    ]
    if strict and (shapes or missing or unexpected):
        listed = "; ".join(
            f"{len(keys)} {kind} (e.g. {_examples(keys)})" for keys, kind in problems if keys
        )
        hint = ""
        if any(k.removeprefix("module.").startswith("conv1.0.") for k in unexpected):
            hint = " (a deep stem, as timm's resnet*d: this ResNet has one 7x7 conv1)"
        raise UserError(
            f"{source}: {fmt} weights ({why}) do not match the architecture ({arch.backbone}, "
            f"width {arch.width}, {arch.num_classes} classes): {listed}{hint}. To load what "
            "matches: model.init_strict=false (convert-weights --no-strict)"
        )
    for keys, kind in problems:
        if keys:
            notes.append(f"{len(keys)} {kind} (e.g. {_examples(keys)})")
    head_loaded = all(k in loaded for k in expected if k.startswith("head."))
    return MatchedWeights(fmt, why, loaded, notes, head_loaded)
