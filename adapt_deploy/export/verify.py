"""Re-check a bundle on the target: run its samples through a backend, compare with references.

Torch-free. A backend is anything that maps an input batch to named outputs (`Runner`); ONNX
Runtime (CPU or CUDA) is built in, TensorRT comes from `adapt_deploy.export.tensorrt` (its
`engine_runner(bundle, meta, precision)`) where that is installed. Tolerances per precision are
the ones export wrote into meta.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.export.bundle import (
    BundleError,
    load_meta,
    model_path,
    sha256_file,
    verify_hashes,
)

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")
# Used when meta.json carries no tolerances (they are written by every export).
DEFAULT_TOLERANCES = {
    "fp32": {"min_label_agreement": 0.999, "max_presence_diff": 1e-3},
    "fp16": {"min_label_agreement": 0.995, "max_presence_diff": 1e-2},
}


def ort_providers(backend: str) -> list[str]:
    """ONNX Runtime execution providers for a backend name; UserError when unavailable."""
    import onnxruntime as ort

    if backend == "onnxruntime":
        return ["CPUExecutionProvider"]
    if backend == "onnxruntime-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "backend onnxruntime-cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu "
                "(and uninstall onnxruntime: they share one module)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UserError(f"--backend must be one of {list(BACKENDS)}, got {backend!r}")


def graph_input(frames: np.ndarray, input_meta: dict[str, Any]) -> np.ndarray:
    """What the graph is fed: frames as they are (NHWC uint8) or normalized NCHW float32."""
    if input_meta["layout"] == "NHWC":
        return np.ascontiguousarray(frames)
    mean = np.asarray(input_meta["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(input_meta["std"], np.float32).reshape(1, 3, 1, 1)
    x = frames.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray((x - mean) / std)


class OrtRunner:
    """One ONNX Runtime session over a model file; returns outputs by name."""

    def __init__(self, path: Path, backend: str = "onnxruntime", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: fp16 graphs on CPU log cast insertions
        self.session = ort.InferenceSession(str(path), options, providers=ort_providers(backend))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: batch})
        return dict(zip(self.output_names, outputs, strict=True))


def open_runner(bundle: Path, meta: dict[str, Any], precision: str, backend: str) -> Runner:
    """A Runner over one precision of a bundle, after checking its model files' hashes."""
    if backend == "tensorrt":
        return _tensorrt_runner(bundle, meta, precision)
    ort_providers(backend)  # a clear error before hashing large files
    verify_hashes(bundle, meta, precision)
    return OrtRunner(model_path(bundle, meta, precision), backend)


def _tensorrt_runner(bundle: Path, meta: dict[str, Any], precision: str) -> Runner:
    """The TensorRT module's runner for this machine's engine; UserError where there is none."""
    from adapt_deploy.export import tensorrt as trt_backend

    trt_backend.import_tensorrt()  # TensorRTMissingError (a UserError) with the install hint
    make = getattr(trt_backend, "engine_runner", None)
    if make is None:
        raise UserError(
            "this adapt-deploy builds TensorRT engines but cannot run them yet (the TensorRT "
            "runtime backend is a later issue); verify with --backend onnxruntime or "
            "onnxruntime-cuda"
        )
    return make(bundle, meta, precision)


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
    tolerance = tolerance or meta.get("tolerances", DEFAULT_TOLERANCES)[precision]
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
    bundle: Path, backend: str = "onnxruntime", precisions: list[str] | None = None
) -> list[VerifyReport]:
    """Hash-check and run the samples of a bundle for each precision (default: all it has)."""
    meta = load_meta(bundle)
    precisions = precisions or list(meta["precision"])
    reports = []
    for precision in precisions:
        run = open_runner(bundle, meta, precision, backend)
        reports.append(check_samples(bundle, meta, precision, run, backend))
    return reports
