"""The bundle's adaptation package: source statistics at export, written, hashed, loaded.

One real export of a tiny DeepLab whose config points at a tiny GTA5-layout source set (six
class bands per image: the other 13 classes never occur) is shared by the tests that read it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BANDS, write_gta5
from helpers import write_source_checkpoint
from PIL import Image
from typer.testing import CliRunner

from adapt_deploy.bundle.meta import BundleError, load_meta, sha256_file, validate_meta
from adapt_deploy.cli import app
from adapt_deploy.config import DatasetConfig
from adapt_deploy.data.datasets import build_dataset
from adapt_deploy.data.normalize import normalize
from adapt_deploy.errors import UserError
from adapt_deploy.export.adaptation_package import load_package
from adapt_deploy.export.pipeline import export_bundle
from adapt_deploy.export.source_stats import (
    SourceStats,
    best_threshold,
    compute_source_stats,
    presence_metrics,
    spaced_indices,
)
from adapt_deploy.labels import TRAIN_TO_LABEL_LUT
from adapt_deploy.models.checkpoints import load_checkpoint
from adapt_deploy.models.signature import SignatureProbe
from adapt_deploy.progress import Reporter
from adapt_deploy.runtime.torch_backend import TorchBackend, find_checkpoint
from adapt_deploy.tta.adapter import OnlineAdapter
from adapt_deploy.tta.options import AdaptOptions

PRESENT = sorted(BANDS)
ABSENT = [c for c in range(19) if c not in BANDS]
CAR = 13


class Recording(Reporter):
    """Keeps the log lines and the progress steps of each task."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tasks: dict[str, list[int]] = {}  # description: [total, steps done]
        self._current = ""

    def task(self, description: str, total: int | None):
        self.tasks[description], self._current = [total, 0], description
        return super().task(description, total)

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        self.tasks[self._current][1] += steps

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tta_package")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    return write_gta5(work / "source", 8)


@pytest.fixture(scope="module")
def checkpoint(work: Path, source: Path) -> Path:
    return write_source_checkpoint(work / "checkpoints" / "tiny.pt", source)


@pytest.fixture(scope="module")
def exported(work: Path, checkpoint: Path) -> tuple[Path, Recording]:
    """The package is found through the checkpoint config's data.source.root."""
    reporter = Recording()
    bundle = export_bundle(checkpoint, work / "out" / "bundle", adapt_images=6, reporter=reporter)
    return bundle.bundle, reporter


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported[0]


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


# --------------------------------------------------------------------------------------------
# Export writes the package
# --------------------------------------------------------------------------------------------


def test_export_writes_the_checkpoint_and_statistics_with_hashes(exported, checkpoint, source):
    bundle, reporter = exported
    meta = load_meta(bundle)
    package = meta["adaptation"]["package"]
    assert package["checkpoint"] == "adapt/tiny.pt"
    assert package["source_stats"] == "adapt/source_stats.npz"
    assert sorted(package["files"]) == ["adapt/source_stats.npz", "adapt/tiny.pt"]
    for rel, digest in package["files"].items():
        assert sha256_file(bundle / rel) == digest
    assert package["files"]["adapt/tiny.pt"] == meta["checkpoint"]["sha256"]
    assert sha256_file(checkpoint) == meta["checkpoint"]["sha256"]
    assert package["images"] == 6 and package["source"] == str(source)
    assert meta["adaptation"]["lse_k"] == 1.0 and meta["adaptation"]["pseudo_threshold"] == 0.2
    summary = package["summary"]
    assert summary["never_present"] == ABSENT and summary["images"] == 6
    assert 0 <= summary["entropy"] <= 1 and summary["mean_f1"] >= summary["mean_f1_at_t"]
    json.dumps(meta, allow_nan=False)  # strict JSON: no NaN in the summary
    assert reporter.tasks["source statistics for on-device adaptation"] == [6, 6]
    assert any(
        "adaptation package: source statistics of 6 images" in line for line in reporter.lines
    )


def test_statistics_shapes_and_values(bundle: Path, checkpoint: Path):
    stats = SourceStats.load(bundle / "adapt" / "source_stats.npz")
    model, _ = load_checkpoint(checkpoint)
    assert stats.thresholds.shape == (19,) and stats.thresholds.dtype == np.float32
    assert ((stats.thresholds >= 0) & (stats.thresholds <= 1)).all()
    assert stats.never_present.tolist() == [c in ABSENT for c in range(19)]
    assert (stats.thresholds[ABSENT] == 1.0).all() and np.isinf(stats.lse_thresholds[ABSENT]).all()
    present_cut = 1.0 / (1.0 + np.exp(-stats.lse_thresholds[PRESENT].astype(np.float64)))
    np.testing.assert_allclose(stats.thresholds[PRESENT], present_cut, rtol=1e-6)
    assert stats.prototypes.shape == (19, model.feature_dim)
    assert np.isfinite(stats.prototypes[PRESENT]).all()
    assert (np.abs(stats.prototypes[PRESENT]).sum(1) > 0).all()
    assert stats.prototype_counts[PRESENT].tolist() == [6] * len(PRESENT)
    assert stats.prototype_counts[ABSENT].sum() == 0
    assert np.isfinite(stats.f1[PRESENT]).all() and np.isnan(stats.f1[ABSENT]).all()
    assert (stats.f1[PRESENT] == 1.0).all()  # present in every image: keep every image
    assert stats.gt_classes == len(PRESENT) and stats.present_classes == len(PRESENT)
    assert 0 <= stats.entropy <= 1 and stats.entropy_std >= 0
    assert 1 <= stats.predicted_classes <= 19
    assert stats.class_share.sum() == pytest.approx(1.0, abs=1e-5)
    assert stats.images == 6 and stats.lse_k == 1.0 and stats.global_threshold == 0.2


