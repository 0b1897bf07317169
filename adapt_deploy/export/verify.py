"""Re-check a bundle on the target: run its samples through a backend, compare with references.

Torch-free. The samples run through the runtime's own backends, adapted to a `Runner` (an input
batch in, named outputs out): ONNX Runtime on the CPU or CUDA (every output, logits included),
or the TensorRT backend where TensorRT is installed (labels and presence). Tolerances per
precision are the ones export wrote into meta.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.bundle.meta import (
    BundleError,
    load_meta,
    model_path,
    sha256_file,
    verify_hashes,
)
from adapt_deploy.errors import UserError
from adapt_deploy.registry import BUNDLE_BACKENDS, ONNXRUNTIME_CUDA
from adapt_deploy.runtime.backend import as_runner
from adapt_deploy.runtime.frames import graph_input as graph_input  # re-exported for callers
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend, require_cuda

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]
# What a target must reach against the bundle's PyTorch references (GPU kernels, TF32, fp16).
# Export writes these into meta.json; they are also the loosest tolerances verify accepts: a
# meta.json that asks for less is held to these (see `tolerance_for`). bf16 runs on the torch
# backend only (no bundle file has it): its floor is what a push of adapted weights into a bf16
# runtime is checked against. bf16 keeps 8 significant bits to fp16's 11: the torch backend in
# bf16 agrees with fp32 on 99.07-99.47% of the labels (bench/results/inference.md), under fp16's
# floor, at which pushes into a bf16 runtime were all refused (the issue-20 notes).
VERIFY_TOLERANCES = {
    "fp32": {"min_label_agreement": 0.999, "max_presence_diff": 1e-3},
    "fp16": {"min_label_agreement": 0.995, "max_presence_diff": 1e-2},
    "bf16": {"min_label_agreement": 0.99, "max_presence_diff": 2e-2},
}


def tolerance_for(meta: dict[str, Any], precision: str) -> dict[str, float]:
    """meta.json's tolerances for `precision`, never looser than VERIFY_TOLERANCES.

    verify detects accidental damage (a changed file, a broken backend); meta.json cannot vouch
    for itself, so tolerances edited to accept anything are clamped to the floor here.
    """
    floor = VERIFY_TOLERANCES.get(precision, VERIFY_TOLERANCES["fp16"])
    given = meta.get("tolerances", {}).get(precision, {}) if isinstance(meta, dict) else {}
    agreement = _number(given.get("min_label_agreement"), floor["min_label_agreement"])
    presence = _number(given.get("max_presence_diff"), floor["max_presence_diff"])
    return {
        "min_label_agreement": max(agreement, floor["min_label_agreement"]),
        "max_presence_diff": min(presence, floor["max_presence_diff"]),
    }


def _number(value: Any, default: float) -> float:
    """A finite float, or `default` for anything else (missing, text, NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    return default


def ort_device(backend: str, gpu: int = 0) -> int | None:
    """The CUDA device (`gpu`) of an ONNX Runtime backend name (None: CPU); UserError when
    unavailable, or when a GPU other than 0 is asked of the CPU backend."""
    if backend == "onnxruntime":
        if gpu != 0:
            raise UserError(
                f"--device {gpu}: backend onnxruntime runs on the CPU; choose a GPU backend "
                f"({ONNXRUNTIME_CUDA} or tensorrt)"
            )
        return None
    if backend == ONNXRUNTIME_CUDA:
        require_cuda(f"backend {ONNXRUNTIME_CUDA}")
        return gpu
    raise UserError(f"--backend must be one of {list(BUNDLE_BACKENDS)}, got {backend!r}")


def open_runner(
    bundle: Path, meta: dict[str, Any], precision: str, backend: str, gpu: int = 0
) -> Runner:
    """A Runner over one precision of a bundle on the runtime's own backend (ONNX Runtime on
    the CPU or CUDA device `gpu`, or this machine's TensorRT engine on `gpu`), after the hash
    check."""
    layout = meta["input"]["layout"]
    if gpu < 0:
        raise UserError(f"--device: expected a CUDA device index 0, 1, ..., got {gpu}")
    if backend == "tensorrt":
        from adapt_deploy.runtime.tensorrt_backend import TensorRTBackend

        return as_runner(TensorRTBackend(bundle, meta, precision, device=gpu), layout)
    device = ort_device(backend, gpu)  # a clear error before hashing large files
    verify_hashes(bundle, meta, precision)
    path = model_path(bundle, meta, precision)
    return OnnxRuntimeBackend(path, layout, meta["num_classes"], precision, device).outputs


def compare_outputs(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray]
) -> dict[str, float]:
    """Label agreement and max |Δ| of presence (and logits when both have them)."""
    for name in ("labels", "presence"):
        if name not in got:
            raise ValueError(f"the backend returned no {name!r} output (got {sorted(got)})")
        if got[name].shape != reference[name].shape:
            raise ValueError(
                f"output {name!r} has shape {got[name].shape}, expected {reference[name].shape}"
            )
    metrics = {
        "label_agreement": float(np.mean(got["labels"] == reference["labels"])),
        "presence_max_abs_diff": float(np.max(np.abs(got["presence"] - reference["presence"]))),
    }
    if "logits" in got and "logits" in reference:
        diff = np.abs(got["logits"].astype(np.float64) - reference["logits"])
        metrics["logits_max_abs_diff"] = float(diff.max())
    return metrics


