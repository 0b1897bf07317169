"""`adapt-deploy export`: checkpoint → bundle (ONNX, optional fp16, parity gates, samples, meta).

Everything is written into a temp directory beside the destination and renamed into place only
after the parity gates pass, so a bundle on disk is always complete and checked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from adapt_deploy import __version__
from adapt_deploy.bundle.meta import (
    SCHEMA_VERSION,
    check_destination,
    file_hashes,
    sha256_file,
    staged_directory,
    write_meta,
)
from adapt_deploy.config import ExperimentConfig
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.segmentation import SegmentationDataset
from adapt_deploy.errors import DatasetError, UserError
from adapt_deploy.export.adaptation_package import write_package
from adapt_deploy.export.onnx_export import (
    MIN_OPSET,
    OPSET,
    export_onnx,
    graph_opset,
    input_meta,
    outputs_meta,
)
from adapt_deploy.export.parity import check_parity, raise_on_failure
from adapt_deploy.export.precision import convert_to_mixed_fp16
from adapt_deploy.export.source_stats import compute_source_stats
from adapt_deploy.export.verify import VERIFY_TOLERANCES
from adapt_deploy.labels import CLASS_NAMES, PALETTE
from adapt_deploy.models.checkpoints import load_checkpoint, read_checkpoint
from adapt_deploy.models.deeplab import DeepLab
from adapt_deploy.models.deploy import DeployModel, GraphSpec
from adapt_deploy.progress import Reporter
from adapt_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

MAX_OPSET = 21  # onnxruntime 1.18, the oldest the package accepts, reads up to opset 21
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}


@dataclass
class ExportResult:
    """Where the bundle went, its meta.json and any engines built after it."""

    bundle: Path
    meta: dict[str, Any]
    engines: list[Path] = field(default_factory=list)


def parse_shape(text: str, what: str = "shape") -> list[int]:
    """'1,512,1024' or '1x512x1024' → [1, 512, 1024]; UserError naming the option otherwise."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"{what}: expected N,H,W (three positive integers), got {text!r}")
    return shape


def default_shapes(eval_size: list[int]) -> dict[str, list[int]]:
    """Engine profile ranges: down to 64x64, optimal at the evaluation size, up to 4x1024x2048."""
    height, width = eval_size
    return {
        "min": [1, min(64, height), min(64, width)],
        "opt": [1, height, width],
        "max": [4, max(1024, height), max(2048, width)],
    }


def _check_shapes(shapes: dict[str, list[int]]) -> None:
    ordered = zip(shapes["min"], shapes["opt"], shapes["max"], strict=True)
    if not all(lo <= mid <= hi for lo, mid, hi in ordered):
        raise UserError(f"shape ranges must satisfy min <= opt <= max per dimension, got {shapes}")
    if min(shapes["min"][1:]) < 16:
        raise UserError(f"--min-shape: height and width must be at least 16, got {shapes['min']}")


def _palette(classes: list[str]) -> list[list[int]]:
    """Each class's Cityscapes colour by name; grey for a name outside the Cityscapes table."""
    return [list(PALETTE[CLASS_NAMES.index(c)]) if c in CLASS_NAMES else [128] * 3 for c in classes]


def _tool_versions() -> dict[str, str]:
    versions = {"adapt_deploy": __version__}
    for module in ("torch", "onnx", "onnxruntime", "onnxscript"):
        versions[module] = importlib.import_module(module).__version__
    return versions


def _check_classes(path: Path, meta: dict[str, Any], num_classes: int) -> list[str]:
    """The class names the checkpoint records, checked against its architecture."""
    classes = list(meta.get("classes") or CLASS_NAMES[:num_classes])
    if len(classes) != num_classes:
        raise UserError(
            f"{path}: meta.classes lists {len(classes)} classes but the architecture "
            f"(meta.config.model.num_classes) has {num_classes}"
        )
    return classes