def test_load_package_round_trip(bundle: Path):
    package = load_package(bundle, load_meta(bundle))
    assert package.checkpoint == bundle / "adapt" / "tiny.pt"
    assert package.lse_k == 1.0
    stored = SourceStats.load(bundle / "adapt" / "source_stats.npz")
    assert package.stats.to_bytes() == stored.to_bytes()
    np.testing.assert_array_equal(package.stats.thresholds, stored.thresholds)


def test_torch_backend_finds_the_checkpoint_inside_the_bundle(bundle: Path):
    meta = load_meta(bundle)
    assert not (bundle.parent / "tiny.pt").exists()
    assert find_checkpoint(bundle, meta) == bundle / "adapt" / "tiny.pt"
    backend = TorchBackend(bundle, meta)
    buffer = backend.input_buffer((1, 32, 48))
    buffer[:] = 100
    labels, presence = backend.run((1, 32, 48))
    assert labels.shape == (1, 32, 48) and presence.shape == (1, 19)
    backend.close()


# --------------------------------------------------------------------------------------------
# Missing, damaged and malformed packages
# --------------------------------------------------------------------------------------------


def _edit_meta(bundle: Path, edit) -> None:
    meta = json.loads((bundle / "meta.json").read_text())
    edit(meta)
    (bundle / "meta.json").write_text(json.dumps(meta))


def test_a_bundle_without_a_package_says_how_to_re_export(copy: Path):
    _edit_meta(copy, lambda m: m["adaptation"].pop("package"))
    with pytest.raises(UserError, match="has no adaptation package") as info:
        load_package(copy, load_meta(copy))
    message = str(info.value)
    assert str(copy) in message and "tiny.pt" in message
    assert "adapt-deploy export CKPT --out BUNDLE --force --source-data DIR" in message


def test_a_changed_statistics_file_fails_its_hash(copy: Path):
    stats = copy / "adapt" / "source_stats.npz"
    stats.write_bytes(stats.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"source_stats.npz: sha256 .* does not match") as info:
        load_package(copy, load_meta(copy))
    assert "--source-data DIR" in str(info.value)


def test_a_missing_checkpoint_is_named(copy: Path):
    (copy / "adapt" / "tiny.pt").unlink()
    with pytest.raises(BundleError, match=r"adapt/tiny.pt is missing .*--source-data"):
        load_package(copy, load_meta(copy))


def test_package_paths_must_stay_inside_the_bundle(bundle: Path):
    meta = load_meta(bundle)
    package = meta["adaptation"]["package"]
    digest = package["files"].pop("adapt/tiny.pt")
    package["files"]["../tiny.pt"] = digest
    package["checkpoint"] = "../tiny.pt"
    with pytest.raises(BundleError, match=r"adaptation\.package\.files.*relative path inside"):
        validate_meta(meta, bundle / "meta.json")


def test_a_file_that_is_not_statistics_is_a_user_error(tmp_path: Path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a source statistics file"):
        SourceStats.load(tmp_path / "x.npz")


# --------------------------------------------------------------------------------------------
# Export options
# --------------------------------------------------------------------------------------------


def test_missing_source_data_is_refused_before_anything_is_written(tmp_path, checkpoint):
    out = tmp_path / "out" / "bundle"
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--out", str(out), "--source-data", str(missing)]
    )
    assert isinstance(result.exception, UserError), result.output
    assert f"--source-data: directory not found: {missing}" in str(result.exception)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--adapt-images must be at least 1"):
        export_bundle(checkpoint, out, adapt_images=0)


def test_source_data_of_the_wrong_layout_is_refused_before_export(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="images: directory not found"):
        export_bundle(checkpoint, tmp_path / "out" / "bundle", source_data=tmp_path / "empty")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _brute_force_f1(scores: np.ndarray, truth: np.ndarray) -> float:
    """The best F1 of [scores > t] over every t that makes a different cut."""
    candidates = np.concatenate([scores, np.nextafter(scores, -np.inf)])
    f1s = presence_metrics(scores[:, None] > candidates[None, :], truth[:, None])[0]
    return float(np.nanmax(f1s))


