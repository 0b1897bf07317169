"""Streaming: is decoding and writing hidden behind inference, and is memory flat?

    python -m bench.stream [--bundle BUNDLE] [--frames 10000] [--block 150] [--rounds 3]
                           [--backend auto] [--threads N]

Input: a 1-minute synthetic dashcam drive (900 frames at 15 fps, 256x512, mp4v) written by the
synthetic benchmark's video writer into bench/.work/stream/, reused.
Model: --bundle, or a randomly initialised DeepLab-v2 ResNet-18 at width 16 exported for
256x512 (bench/.work/bundles/, reused and shared with bench.runtime): accuracy is irrelevant
here, trained weights cost the same time.

Speed: backend-only (the Segmenter on frames already decoded into memory) and end-to-end
(`stream`: decode, segment, overlay, write the MP4, label PNGs and JSONL stats) alternate in
blocks of --block frames, --rounds times, in one run, so the shared machine's load hits both
alike. Ratio = end-to-end frames/s / backend-only frames/s; goal >= 0.9.
Memory: resident set size while streaming --frames frames of the looped video with all three
outputs, sampled every 250 frames; growth = last sample - the sample at frame 250 (after
warm-up). Goal: < 50 MB over 10,000 frames.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from adapt_deploy.data.synthetic_writer import SynthSpec, write_benchmark
from adapt_deploy.progress import RichReporter
from adapt_deploy.runtime import Segmenter
from adapt_deploy.stream import Frame, Source, StreamOptions, stream
from adapt_deploy.stream.sources import VideoFile
from bench.common import random_bundle, write_results

WORK = Path(__file__).parent / ".work" / "stream"
VIDEO_SPEC = SynthSpec(
    seed=0, num_source=0, num_target_train=0, num_target_val=0, num_videos=1, video_frames=900
)
RSS_EVERY = 250


def dashcam_video() -> Path:
    """The 1-minute drive (and its label PNGs), written once."""
    data = WORK / "data"
    try:
        write_benchmark(data, VIDEO_SPEC)
    except FileExistsError:  # written by another version of the renderer: this is our cache
        write_benchmark(data, VIDEO_SPEC, force=True)
    return data / "videos" / "drive_00.mp4"


def rss_mb() -> float:
    """This process's resident set size (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class LoopedVideo(Source):
    """`count` frames of a video played again and again, sampling RSS every RSS_EVERY frames."""

    def __init__(self, path: Path, count: int) -> None:
        probe = VideoFile(path)
        super().__init__(f"{path.name} looped", probe.fps, count)
        probe.close()
        self.path, self.count = path, count
        self.rss: list[tuple[int, float]] = []

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        index = 0
        while index < self.count and not stop.is_set():
            video = VideoFile(self.path)
            for frame in video.frames(stop):
                if index % RSS_EVERY == 0:
                    self.rss.append((index, rss_mb()))
                yield Frame(index, index / self.fps, frame.image, frame.captured)
                index += 1
                if index >= self.count:
                    break
            self.skipped += video.skipped
            video.close()
        self.rss.append((index, rss_mb()))


def decoded_frames(path: Path, count: int) -> list[np.ndarray]:
    video = VideoFile(path)
    frames = [f.image for f in itertools.islice(video.frames(threading.Event()), count)]
    video.close()
    return frames


def all_outputs(directory: Path) -> StreamOptions:
    return StreamOptions(
        out=directory / "overlay.mp4",
        labels_dir=directory / "labels",
        stats=directory / "stats.jsonl",
        force=True,  # a rerun replaces the last run's scratch outputs
    )


def measure_speed(seg: Segmenter, video: Path, block: int, rounds: int, scratch: Path) -> dict:
    """Backend-only and end-to-end frames/s in alternating blocks."""
    frames = decoded_frames(video, block)
    for frame in frames[:5]:
        seg(frame)  # warm-up
    backend_s = e2e_s = 0.0
    rows = []
    for r in range(rounds):
        start = time.perf_counter()
        for frame in frames:
            seg(frame)
        backend = time.perf_counter() - start
        options = all_outputs(scratch / f"round{r}")
        options.max_frames = block
        summary = stream(VideoFile(video), seg, options)
        assert summary.frames == block, summary
        backend_s += backend
        e2e_s += summary.seconds
        rows.append((block / backend, summary.fps, summary.latency_ms, summary.infer_ms))
    return {
        "frames": block * rounds,
        "backend_fps": block * rounds / backend_s,
        "e2e_fps": block * rounds / e2e_s,
        "rounds": rows,
    }