def _write_fp16(fp32_path: Path, out: Path) -> list[Path]:
    """model_fp16.onnx from the fp32 file (single file; external data past 2 GiB)."""
    mixed = convert_to_mixed_fp16(onnx.load(str(fp32_path)))
    large = mixed.ByteSize() > 1_800_000_000
    onnx.save(mixed, str(out), save_as_external_data=large, location=out.name + ".data")
    onnx.checker.check_model(str(out), full_check=True)
    data = out.with_name(out.name + ".data")
    return [out] + ([data] if data.exists() else [])


def _check_source_data(path: Path | None, images: int) -> None:
    """--source-data must be a readable directory and --adapt-images positive, before any work."""
    if images < 1:
        raise UserError(f"--adapt-images must be at least 1, got {images}")
    if path is None:
        return
    if not Path(path).is_dir():
        raise UserError(f"--source-data: directory not found: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"--source-data: directory not readable: {path}")


def _source_dataset(
    config: ExperimentConfig, source_data: Path | None, reporter: Reporter
) -> tuple[ExperimentConfig, SegmentationDataset | None]:
    """The labelled source split for the adaptation package: `source_data` (a root of the
    config's data.source kind), else the config's own root when it exists; None (and one log
    line saying how to get a package) when there is neither."""
    entry = config.data.source
    if source_data is None and not Path(entry.root).is_dir():
        reporter.log(
            f"no adaptation package in this bundle: the checkpoint's source data "
            f"({entry.kind} at {entry.root}) is not here, and `stream --adapt` needs it; "
            "export with --source-data DIR to add one"
        )
        return config, None
    entry = dataclasses.replace(entry, root=str(source_data or entry.root))
    try:
        dataset = build_dataset(entry, labels=True)
    except DatasetError as exc:
        if source_data is not None:
            raise  # asked for: the error names the path and the layout expected
        reporter.log(
            f"no adaptation package in this bundle: the checkpoint's source data {entry.root} "
            f"is not a labelled {entry.kind} dataset ({str(exc).splitlines()[0]}); "
            "export with --source-data DIR to add one"
        )
        return config, None
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=entry))
    return config, dataset


def export_bundle(
    checkpoint: Path,
    out: Path,
    fp16: bool = False,
    logits: bool = False,
    layout: str = "NHWC",
    shapes: dict[str, list[int]] | None = None,
    opset: int = OPSET,
    force: bool = False,
    reporter: Reporter | None = None,
    source_data: Path | None = None,
    adapt_images: int = 200,
    adapt_package: bool = True,
) -> ExportResult:
    """Export a checkpoint to a checked bundle at `out` (see DESIGN.md §4, Bundle).

    With labelled source data (`source_data`, else the checkpoint config's data.source root
    when it exists) the bundle also gets its adaptation package (adapt/: the checkpoint and
    source statistics over `adapt_images` images), which `stream --adapt` needs. Without
    `adapt_package` it gets none: the training weights stay out of the bundle.
    """
    reporter = reporter or Reporter()
    layout = layout.upper()
    if layout not in ("NHWC", "NCHW"):
        raise UserError(f"--layout must be NHWC (uint8 frames) or NCHW (float32), got {layout!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    check_destination(Path(out), force)  # before any work
    _check_source_data(source_data, adapt_images)
    if source_data is not None and not adapt_package:
        raise UserError("--source-data is for the adaptation package: drop --no-adapt-package")
    checkpoint = Path(checkpoint)
    ckpt_meta = read_checkpoint(checkpoint)["meta"]
    model, config = load_checkpoint(checkpoint)
    classes = _check_classes(checkpoint, ckpt_meta, config.model.num_classes)
    shapes = {**default_shapes(list(config.data.val.size)), **(shapes or {})}
    _check_shapes(shapes)
    graph = GraphSpec(layout=layout, logits=logits, lse_k=config.adapt.lse_k)
    deploy = DeployModel(model, config.input, graph)
    spec = input_meta(config.input, graph)
    if adapt_package:
        stats_config, source = _source_dataset(config, source_data, reporter)
    else:
        stats_config, source = config, None
        reporter.log("no adaptation package in this bundle (--no-adapt-package)")
    checkpoint_sha = sha256_file(checkpoint)

    with staged_directory(Path(out), force) as tmp:
        reporter.log(f"exporting {checkpoint} to ONNX (opset {opset})")
        models = {"fp32": export_onnx(deploy, tmp / MODEL_FILES["fp32"], opset)}
        if fp16:
            reporter.log("converting to mixed fp16 (reductions, resize and argmax in fp32)")
            models["fp16"] = _write_fp16(models["fp32"][0], tmp / MODEL_FILES["fp16"])
        runners = {
            p: OnnxRuntimeBackend(files[0], layout, len(classes), p).outputs
            for p, files in models.items()
        }
        parity = check_parity(deploy, spec, runners, reporter=reporter)
        raise_on_failure(parity)
        samples = _write_samples(tmp, parity.samples)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "name": config.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "classes": classes,
            "num_classes": len(classes),
            "palette": _palette(classes),
            "input": spec,
            "shapes": shapes,
            "outputs": outputs_meta(graph),
            "opset": graph_opset(models["fp32"][0]),
            "models": {
                p: {
                    "file": MODEL_FILES[p],
                    "sha256": sha256_file(f[0]),
                    "files": file_hashes(tmp, f),
                }
                for p, f in models.items()
            },
            "precision": list(models),
            "checkpoint": {
                "file": checkpoint.name,
                "sha256": checkpoint_sha,
                "method": config.train.method,
                "backbone": config.model.backbone,
                "width": config.model.width,
                "aspp_branches": config.model.aspp_branches,
                "iteration": int(ckpt_meta.get("iteration", 0)),
            },
            "evaluation": {
                "size": list(config.data.val.size),
                "protocol": config.train.eval_protocol,
            },
            "adaptation": {
                "lse_k": config.adapt.lse_k,
                "pseudo_threshold": config.adapt.pseudo_threshold,
            },
            "tools": _tool_versions(),
            "parity": parity.report(),
            "tolerances": {p: VERIFY_TOLERANCES[p] for p in models},
            "samples": samples,
        }
        if source is not None:
            meta["adaptation"]["package"] = _adaptation_package(
                tmp, checkpoint, checkpoint_sha, model, stats_config, source, adapt_images, reporter
            )
        write_meta(tmp, meta)
    reporter.log(f"wrote {out}")
    return ExportResult(Path(out), meta)


