"""The deployment bundle on disk: meta.json schema, validation, file hashes, atomic writing.

Torch-free: the target (build-engine, verify, the runtime) reads bundles with this module alone.
A bundle is a directory holding meta.json, model.onnx (and model_fp16.onnx), engines/ and
samples/; meta.json records a sha256 for every model file so a copy can be checked on arrival.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from adapt_deploy.atomic import current_umask
from adapt_deploy.errors import UserError

SCHEMA_VERSION = 1
META_FILE = "meta.json"
PRECISIONS = ("fp32", "fp16")
LAYOUTS = ("NHWC", "NCHW")
INPUT_DTYPES = ("uint8", "float32")
NORMALIZATIONS = ("in_graph", "external")

# Top-level keys every meta.json carries, with their JSON types.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "created": str,
    "classes": list,
    "num_classes": int,
    "palette": list,
    "input": dict,
    "shapes": dict,
    "outputs": list,
    "opset": int,
    "models": dict,
    "precision": list,
    "checkpoint": dict,
    "tools": dict,
    "parity": dict,
    "samples": list,
}
INPUT_KEYS = ("name", "layout", "dtype", "color_order", "normalization", "mean", "std")


class BundleError(UserError):
    """A bundle that is missing, malformed, from a newer schema, or fails its hash check."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path, paths: list[Path]) -> dict[str, str]:
    """{path relative to root (POSIX): sha256} for the given files."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(paths)}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _fail(where: Path, field: str, expected: str, got: Any) -> BundleError:
    return BundleError(f"{where}: field {field!r}: expected {expected}, got {got!r}")


def _check_relative(where: Path, field: str, value: Any) -> None:
    """A bundle-relative POSIX path that cannot escape the bundle directory."""
    path = PurePosixPath(value) if isinstance(value, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not value:
        raise _fail(where, field, "a relative path inside the bundle", value)


def _check_shape(where: Path, field: str, value: Any) -> list[int]:
    ok = (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise _fail(where, field, "[N, H, W] of three positive integers", value)
    return value


def _check_floats(where: Path, field: str, value: Any, count: int) -> None:
    ok = isinstance(value, list) and len(value) == count
    if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise _fail(where, field, f"a list of {count} numbers", value)


def _check_input(where: Path, spec: dict[str, Any]) -> None:
    for key in INPUT_KEYS:
        if key not in spec:
            raise BundleError(f"{where}: field 'input' is missing {key!r}")
    choices = {
        "layout": LAYOUTS,
        "dtype": INPUT_DTYPES,
        "normalization": NORMALIZATIONS,
        "color_order": ("RGB",),
    }
    for key, allowed in choices.items():
        if spec[key] not in allowed:
            raise _fail(where, f"input.{key}", f"one of {list(allowed)}", spec[key])
    for key in ("mean", "std"):
        _check_floats(where, f"input.{key}", spec[key], 3)


def _check_models(where: Path, meta: dict[str, Any]) -> None:
    precision = meta["precision"]
    if not precision or any(p not in PRECISIONS for p in precision):
        raise _fail(where, "precision", f"a non-empty list of {list(PRECISIONS)}", precision)
    for name in precision:
        entry = meta["models"].get(name)
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: field 'models' has no entry for precision {name!r}")
        for key in ("file", "sha256", "files"):
            if key not in entry:
                raise BundleError(f"{where}: field 'models.{name}' is missing {key!r}")
        _check_relative(where, f"models.{name}.file", entry["file"])
        if not isinstance(entry["files"], dict) or entry["file"] not in entry["files"]:
            raise _fail(where, f"models.{name}.files", "a {path: sha256} map with the model", 0)
        for rel in entry["files"]:
            _check_relative(where, f"models.{name}.files", rel)


def _check_adaptation(where: Path, adaptation: Any) -> None:
    """The optional `adaptation` block; its `package` (written with source data) names files
    inside the bundle, each with a sha256."""
    if not isinstance(adaptation, dict):
        raise _fail(where, "adaptation", "a JSON object", type(adaptation).__name__)
    package = adaptation.get("package")
    if package is None:
        return
    if not isinstance(package, dict):
        raise _fail(where, "adaptation.package", "a JSON object", type(package).__name__)
    files = package.get("files")
    if not isinstance(files, dict) or not all(isinstance(h, str) for h in files.values()):
        raise _fail(where, "adaptation.package.files", "a {path: sha256} map", files)
    for rel in files:
        _check_relative(where, "adaptation.package.files", rel)
    for key in ("checkpoint", "source_stats"):
        _check_relative(where, f"adaptation.package.{key}", package.get(key))
        if package[key] not in files:
            raise _fail(where, f"adaptation.package.{key}", "a file listed in its 'files'", 0)


def validate_meta(meta: Any, where: Path) -> dict[str, Any]:
    """Check a parsed meta.json against schema 1; BundleError naming the field otherwise."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(where, "schema_version", "a positive integer", version)
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version {version} is newer than this adapt-deploy reads "
            f"(up to {SCHEMA_VERSION}); upgrade adapt-deploy to read this bundle"
        )
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise BundleError(f"{where}: missing required field(s) {missing}")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            expected = getattr(kind, "__name__", str(kind))
            raise _fail(where, key, f"a JSON {expected}", type(meta[key]).__name__)
    if not len(meta["classes"]) == meta["num_classes"] == len(meta["palette"]):
        raise BundleError(
            f"{where}: fields 'classes', 'num_classes' and 'palette' disagree: "
            f"{len(meta['classes'])} names, num_classes {meta['num_classes']}, "
            f"{len(meta['palette'])} colours"
        )
    _check_input(where, meta["input"])
    shapes = {
        k: _check_shape(where, f"shapes.{k}", meta["shapes"].get(k)) for k in ("min", "opt", "max")
    }
    if not all(
        a <= o <= b for a, o, b in zip(shapes["min"], shapes["opt"], shapes["max"], strict=True)
    ):
        raise _fail(where, "shapes", "min <= opt <= max in every dimension", meta["shapes"])
    names = [o.get("name") if isinstance(o, dict) else None for o in meta["outputs"]]
    if "labels" not in names or "presence" not in names:
        raise _fail(where, "outputs", "entries named 'labels' and 'presence'", names)
    _check_models(where, meta)
    for i, sample in enumerate(meta["samples"]):
        if not isinstance(sample, dict) or "file" not in sample:
            raise _fail(where, f"samples[{i}]", "an object with 'file'", sample)
        _check_relative(where, f"samples[{i}].file", sample["file"])
    if "adaptation" in meta:
        _check_adaptation(where, meta["adaptation"])
    return meta


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_meta(bundle: Path) -> dict[str, Any]:
    """meta.json of a bundle, parsed and validated (BundleError naming the file and field)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} (expected a directory written by export)")
    path = bundle / META_FILE
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle} is not a bundle written by export")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    return validate_meta(meta, path)


def presence_lse_k(meta: dict[str, Any]) -> float:
    """The LSE pooling's k of the bundle's presence output (1 in bundles that predate the key)."""
    return float(meta.get("adaptation", {}).get("lse_k", 1.0))


def model_path(bundle: Path, meta: dict[str, Any], precision: str) -> Path:
    """The ONNX file of one precision; BundleError when the bundle was exported without it."""
    if precision not in meta["models"]:
        hint = " (export with --fp16)" if precision == "fp16" else ""
        raise BundleError(
            f"{Path(bundle) / META_FILE}: no {precision!r} model in this bundle; "
            f"it has {meta['precision']}{hint}"
        )
    return Path(bundle) / meta["models"][precision]["file"]


def verify_hashes(bundle: Path, meta: dict[str, Any], precision: str) -> None:
    """Check every file of one precision's model against the sha256 meta.json records."""
    model_path(bundle, meta, precision)  # precision present
    for rel, expected in meta["models"][precision]["files"].items():
        path = Path(bundle) / rel
        if not path.is_file():
            raise BundleError(f"{path} is missing (listed in meta.json models.{precision})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual[:16]}… does not match meta.json models.{precision} "
                f"({expected[:16]}…); the file was changed or damaged after export"
            )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_meta(directory: Path, meta: dict[str, Any]) -> Path:
    """Validate and write meta.json (the bundle's last file: its presence marks completeness)."""
    path = Path(directory) / META_FILE
    validate_meta(meta, path)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing OUT unless `force`; even then only a bundle or an empty directory."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    if not out.is_dir() or out.is_symlink():
        raise BundleError(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / META_FILE).is_file():
        raise BundleError(
            f"{out} is a non-empty directory without {META_FILE}, not a bundle; "
            "refusing to replace it even with --force"
        )


@contextlib.contextmanager
def staged_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out` by rename.

    Nothing is written to `out` itself until the end, so a failure (or Ctrl-C) leaves any
    existing bundle untouched and no half-written one behind.
    """
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    # mkdtemp makes it private; a bundle is an ordinary directory.
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
        check_destination(out, force)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
