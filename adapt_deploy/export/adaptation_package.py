"""The bundle's adaptation package: what `stream --adapt` needs beyond the ONNX model.

Written by `adapt-deploy export` when it finds the labelled source data:
```
bundle/adapt/<checkpoint name>     the PyTorch weights the bundle was exported from
bundle/adapt/source_stats.npz      SourceStats: calibrated thresholds, prototypes, entropy
```
and recorded in meta.json `adaptation.package` with a sha256 per file, checked on loading.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt_deploy.bundle.meta import META_FILE, BundleError, sha256_file
from adapt_deploy.errors import UserError
from adapt_deploy.export.source_stats import SourceStats

PACKAGE_DIR = "adapt"
STATS_FILE = "source_stats.npz"
REEXPORT = "adapt-deploy export CKPT --out BUNDLE --force --source-data DIR"


@dataclass
class AdaptationPackage:
    """A bundle's adaptation package, hash-checked: the checkpoint path and source statistics."""

    checkpoint: Path
    stats: SourceStats
    lse_k: float


def write_package(bundle_dir: Path, checkpoint: Path, stats: SourceStats) -> dict[str, Any]:
    """Copy `checkpoint` and write `stats` under `bundle_dir`/adapt/; return the meta.json
    block `adaptation.package` (paths relative to the bundle, a sha256 per file)."""
    bundle_dir, checkpoint = Path(bundle_dir), Path(checkpoint)
    directory = bundle_dir / PACKAGE_DIR
    directory.mkdir(exist_ok=True)
    weights = directory / checkpoint.name
    shutil.copyfile(checkpoint, weights)
    stats_path = directory / STATS_FILE
    stats_path.write_bytes(stats.to_bytes())
    files = {p.relative_to(bundle_dir).as_posix(): sha256_file(p) for p in (weights, stats_path)}
    return {
        "checkpoint": weights.relative_to(bundle_dir).as_posix(),
        "source_stats": stats_path.relative_to(bundle_dir).as_posix(),
        "files": files,
        "images": stats.images,
        "source": stats.source,
        "summary": stats.summary(),
    }


def _hint(bundle: Path, meta: dict[str, Any]) -> str:
    name = Path(str(meta.get("checkpoint", {}).get("file", "checkpoint.pt"))).name
    return (
        f"re-export it with `{REEXPORT}` (CKPT: the checkpoint it came from, {name}; "
        f"BUNDLE: {bundle}; DIR: the labelled source data it was trained on)"
    )


def load_package(bundle: Path, meta: dict[str, Any]) -> AdaptationPackage:
    """The adaptation package of a bundle (meta as `load_meta` returns it), every file checked
    against its sha256; UserError naming the bundle or file and how to re-export otherwise."""
    bundle = Path(bundle)
    adaptation = meta.get("adaptation") or {}
    package = adaptation.get("package")
    if not isinstance(package, dict):
        raise UserError(
            f"{bundle} has no adaptation package (meta.json adaptation.package): on-device "
            "adaptation needs the source checkpoint and source statistics in the bundle; "
            + _hint(bundle, meta)
        )
    files = package.get("files") or {}
    for key in ("checkpoint", "source_stats"):
        if package.get(key) not in files:
            raise BundleError(
                f"{bundle / META_FILE}: adaptation.package.{key} is not among its hashed "
                f"files; {_hint(bundle, meta)}"
            )
    for rel, expected in files.items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(
                f"{path} is missing (listed in meta.json adaptation.package); "
                + _hint(bundle, meta)
            )
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual[:16]}… does not match meta.json adaptation.package "
                f"({expected[:16]}…): the file was changed or damaged after export; "
                + _hint(bundle, meta)
            )
    recorded = meta.get("checkpoint", {}).get("sha256")
    if files[package["checkpoint"]] != recorded:
        raise BundleError(
            f"{bundle / package['checkpoint']} is not the checkpoint this bundle was exported "
            f"from (meta.json checkpoint.sha256 differs); " + _hint(bundle, meta)
        )
    stats = SourceStats.load(bundle / package["source_stats"])
    lse_k = float(adaptation.get("lse_k", stats.lse_k))
    if stats.num_classes != meta["num_classes"] or stats.lse_k != lse_k:
        raise BundleError(
            f"{bundle / package['source_stats']}: statistics for {stats.num_classes} classes "
            f"at LSE k={stats.lse_k}, but the bundle has {meta['num_classes']} classes and "
            f"k={lse_k}; " + _hint(bundle, meta)
        )
    return AdaptationPackage(
        checkpoint=bundle / package["checkpoint"],
        stats=stats,
        lse_k=lse_k,
    )
