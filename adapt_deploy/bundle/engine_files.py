"""TensorRT engine files in a bundle: names, sidecar records, and the compatibility check.

A TensorRT plan runs only on the TensorRT version and the GPU model that built it. Every plan
in `bundle/engines/` is therefore named by both and stored beside a JSON sidecar recording
them (plus precision, source ONNX hash, profile shapes, fp16 layer share, refit state), e.g.

    engines/model_fp16.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.plan
    engines/model_fp16.trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90.json

Everything here is plain Python (no tensorrt, no torch), so it is tested on any machine.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapt_deploy.atomic import atomic_write
from adapt_deploy.errors import UserError

ENGINES_DIR = "engines"
PLAN_SUFFIX = ".plan"
RECORD_SCHEMA = 1
REBUILD = "adapt-deploy build-engine {bundle}"


class EngineError(UserError):
    """An engine file or sidecar that is missing, damaged, stale, or not for this machine."""


class EngineMismatchError(EngineError):
    """An engine built for another TensorRT version or GPU than the one at hand."""


@dataclass(frozen=True)
class Platform:
    """What a plan is tied to: the TensorRT version and the GPU model (name, compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def describe(self) -> str:
        return (
            f"TensorRT {self.tensorrt_version} on {self.gpu_name} "
            f"(compute capability {self.compute_capability})"
        )


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version string such as '10.8.0.43'."""
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        raise EngineError(f"cannot read a TensorRT version from {version!r} (expected e.g. 10.8.0)")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def trt_tag(version: str) -> str:
    """'trt10.8.0' for '10.8.0.43': the part of the version that names a plan file."""
    return "trt{}.{}.{}".format(*parse_version(version))


def gpu_slug(name: str) -> str:
    """A file-name-safe GPU name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3'."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    return slug or "unknown-GPU"


def sm_tag(compute_capability: str) -> str:
    """'sm90' for compute capability '9.0', 'sm120' for '12.0'."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", compute_capability)
    if match is None:
        raise EngineError(
            f"cannot read a compute capability from {compute_capability!r} (expected e.g. 8.6)"
        )
    return f"sm{match.group(1)}{match.group(2)}"


def platform_tag(platform: Platform) -> str:
    """'trt10.8.0_NVIDIA-H100-80GB-HBM3_sm90': what ties a plan (and a timing cache) to a GPU."""
    return "_".join(
        (
            trt_tag(platform.tensorrt_version),
            gpu_slug(platform.gpu_name),
            sm_tag(platform.compute_capability),
        )
    )


def engine_stem(precision: str) -> str:
    """'model' for fp32 and 'model_fp16' for fp16, matching the bundle's ONNX file names."""
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"unknown engine precision {precision!r} (expected 'fp32' or 'fp16')")
    return "model" if precision == "fp32" else "model_fp16"


def engine_path(bundle: Path, precision: str, platform: Platform) -> Path:
    """Where the plan for this precision and machine lives: bundle/engines/<stem>.<tag>.plan."""
    name = f"{engine_stem(precision)}.{platform_tag(platform)}{PLAN_SUFFIX}"
    return Path(bundle) / ENGINES_DIR / name


def record_path(plan: Path) -> Path:
    """The sidecar JSON of a plan: the same name with .json for .plan."""
    return plan.with_suffix(".json")


def layer_report_path(plan: Path) -> Path:
    """The engine inspector's full JSON layer report, kept beside the plan."""
    return plan.with_name(plan.name.removesuffix(PLAN_SUFFIX) + ".layers.json")


def timing_cache_path(bundle: Path, platform: Platform, override: Path | None = None) -> Path:
    """The persisted builder timing cache: `override`, or one per TensorRT version and GPU.

    Timing caches, like plans, are only valid for the TensorRT version and GPU that wrote them,
    so the default name carries the same tag and caches of different machines never collide.
    """
    if override is not None:
        return Path(override)
    return Path(bundle) / ENGINES_DIR / f"timing.{platform_tag(platform)}.cache"