def failures(metrics: dict[str, float], tolerance: dict[str, float]) -> list[str]:
    """What is outside tolerance, and by how much, in words; empty when all is well."""
    problems = []
    agreement, floor = metrics["label_agreement"], tolerance["min_label_agreement"]
    if not agreement >= floor:
        problems.append(
            f"label agreement {100 * agreement:.3f}% < {100 * floor:.2f}% "
            f"(short by {100 * (floor - agreement):.3f} points)"
        )
    diff, limit = metrics["presence_max_abs_diff"], tolerance["max_presence_diff"]
    if not diff <= limit:
        ratio = f" ({diff / limit:.1f}x the limit)" if limit > 0 else ""
        problems.append(f"presence max |diff| {diff:.2e} > {limit:.0e}{ratio}")
    return problems


@dataclass
class SampleResult:
    """One sample batch checked against its reference outputs."""

    file: str
    shape: list[int]
    metrics: dict[str, float]
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Every sample of one bundle on one backend and precision."""

    bundle: Path
    backend: str
    precision: str
    tolerance: dict[str, float]
    samples: list[SampleResult]

    @property
    def passed(self) -> bool:
        return all(not s.problems for s in self.samples)


def load_sample(bundle: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """A sample's arrays (input and reference outputs), after its hash check."""
    path = Path(bundle) / entry["file"]
    if not path.is_file():
        raise BundleError(f"{path} is missing (listed in meta.json samples)")
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        raise BundleError(f"{path}: sha256 does not match meta.json samples; the file changed")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable .npz sample: {exc}") from None
    if "input" not in arrays or "labels" not in arrays or "presence" not in arrays:
        raise BundleError(f"{path}: expected arrays input, labels, presence; got {sorted(arrays)}")
    return arrays


def check_samples(
    bundle: Path,
    meta: dict[str, Any],
    precision: str,
    run: Runner,
    backend: str = "custom",
    tolerance: dict[str, float] | None = None,
) -> VerifyReport:
    """Run every sample through `run` and compare with the stored reference outputs."""
    tolerance = tolerance or tolerance_for(meta, precision)
    results = []
    for entry in meta["samples"]:
        arrays = load_sample(bundle, entry)
        reference = {k: v for k, v in arrays.items() if k != "input"}
        try:
            metrics = compare_outputs(reference, run(arrays["input"]))
        except ValueError as exc:
            results.append(SampleResult(entry["file"], list(arrays["input"].shape), {}, [str(exc)]))
            continue
        shape = entry.get("shape", list(reference["labels"].shape))
        results.append(SampleResult(entry["file"], shape, metrics, failures(metrics, tolerance)))
    return VerifyReport(Path(bundle), backend, precision, tolerance, results)


def verify_bundle(
    bundle: Path,
    backend: str = "onnxruntime",
    precisions: list[str] | None = None,
    gpu: int = 0,
) -> list[VerifyReport]:
    """Hash-check and run the samples of a bundle for each precision (default: all it has), on
    CUDA device `gpu` for the GPU backends."""
    meta = load_meta(bundle)
    precisions = precisions or list(meta["precision"])
    reports = []
    for precision in precisions:
        run = open_runner(bundle, meta, precision, backend, gpu)
        reports.append(check_samples(bundle, meta, precision, run, backend))
    return reports
