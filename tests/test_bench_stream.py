"""bench/stream.py: a short run on the CPU, with the on-device adapter's update and sync times,
written where it is told."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import scene, write_gta5
from helpers import TINY_SHAPES, write_source_checkpoint

import bench.stream as stream_bench
from adapt_deploy.export.pipeline import export_bundle

FRAME = (64, 96)  # even sizes: OpenCV's mp4v writer drops an odd last row or column


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_stream")


@pytest.fixture(scope="module")
def bundle(work: Path) -> Path:
    """A random tiny DeepLab exported with its adaptation package (source statistics)."""
    root = write_gta5(work / "gta5", 4, (36, 64))
    checkpoint = write_source_checkpoint(work / "tiny.pt", root)
    return export_bundle(checkpoint, work / "bundle", shapes=TINY_SHAPES, source_data=root).bundle


@pytest.fixture(scope="module")
def video(work: Path) -> Path:
    """24 frames of class bands at 64x96, written by OpenCV (mp4v)."""
    path = work / "drive.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 15, FRAME[::-1])
    rng = np.random.default_rng(0)
    for _ in range(24):
        writer.write(scene(rng, *FRAME)[0][:, :, ::-1])
    writer.release()
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_short_run_reports_speed_memory_and_the_adapter_on_the_device(
    backend: str, bundle: Path, video: Path, work: Path
) -> None:
    results = work / f"results_{backend}"
    done = stream_bench.run(
        bundle, video, "tiny random model", backend=backend, device="cpu", block=8, rounds=1,
        frames=16, adapt_steps=2, syncs=1, results=results, work=work / "scratch",
    )  # fmt: skip
    assert done.path == results / "stream.md" and done.path.read_text().startswith("# Streaming")
    assert done.speed["frames"] == 8 and done.speed["backend_fps"] > 0 and done.speed["e2e_fps"] > 0
    assert done.memory["frames"] == 16
    adapter = done.adapter
    assert isinstance(adapter, dict), adapter
    assert adapter["device"] == "cpu" and adapter["size"] == (32, 64)
    assert len(adapter["update_ms"]) == 2 and all(t > 0 for t in adapter["update_ms"])
    assert len(adapter["sync_ms"]) == 1 and all(t > 0 for t in adapter["sync_ms"])
    assert adapter["sync_ok"] == 1 and adapter["sync_failures"] == []
    text = done.body
    assert f"backend {backend} fp32 on cpu" in text
    assert "| update (`OnlineAdapter.step`) | 2 |" in text
    assert "| sync (`push`, checked and swapped in) | 1 |" in text
    assert "drive.mp4 (24 frames, 64x96, 15 fps)" in text
    assert list((work / "scratch").iterdir()) == []  # the stream's outputs are removed


def test_a_bundle_without_adaptation_package_says_why_it_has_no_adapter_times(
    tiny_bundle: Path, video: Path, work: Path
) -> None:
    done = stream_bench.run(
        tiny_bundle, video, "tiny", device="cpu", block=4, rounds=1, frames=4,
        adapt_steps=1, syncs=1, results=work / "results_plain", work=work / "scratch",
    )  # fmt: skip
    assert isinstance(done.adapter, str) and "no adaptation package" in done.adapter
    assert "Not measured: " in done.body and "no adaptation package" in done.body


def test_adapter_timing_can_be_left_out(bundle: Path, video: Path, work: Path) -> None:
    done = stream_bench.run(
        bundle, video, "tiny", device="cpu", block=4, rounds=1, frames=4, adapt_steps=0,
        syncs=0, results=work / "results_none", work=work / "scratch",
    )  # fmt: skip
    assert done.adapter is None and "Not measured (--adapt-steps 0 --syncs 0)." in done.body


def test_bad_counts_are_refused_before_any_work(capsys: pytest.CaptureFixture) -> None:
    assert stream_bench.main(["--frames", "0"]) == 2
    assert "--frames, --block and --rounds must be >= 1" in capsys.readouterr().err


def test_every_flag_has_help() -> None:
    parser = stream_bench.build_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--device", "--adapt-steps", "--syncs", "--results"} <= {
        s for a in actions for s in a.option_strings
    }
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
