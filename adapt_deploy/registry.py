"""The pluggable parts by name: methods, dataset layouts and runtime backends, each listed once.

Config validation, CLI help and the tests read these tables, so adding a part is one entry here
plus its code. A target is a constant "package.module:attribute" written in this file and
imported only by `load`, which keeps this module torch-free and below every layer it names (a
config string is only ever looked up, never imported). Backbones are the models' own table,
`adapt_deploy.models.resnet.RESNETS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from adapt_deploy.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One registered part: its name, where it lives and what it is, in a line."""

    name: str
    target: str  # "package.module:attribute"
    summary: str


@dataclass(frozen=True)
class Registry:
    """An ordered table of entries; `what` names the kind of part in error messages."""

    what: str
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"{self.what} registry: duplicate names in {list(names)}")
        for entry in self.entries:
            module, sep, attribute = entry.target.partition(":")
            if not (module and sep and attribute):
                raise ValueError(
                    f"{self.what} {entry.name!r}: {entry.target!r} is not 'module:name'"
                )

    def names(self) -> tuple[str, ...]:
        """The registered names, in table order."""
        return tuple(entry.name for entry in self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def entry(self, name: str) -> Entry:
        """The entry called `name`; KeyError listing the names when there is none."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"unknown {self.what} {name!r}; one of {list(self.names())}")

    def check(self, name: str, key: str) -> str:
        """`name` when registered, else UserError "KEY must be one of [...], got NAME"."""
        if name not in self:
            raise UserError(f"{key} must be one of {list(self.names())}, got {name!r}")
        return name

    def summary(self, name: str) -> str:
        """The entry's one-line description (CLI help, docs)."""
        return self.entry(name).summary

    def load(self, name: str) -> Any:
        """Import the entry's module and return its attribute (a class, or a dataset Layout)."""
        module, _, attribute = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def help(self) -> str:
        """The names as a help text reads them: "a, b or c"."""
        *rest, last = self.names()
        return f"{', '.join(rest)} or {last}" if rest else last


METHODS = Registry(
    "method",
    (
        Entry("source_only", "adapt_deploy.adapt.base:Method", "segmentation loss on the source"),
        Entry(
            "adaptsegnet",
            "adapt_deploy.adapt.adaptsegnet:AdaptSegNet",
            "AdaptSegNet: output-space adversarial adaptation",
        ),
        Entry(
            "advent_minent",
            "adapt_deploy.adapt.advent:AdventMinEnt",
            "ADVENT MinEnt: entropy minimization on the target",
        ),
        Entry(
            "advent",
            "adapt_deploy.adapt.advent:Advent",
            "ADVENT AdvEnt: adversarial on self-information maps",
        ),
        Entry(
            "cbst",
            "adapt_deploy.adapt.self_training:ClassBalancedSelfTraining",
            "CBST: rounds of self-training on class-balanced pseudo-labels",
        ),
        Entry(
            "crst_mrkld",
            "adapt_deploy.adapt.self_training:ConfidenceRegularizedKLD",
            "CRST-MRKLD: CBST with a KL-to-uniform confidence regulariser",
        ),
        Entry(
            "crst_lrent",
            "adapt_deploy.adapt.self_training:ConfidenceRegularizedEntropy",
            "CRST-LRENT: CBST on entropy-regularised soft pseudo-labels",
        ),
        Entry(
            "intrada",
            "adapt_deploy.adapt.advent:IntraDomain",
            "IntraDA: AdvEnt from the easy to the hard target split (needs `rank`)",
        ),
        Entry(
            "wda_uda",
            "adapt_deploy.adapt.wda:WeakLabelAdaptation",
            "WDA with pseudo-weak labels (unsupervised)",
        ),
        Entry(
            "wda_image",
            "adapt_deploy.adapt.wda:WeakLabelImage",
            "WDA with the target's image-level labels",
        ),
        Entry(
            "wda_point",
            "adapt_deploy.adapt.wda:WeakLabelPoint",
            "WDA with image-level and point labels of the target",
        ),
        Entry(
            "selftrain",
            "adapt_deploy.adapt.selftrain:SelfTrain",
            "DACS/DAFormer: EMA teacher, ClassMix, rare-class sampling",
        ),
        Entry(
            "selftrain_image",
            "adapt_deploy.adapt.selftrain:SelfTrainImage",
            "self-training with the target's image-level labels",
        ),
        Entry(
            "selftrain_point",
            "adapt_deploy.adapt.selftrain:SelfTrainPoint",
            "self-training with image-level and point labels of the target",
        ),
        Entry(
            "labor_ppl",
            "adapt_deploy.adapt.labor:LabelOnlyIfRequired",
            "LabOR PPL: ~40 representative uncertain points per image, asked in rounds",
        ),
        Entry(
            "labor_spl",
            "adapt_deploy.adapt.labor:SegmentPixelLabelling",
            "LabOR SPL: every pixel where the two classifiers disagree, asked in rounds",
        ),
        Entry(
            "labor_random",
            "adapt_deploy.adapt.labor:RandomPixelLabelling",
            "LabOR's training with random pixels labelled (baseline)",
        ),
        Entry(
            "labor_entropy",
            "adapt_deploy.adapt.labor:EntropyPixelLabelling",
            "LabOR's training with the highest-entropy pixels labelled (baseline)",
        ),
        Entry(
            "multisource",
            "adapt_deploy.adapt.multisource:MultiSource",
            "MADAN-style multi-source: per-source and aggregate output-space discriminators",
        ),
        Entry(
            "oracle",
            "adapt_deploy.adapt.base:Oracle",
            "upper bound: segmentation loss on the labelled target",
        ),
    ),
)

DATASET_LAYOUTS = Registry(
    "dataset layout",
    (
        Entry("gta5", "adapt_deploy.data.gta5:GTA5", "GTA5: images/ and labels/, no splits"),
        Entry(
            "cityscapes",
            "adapt_deploy.data.cityscapes:CITYSCAPES",
            "Cityscapes: leftImg8bit/ and gtFine/ by split and city",
        ),
        Entry(
            "synthia",
            "adapt_deploy.data.synthia:SYNTHIA",
            "SYNTHIA-RAND-CITYSCAPES: RGB/ and GT/LABELS/, no splits",
        ),
    ),
)

BACKENDS = Registry(
    "backend",
    (
        Entry(
            "onnxruntime",
            "adapt_deploy.runtime.onnxruntime_backend:OnnxRuntimeBackend",
            "ONNX Runtime on the CPU, or CUDA with onnxruntime-gpu",
        ),
        Entry(
            "tensorrt",
            "adapt_deploy.runtime.tensorrt_backend:TensorRTBackend",
            "a TensorRT engine built for this GPU",
        ),
        Entry(
            "torch",
            "adapt_deploy.runtime.torch_backend:TorchBackend",
            "PyTorch from the bundle's checkpoint (needs torch)",
        ),
    ),
)
# What a `backend` option accepts: "auto" (runtime/selection.py picks one here) or a backend.
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS.names())
# What runs a bundle's own model files (verify; evaluate on a bundle): every backend but torch,
# which runs the checkpoint the bundle's references were made with; ONNX Runtime also by device.
ONNXRUNTIME_CUDA = "onnxruntime-cuda"  # ONNX Runtime on GPU 0 (onnxruntime-gpu)
BUNDLE_BACKENDS: tuple[str, ...] = (
    *(name for name in BACKENDS.names() if name != "torch"),
    ONNXRUNTIME_CUDA,
)