def measure_memory(seg: Segmenter, video: Path, count: int, scratch: Path) -> dict:
    """RSS over `count` frames of the looped video with all outputs; a progress bar on stderr
    (the speed blocks run without one, so it costs their ratio nothing)."""
    source = LoopedVideo(video, count)
    summary = stream(source, seg, all_outputs(scratch / "memory"), reporter=RichReporter())
    samples = source.rss
    base = next((mb for i, mb in samples if i >= RSS_EVERY), samples[0][1])
    return {
        "frames": summary.frames,
        "fps": summary.fps,
        "samples": samples,
        "base_mb": base,
        "growth_mb": samples[-1][1] - base,
        "max_growth_mb": max(mb for _, mb in samples) - base,
    }


def render(args: argparse.Namespace, seg: Segmenter, speed: dict, memory: dict) -> str:
    ratio = speed["e2e_fps"] / speed["backend_fps"]
    lines = [
        f"Input: {dashcam_video().relative_to(WORK.parents[2])} (1-minute synthetic drive, "
        "900 frames, 256x512, 15 fps, mp4v). Model: "
        + (f"{args.bundle}" if args.bundle else "random-init DeepLab-v2 ResNet-18, width 16")
        + f", backend {seg.backend} {seg.precision} on {seg.device}. End-to-end writes the "
        "overlay MP4, the label PNGs and the JSONL stats.",
        "",
        "## Speed: end-to-end over backend-only, same run",
        "",
        "| round | backend-only frames/s | end-to-end frames/s | ratio | latency p50 / p95 ms "
        "| inference p50 / p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for i, (backend, e2e, lat, inf) in enumerate(speed["rounds"], 1):
        lines.append(
            f"| {i} | {backend:.1f} | {e2e:.1f} | {e2e / backend:.2f} | "
            f"{lat['p50']:.1f} / {lat['p95']:.1f} | {inf['p50']:.1f} / {inf['p95']:.1f} |"
        )
    lines += [
        f"| all ({speed['frames']} frames each) | {speed['backend_fps']:.1f} | "
        f"{speed['e2e_fps']:.1f} | **{ratio:.2f}** | | |",
        "",
        f"Goal: ratio >= 0.9 — {'met' if ratio >= 0.9 else 'NOT met'}.",
        "",
        f"## Memory: resident set over {memory['frames']} frames (the video looped)",
        "",
        f"RSS at frame {RSS_EVERY}: {memory['base_mb']:.1f} MB; growth to the end: "
        f"**{memory['growth_mb']:+.1f} MB** (largest {memory['max_growth_mb']:+.1f} MB); "
        f"{memory['fps']:.1f} frames/s end-to-end. Goal: < 50 MB over 10,000 frames — "
        + ("met" if memory["growth_mb"] < 50 else "NOT met")
        + (
            f" (measured over {memory['frames']} frames, not 10,000)."
            if memory["frames"] < 10_000
            else "."
        ),
        "",
        "| frame | RSS MB |",
        "|---|---|",
    ]
    step = max(1, len(memory["samples"]) // 12)
    shown = memory["samples"][::step] + ([memory["samples"][-1]] if step > 1 else [])
    lines += [f"| {i} | {mb:.1f} |" for i, mb in dict(shown).items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle to stream (default: random ResNet-18)"
    )
    parser.add_argument("--frames", type=int, default=10_000, help="frames for the RSS run")
    parser.add_argument("--block", type=int, default=150, help="frames per speed block")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times the two kinds of speed block alternate"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="runtime backend: auto, onnxruntime, tensorrt or torch (Segmenter.from_bundle)",
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    video = dashcam_video()
    bundle = args.bundle or random_bundle()
    scratch = Path(tempfile.mkdtemp(prefix="stream-", dir=WORK))
    try:
        with Segmenter.from_bundle(bundle, backend=args.backend, threads=args.threads) as seg:
            speed = measure_speed(seg, video, args.block, args.rounds, scratch)
            print(f"speed: {speed['e2e_fps'] / speed['backend_fps']:.3f} ratio", flush=True)
            memory = measure_memory(seg, video, args.frames, scratch)
            print(f"memory: {memory['growth_mb']:+.1f} MB over {memory['frames']}", flush=True)
            body = render(args, seg, speed, memory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = write_results("stream", "Streaming: pipeline overhead and memory", body)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