def read_timing_cache(path: Path) -> bytes:
    """The cache's bytes, or b'' (an empty cache) when there is none yet."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""


# --------------------------------------------------------------------------------------------
# Sidecar records
# --------------------------------------------------------------------------------------------


@dataclass
class EngineRecord:
    """Everything the sidecar JSON of one plan says about it."""

    engine: str  # plan file name
    engine_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp32" | "fp16"
    fp16_source: str  # "none" | "strongly typed model_fp16.onnx" | "builder FP16 flag"
    onnx_model: str  # the meta.json models key the plan was built from: "fp32" | "fp16"
    onnx_file: str
    onnx_sha256: str
    input_name: str
    profile: dict[str, list[int]]  # {"min", "opt", "max"}: full input shapes
    refittable: bool
    # "none" | "individual" (REFIT_INDIVIDUAL: refit by ONNX initializer name, what --adapt
    # needs) | "all" (REFIT: every weight, names from TensorRT's parser; refit from the ONNX)
    refit_mode: str
    refittable_weights: list[str]
    layers: dict[str, Any]  # {"total", "by_precision", "fp16_share"}
    build_seconds: float
    built_at: str
    adapt_deploy_version: str
    schema_version: int = RECORD_SCHEMA
    notes: list[str] = field(default_factory=list)

    @property
    def platform(self) -> Platform:
        return Platform(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> EngineRecord:
        """Validate a parsed sidecar; EngineError naming the file and the field otherwise."""
        if not isinstance(data, dict):
            raise EngineError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EngineError(f"{where}: field 'schema_version': expected a positive integer")
        if version > RECORD_SCHEMA:
            raise EngineError(
                f"{where}: schema_version {version} is newer than this adapt-deploy reads "
                f"(up to {RECORD_SCHEMA}); upgrade adapt-deploy"
            )
        kwargs = {}
        for name, kind in _FIELD_TYPES.items():
            if name not in data:
                if name == "notes":
                    continue
                raise EngineError(f"{where}: missing field {name!r}")
            value = data[name]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                expected = getattr(kind, "__name__", str(kind))
                raise EngineError(
                    f"{where}: field {name!r}: expected {expected}, got {type(value).__name__}"
                )
            kwargs[name] = value
        record = cls(**kwargs)
        if record.precision not in ("fp32", "fp16"):
            raise EngineError(f"{where}: field 'precision': expected 'fp32' or 'fp16'")
        return record


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "engine": str,
    "engine_sha256": str,
    "tensorrt_version": str,
    "gpu_name": str,
    "compute_capability": str,
    "precision": str,
    "fp16_source": str,
    "onnx_model": str,
    "onnx_file": str,
    "onnx_sha256": str,
    "input_name": str,
    "profile": dict,
    "refittable": bool,
    "refit_mode": str,
    "refittable_weights": list,
    "layers": dict,
    "build_seconds": (int, float),
    "built_at": str,
    "adapt_deploy_version": str,
    "schema_version": int,
    "notes": list,
}


def write_record(plan: Path, record: EngineRecord) -> Path:
    """Write the sidecar of `plan` atomically; returns its path."""
    path = record_path(plan)
    atomic_write(path, record.to_json())
    return path


def read_record(plan: Path) -> EngineRecord:
    """The sidecar of `plan`, validated."""
    path = record_path(plan)
    if not path.is_file():
        raise EngineError(
            f"{plan} has no sidecar {path.name}: its TensorRT version and GPU are unknown; "
            "rebuild it with adapt-deploy build-engine"
        )
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: not valid JSON: {exc}") from None
    return EngineRecord.from_dict(data, path)


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------


def differences(built: Platform, here: Platform) -> list[str]:
    """What differs between the machine that built a plan and this one ([] when it may run).

    TensorRT plans are not portable across TensorRT versions (the full version is compared,
    build number included) nor across GPU models (name and compute capability).
    """
    diffs = []
    if built.tensorrt_version != here.tensorrt_version:
        diffs.append("TensorRT version")
    if built.gpu_name != here.gpu_name or built.compute_capability != here.compute_capability:
        diffs.append("GPU")
    return diffs


def check_compatible(plan: Path, record: EngineRecord, here: Platform, bundle: Path) -> None:
    """EngineMismatchError saying which of TensorRT version and GPU differ, and how to rebuild."""
    diffs = differences(record.platform, here)
    if diffs:
        raise EngineMismatchError(
            f"{plan} was built for {record.platform.describe()}, but this machine has "
            f"{here.describe()}: the {' and the '.join(diffs)} differ. A TensorRT engine runs "
            "only with the TensorRT version and on the GPU model that built it; rebuild it here: "
            f"{_rebuild_command(bundle, record.precision)}"
        )


def _rebuild_command(bundle: Path, precision: str) -> str:
    command = REBUILD.format(bundle=bundle)
    return command + (" --fp16" if precision == "fp16" else "")


def list_engines(bundle: Path, precision: str | None = None) -> list[Path]:
    """The plans in bundle/engines (of one precision when given), sorted by name."""
    directory = Path(bundle) / ENGINES_DIR
    if not directory.is_dir():
        return []
    plans = sorted(directory.glob(f"*{PLAN_SUFFIX}"))
    if precision is None:
        return plans
    stem = engine_stem(precision)
    return [p for p in plans if p.name.split(".", 1)[0] == stem]


def select_engine(bundle: Path, precision: str, here: Platform) -> tuple[Path, EngineRecord]:
    """The plan of `precision` built for this machine, with its sidecar, or an error saying why not.

    An engine for another TensorRT version or GPU is refused with the versions and GPUs named
    (EngineMismatchError); no engine at all is an EngineError; both say how to build one.
    """
    bundle = Path(bundle)
    plan = engine_path(bundle, precision, here)
    if plan.is_file():
        record = read_record(plan)
        check_compatible(plan, record, here, bundle)
        return plan, record
    others = list_engines(bundle, precision)
    if not others:
        raise EngineError(
            f"no {precision} TensorRT engine in {bundle / ENGINES_DIR}; build one on this "
            f"machine: {_rebuild_command(bundle, precision)}"
        )
    records = []
    for other in others:
        try:
            records.append((other, read_record(other)))
        except EngineError:
            continue
    for other, record in records:
        check_compatible(other, record, here, bundle)  # raises for every foreign engine
    names = ", ".join(p.name for p in others)
    raise EngineError(
        f"{bundle / ENGINES_DIR} holds {names} but no {plan.name} for {here.describe()}; "
        f"rebuild: {_rebuild_command(bundle, precision)}"
    )


def read_engine(
    bundle: Path, meta: dict[str, Any], precision: str, here: Platform
) -> tuple[bytes, EngineRecord]:
    """The plan bytes of `precision` for this machine, checked against its sidecar and the bundle.

    Refuses an engine for another TensorRT version or GPU, a plan whose bytes no longer match
    its sidecar, and one built from an ONNX model the bundle has since replaced.
    """
    plan, record = select_engine(bundle, precision, here)
    model = meta["models"].get(record.onnx_model)
    if model is None or model.get("sha256") != record.onnx_sha256:
        raise EngineError(
            f"{plan} was built from {record.onnx_file} with sha256 {record.onnx_sha256[:16]}…, "
            f"which is no longer the bundle's {record.onnx_model} model (meta.json "
            f"models.{record.onnx_model}); rebuild: {_rebuild_command(bundle, precision)}"
        )
    data = plan.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != record.engine_sha256:
        raise EngineError(
            f"{plan}: sha256 {actual[:16]}… does not match its sidecar {record_path(plan).name} "
            f"({record.engine_sha256[:16]}…); the plan was changed or damaged; rebuild: "
            f"{_rebuild_command(bundle, precision)}"
        )
    return data, record
