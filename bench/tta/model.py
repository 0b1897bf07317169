"""The model every method starts from: the default checkpoint and source data, its cached
bundle, and how the report names it."""

from __future__ import annotations

from pathlib import Path

from adapt_deploy.bundle.meta import BundleError, load_meta, sha256_file
from adapt_deploy.export.pipeline import export_bundle
from bench.common import WORK as BENCH_WORK

# What `python -m bench.adaptation --seeds 0 --methods source_only` trains (its default work
# dir); until 2026-12-07 the bench used an older run's model (work dir adapt_v2), which the
# current code no longer trains.
DEFAULT_CHECKPOINT = BENCH_WORK / "adaptation/runs/source_only_seed0/checkpoint.pt"
DEFAULT_SOURCE = BENCH_WORK / "adaptation/data/source"


def ensure_bundle(checkpoint: Path, source_data: Path, bundle: Path) -> tuple[dict, bool]:
    """The bundle of `checkpoint` with its adaptation package from `source_data` at `bundle`:
    the one there when its meta.json records this checkpoint (sha256) and source data and its
    package has the home calibration (tta.bank), else a fresh export. Returns (meta, exported
    now)."""
    try:
        meta = load_meta(bundle)
    except BundleError:
        meta = None
    if meta is not None:
        package = meta.get("adaptation", {}).get("package") or {}
        same_source = (
            "source" in package
            and Path(str(package["source"])).resolve() == Path(source_data).resolve()
        )
        calibrated = (package.get("summary") or {}).get("home_radius") is not None
        if (
            meta["checkpoint"].get("sha256") == sha256_file(checkpoint)
            and same_source
            and calibrated
        ):
            return meta, False
    export_bundle(checkpoint, bundle, source_data=source_data, force=True)
    return load_meta(bundle), True


def model_description(checkpoint: Path) -> str:
    """Which checkpoint the report's methods started from, in words."""
    if checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve():
        return f"source-only model of bench.adaptation, seed 0 ({checkpoint.name})"
    return f"checkpoint {checkpoint}"


def require_checkpoint(checkpoint: Path) -> None:
    """Exit with how to make `checkpoint` when it is missing."""
    if not checkpoint.exists():
        raise SystemExit(
            f"{checkpoint} is missing: train it with `python -m bench.adaptation --seeds 0 "
            "--methods source_only --name tta_model` (the name keeps bench/results/adaptation.md "
            "as it is) or pass --checkpoint and --source-data"
        )