def test_best_threshold_maximizes_f1_over_every_cut():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 40))
        scores = rng.normal(0, 8, n)  # LSE values: any real number
        if trial % 3 == 0:
            scores = np.round(scores)  # ties
        truth = rng.random(n) < rng.random()
        t = best_threshold(scores, truth)
        if not truth.any():
            assert t == np.inf
            continue
        f1 = presence_metrics((scores > t)[:, None], truth[:, None])[0][0]
        assert f1 == pytest.approx(_brute_force_f1(scores, truth), abs=1e-6)
    assert best_threshold(np.array([-3.0, 9.0]), np.array([True, True])) < -3.0
    assert best_threshold(np.array([-3.0, 9.0]), np.array([False, True])) == 3.0


def test_spaced_indices_are_even_and_deterministic():
    assert spaced_indices(5, 10) == [0, 1, 2, 3, 4]
    assert spaced_indices(10, 4) == [0, 3, 6, 9]


def _remove_class(root: Path, names: list[str], train_id: int, replacement: int) -> None:
    """Relabel one class as another in some GTA5 palette labels."""
    for name in names:
        path = root / "labels" / f"{name}.png"
        with Image.open(path) as img:
            ids, palette = np.asarray(img).copy(), img.getpalette()
        ids[ids == TRAIN_TO_LABEL_LUT[train_id]] = TRAIN_TO_LABEL_LUT[replacement]
        out = Image.fromarray(ids, mode="P")
        out.putpalette(palette)
        out.save(path)


def test_calibration_beats_the_global_threshold_and_flags_absent_classes(tmp_path, checkpoint):
    root = write_gta5(tmp_path / "src", 10, seed=3)
    _remove_class(root, ["00001", "00003", "00004", "00008", "00010"], CAR, 0)  # car: 5 of 10
    model, config = load_checkpoint(checkpoint)
    config.data.source = DatasetConfig("gta5", str(root), "train", [36, 64])
    dataset = build_dataset(config.data.source)
    stats = compute_source_stats(model, config, dataset, max_images=10)
    assert stats.images == 10 and stats.source == str(root)
    assert stats.prototype_counts[CAR] == 5 and not stats.never_present[CAR]
    assert stats.never_present[ABSENT].all() and (stats.thresholds[ABSENT] == 1.0).all()
    seen = ~stats.never_present
    assert (stats.f1[seen] >= stats.f1_at_t[seen]).all()
    assert 0.0 <= stats.thresholds[CAR] < 1.0
    # the global T calls the car present in every image: precision is its base rate, 5 of 10
    assert stats.precision_at_t[CAR] == 0.5 and stats.f1[CAR] > stats.f1_at_t[CAR]
    assert stats.present_classes_at_t == 19 and stats.present_classes < 7
    assert not model.training  # left in eval mode as it came
    again = SourceStats.load(_saved(stats, tmp_path))
    assert again.to_bytes() == stats.to_bytes()


def _saved(stats: SourceStats, tmp_path: Path) -> Path:
    path = tmp_path / "stats.npz"
    path.write_bytes(stats.to_bytes())
    return path


def test_export_without_source_data_says_so_and_writes_no_package(tmp_path: Path):
    checkpoint = write_source_checkpoint(tmp_path / "c.pt", tmp_path / "gone")
    reporter = Recording()
    bundle = export_bundle(checkpoint, tmp_path / "bundle", reporter=reporter).bundle
    assert "package" not in load_meta(bundle)["adaptation"]
    assert not (bundle / "adapt").exists()
    assert any(
        "no adaptation package in this bundle" in line
        and str(tmp_path / "gone") in line
        and "--source-data DIR" in line
        for line in reporter.lines
    )


def test_the_package_calibrates_home_and_older_packages_still_load(bundle, tmp_path, checkpoint):
    stats = SourceStats.load(bundle / "adapt" / "source_stats.npz")
    model, config = load_checkpoint(checkpoint)
    assert stats.home_signature.shape == (2 * model.backbone.conv1.out_channels,)
    assert np.isfinite(stats.home_signature).all() and 0 < stats.home_radius < 10
    assert stats.summary()["home_radius"] == round(stats.home_radius, 4)
    # the radius is the 99% quantile of the source images' own distances to the home signature
    probe = SignatureProbe(model.backbone.conv1, model.backbone.bn1)
    data = build_dataset(config.data.source)
    images = [data[i] for i in spaced_indices(len(data), stats.images)]
    x = normalize(torch.stack([torch.as_tensor(d["image"]) for d in images]), config.input)
    distances = (probe(x) - torch.as_tensor(stats.home_signature)).pow(2).mean(1).sqrt()
    assert stats.home_radius == pytest.approx(float(distances.quantile(0.99)), rel=1e-4)
    with np.load(bundle / "adapt" / "source_stats.npz") as data_:  # as written before the bank
        older = {k: data_[k] for k in data_.files if not k.startswith("home_")}
    np.savez(tmp_path / "old.npz", **older)
    old = SourceStats.load(tmp_path / "old.npz")
    assert old.home_signature.size == 0 and np.isnan(old.home_radius)
    np.testing.assert_array_equal(old.thresholds, stats.thresholds)
    adapter = OnlineAdapter(model, config.input, old, AdaptOptions(threads=1), (36, 64))
    assert adapter.bank is not None and adapter.bank.home is None
    assert any("no home signature" in note for note in adapter.notes)