def _adaptation_package(
    directory: Path,
    checkpoint: Path,
    checkpoint_sha: str,
    model: DeepLab,
    config: ExperimentConfig,
    source: SegmentationDataset,
    images: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """Source statistics and the checkpoint under directory/adapt/; the meta.json block."""
    stats = compute_source_stats(model, config, source, images, reporter)
    package = write_package(directory, checkpoint, stats)
    if package["files"][package["checkpoint"]] != checkpoint_sha:
        raise UserError(f"{checkpoint} changed while it was being exported; export it again")
    summary = package["summary"]
    reporter.log(
        f"adaptation package: source statistics of {stats.images} images of {stats.source}; "
        f"pseudo-weak label F1 {_fmt(summary['mean_f1'])} at calibrated thresholds vs "
        f"{_fmt(summary['mean_f1_at_t'])} at T={stats.global_threshold} (mean over classes)"
    )
    return package


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write_samples(directory: Path, samples: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """samples/NNN.npz (input and PyTorch reference outputs) and their meta.json entries."""
    (directory / "samples").mkdir()
    entries = []
    for i, arrays in enumerate(samples):
        path = directory / "samples" / f"{i:03d}.npz"
        np.savez_compressed(path, **arrays)
        shape = list(arrays["labels"].shape)
        entries.append(
            {"file": f"samples/{path.name}", "shape": shape, "sha256": sha256_file(path)}
        )
    return entries


def build_engines_after_export(
    bundle: Path, fp16: bool, refit: bool, reporter: Reporter
) -> list[Path]:
    """TensorRT engines for a written bundle; UserError when TensorRT is not installed here."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise UserError(
            f"TensorRT is not installed here, so no engine was built; the bundle {bundle} is "
            f"written and complete: build its engines on the target with "
            f"`adapt-deploy build-engine {bundle}`"
        ) from None
    from adapt_deploy.export.tensorrt import build_engines

    return build_engines(bundle, fp16=fp16, refit=refit, reporter=reporter)
