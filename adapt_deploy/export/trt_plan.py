"""What a TensorRT build will do, decided from the bundle and a version string (no tensorrt).

- TensorRT 10.12 and later build strongly typed: 10.12 deprecated weak typing (BuilderFlag.FP16,
  ILayer.precision, ILayer.set_output_type; its release notes, "Weak typing APIs deprecated")
  and 11 removed it. An fp16 engine is built from model_fp16.onnx (mixed precision, reductions
  in fp32) and an fp32 one from model.onnx; 10.12-10.x create the network with the
  STRONGLY_TYPED flag, 11 networks are always strongly typed.
- TensorRT 10.0-10.11 take the FP16 builder flag on model.onnx, with reductions, softmax and
  exp/log pinned to fp32 (OBEY_PRECISION_CONSTRAINTS) as model_fp16.onnx keeps them.
- The optimization profile is the bundle's shape ranges in the input's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt_deploy.bundle.engine_files import EngineError, parse_version
from adapt_deploy.bundle.meta import BundleError, model_path, verify_hashes
from adapt_deploy.export.refit import RefitPlan, plan_refit_file

MIN_MAJOR = 10
STRONG_TYPING_SINCE = (10, 12)  # (major, minor) from which builds are strongly typed
STRONG_TYPING_MAJOR = 11  # every network is strongly typed: no creation flag needed


@dataclass(frozen=True)
class BuildMode:
    """How one engine is built with one TensorRT version."""

    precision: str  # the engine's: "fp32" | "fp16"
    model: str  # meta.json models key of the ONNX to parse: "fp32" | "fp16"
    strongly_typed: bool  # network created strongly typed (types come from the ONNX)
    fp16_flag: bool  # BuilderFlag.FP16 (TensorRT before 10.12 only)
    pin_fp32: bool  # reductions/softmax/exp/log forced to fp32 (with the FP16 flag)

    @property
    def fp16_source(self) -> str:
        if self.precision == "fp32":
            return "none"
        return "builder FP16 flag" if self.fp16_flag else "strongly typed model_fp16.onnx"


def strongly_typed(tensorrt_version: str) -> bool:
    """Whether this TensorRT builds strongly typed (10.12 and later; see the module docstring)."""
    return parse_version(tensorrt_version)[:2] >= STRONG_TYPING_SINCE


def build_mode(tensorrt_version: str, precision: str) -> BuildMode:
    """The code path for `precision` under `tensorrt_version` (before 10.12, or 10.12 and later)."""
    major = parse_version(tensorrt_version)[0]
    if major < MIN_MAJOR:
        raise EngineError(
            f"TensorRT {tensorrt_version} is too old: adapt-deploy builds engines with "
            f"TensorRT {MIN_MAJOR} or later; install a newer TensorRT on the target"
        )
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"unknown precision {precision!r} (expected 'fp32' or 'fp16')")
    if strongly_typed(tensorrt_version):
        return BuildMode(precision, precision, True, False, False)
    fp16 = precision == "fp16"
    return BuildMode(precision, "fp32", False, fp16, fp16)


def profile_shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{"min", "opt", "max"} input shapes from meta.json's [N, H, W] ranges and input layout.

    NHWC (uint8 frames) gives (N, H, W, 3), NCHW gives (N, 3, H, W).
    """
    layout = meta["input"]["layout"]
    channels = int(meta["input"].get("channels", 3))
    shapes = {}
    for key in ("min", "opt", "max"):
        n, h, w = meta["shapes"][key]
        if layout == "NHWC":
            shapes[key] = (n, h, w, channels)
        elif layout == "NCHW":
            shapes[key] = (n, channels, h, w)
        else:
            raise BundleError(
                f"meta.json: field 'input.layout': expected NHWC or NCHW, got {layout!r}"
            )
    return shapes


@dataclass(frozen=True)
class BuildInputs:
    """Everything one engine build reads, checked before TensorRT is touched."""

    mode: BuildMode
    onnx_path: Path
    onnx_sha256: str
    input_name: str
    shapes: dict[str, tuple[int, ...]]
    refit: RefitPlan | None


def prepare_build(
    bundle: Path, meta: dict[str, Any], precision: str, tensorrt_version: str, refit: bool
) -> BuildInputs:
    """Pick the ONNX for this precision and TensorRT, verify its hashes, derive the profile."""
    mode = build_mode(tensorrt_version, precision)
    if mode.model not in meta["models"]:
        raise BundleError(
            f"{Path(bundle) / 'meta.json'}: TensorRT {tensorrt_version} builds {precision} "
            f"engines from the bundle's {mode.model} ONNX model (field 'models.{mode.model}'; "
            "TensorRT 10.12 and later build strongly typed), which this bundle lacks (it has "
            f"{meta['precision']}); re-export with adapt-deploy export --fp16"
        )
    onnx_path = model_path(bundle, meta, mode.model)
    verify_hashes(bundle, meta, mode.model)
    return BuildInputs(
        mode=mode,
        onnx_path=onnx_path,
        onnx_sha256=meta["models"][mode.model]["sha256"],
        input_name=meta["input"]["name"],
        shapes=profile_shapes(meta),
        refit=plan_refit_file(onnx_path) if refit else None,
    )
