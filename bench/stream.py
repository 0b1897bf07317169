"""Streaming: is decoding and writing hidden behind inference, and is memory flat?

    python -m bench.stream [--bundle BUNDLE] [--frames 10000] [--block 150] [--rounds 3]
                           [--backend auto] [--device auto] [--threads N]
                           [--adapt-steps 8] [--syncs 3] [--results DIR]

Input: a 1-minute synthetic dashcam drive (900 frames at 15 fps, 256x512, mp4v) written by the
synthetic benchmark's video writer into bench/.work/stream/, reused.
Model: --bundle, or a randomly initialised DeepLab-v2 ResNet-18 at width 16 exported for
256x512 with its adaptation package (source statistics over 8 synthetic source images, its BN
statistics set on them: `bench.common.calibrate_batchnorm`; bench/.work/bundles/, reused):
accuracy is irrelevant here, trained weights cost the same time.
--backend and --device go to Segmenter.from_bundle (device auto: GPU 0 where the backend can use
it, else the CPU; cuda, cuda:N or cpu to insist).

Speed: backend-only (the Segmenter on frames already decoded into memory) and end-to-end
(`stream`: decode, segment, overlay, write the MP4, label PNGs and JSONL stats) alternate in
blocks of --block frames, --rounds times, in one run, so the shared machine's load hits both
alike. Ratio = end-to-end frames/s / backend-only frames/s; goal >= 0.9.
Memory: resident set size while streaming --frames frames of the looped video with all three
outputs, sampled every 250 frames; growth = last sample - the sample at frame 250 (after
warm-up). Goal: < 50 MB over 10,000 frames.
On-device adaptation (what `stream --adapt` adds; --adapt-steps 0 --syncs 0 skip it): the
bundle's OnlineAdapter, at the `stream --adapt` defaults, on the Segmenter's device, timed over
--adapt-steps updates (`OnlineAdapter.step` on the drive's frames) and --syncs pushes of its
teacher into the running Segmenter (`make_sync(...).push`: a new torch backend or ONNX Runtime
session, checked on the bundle's samples), after 2 and 1 untimed; medians (CUDA synchronised).
Writes bench/results/stream.md (--results DIR elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapt_deploy.data.synthetic.writer import SynthSpec, write_benchmark
from adapt_deploy.errors import UserError
from adapt_deploy.progress import RichReporter
from adapt_deploy.runtime import Segmenter
from adapt_deploy.stream import Frame, Source, StreamOptions, stream
from adapt_deploy.stream.sources import VideoFile
from bench.common import RESULTS, random_bundle, write_results

WORK = Path(__file__).parent / ".work" / "stream"
VIDEO_SPEC = SynthSpec(
    seed=0, num_source=0, num_target_train=0, num_target_val=0, num_videos=1, video_frames=900
)
# The labelled source images of the random bundle's adaptation package.
SOURCE_SPEC = SynthSpec(
    seed=0, num_source=8, num_target_train=0, num_target_val=0, num_videos=0, video_frames=1
)
RSS_EVERY = 250
ADAPT_WARMUP, SYNC_WARMUP = 2, 1  # untimed updates and pushes first (CUDA and cuDNN set-up)


def dashcam_video() -> Path:
    """The 1-minute drive (and its label PNGs), written once."""
    data = WORK / "data"
    try:
        write_benchmark(data, VIDEO_SPEC)
    except FileExistsError:  # written by another version of the renderer: this is our cache
        write_benchmark(data, VIDEO_SPEC, force=True)
    return data / "videos" / "drive_00.mp4"


def source_data() -> Path:
    """8 labelled GTA5-layout source images for the random bundle's adaptation package."""
    root = WORK / "source"
    try:
        write_benchmark(root, SOURCE_SPEC)
    except FileExistsError:  # written by another version of the renderer: this is our cache
        write_benchmark(root, SOURCE_SPEC, force=True)
    return root / "source"


def describe_video(path: Path) -> str:
    """The video's path (relative to the repository when inside it), frames, size and rate."""
    video = VideoFile(path)
    try:
        first = next(video.frames(threading.Event()), None)
        size = "" if first is None else f", {first.image.shape[0]}x{first.image.shape[1]}"
        return f"{_shown(path)} ({video.total} frames{size}, {video.fps:g} fps)"
    finally:
        video.close()


def _shown(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


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


def measure_adapter(
    seg: Segmenter, bundle: Path, frames: list[np.ndarray], steps: int, syncs: int
) -> dict[str, Any]:
    """Update and sync times of the bundle's on-device adapter as `stream --adapt` opens it
    (`open_adaptation`: its default options, on `seg`'s GPU where torch reaches it): `steps`
    updates and `syncs` pushes of its teacher into `seg` (after untimed ones). UserError when
    the bundle has no adaptation package."""
    import torch

    from adapt_deploy.bundle.meta import load_meta
    from adapt_deploy.tta.options import AdaptOptions
    from adapt_deploy.tta.session import AdaptSetup, open_adaptation

    meta = load_meta(bundle)
    threads = torch.get_num_threads()
    worker = open_adaptation(bundle, seg, AdaptSetup(AdaptOptions()))
    adapter, sync = worker.adapter, worker.sync
    device = str(adapter.device)

    def timed(call: Callable[[], Any]) -> tuple[float, Any]:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = call()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, result

    try:
        updates = [
            timed(lambda i=i: adapter.step(frames[i % len(frames)]))
            for i in range(ADAPT_WARMUP + steps)
        ][ADAPT_WARMUP:]
        pushes = []
        if syncs > 0 and sync is not None:
            pushes = [
                timed(lambda: sync.push(adapter.teacher)) for _ in range(SYNC_WARMUP + syncs)
            ][SYNC_WARMUP:]
    finally:
        worker.close()
        torch.set_num_threads(threads)  # AdaptOptions.threads sets the process-wide count
    failed = [r.reason for _, r in pushes if not r.ok]
    return {
        "device": device,
        "size": adapter.size,
        "params": adapter.options.params,
        "trainable": sum(p.numel() for p in adapter.trainable),
        "update_ms": [t * 1000 for t, _ in updates],
        "resets": sum(r.reset is not None for _, r in updates),  # back to the source weights
        "sync_ms": [t * 1000 for t, _ in pushes],
        "sync_ok": len(pushes) - len(failed),
        "sync_failures": failed,
        "samples": len(meta["samples"]),
    }


def _stats_row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | 0 | | | |"
    return (
        f"| {name} | {len(values)} | {statistics.median(values):.1f} | {min(values):.1f} | "
        f"{max(values):.1f} |"
    )


def render_adapter(seg: Segmenter, adapter: dict[str, Any] | str | None) -> list[str]:
    """The on-device adaptation section: the timings, or why there are none."""
    lines = ["", "## On-device adaptation: update and sync times", ""]
    if adapter is None:
        return [*lines, "Not measured (--adapt-steps 0 --syncs 0)."]
    if isinstance(adapter, str):
        return [*lines, f"Not measured: {adapter}"]
    height, width = adapter["size"]
    how = {
        "torch": "a new torch backend on the device",
        "onnxruntime": "a rebuilt ONNX Runtime session",
        "tensorrt": "a refit of the standby engine",
    }.get(seg.backend, seg.backend)
    lines += [
        f"The bundle's OnlineAdapter at the `stream --adapt` defaults (params {adapter['params']}: "
        f"{adapter['trainable']:,} trained values) on **{adapter['device']}**, frames at "
        f"{height}x{width}; each push puts its teacher into the running {seg.backend} Segmenter "
        f"({how}), checked on the bundle's {adapter['samples']} samples first. "
        f"{ADAPT_WARMUP} updates and {SYNC_WARMUP} push untimed first; medians.",
        "",
        "| what | count | median ms | min ms | max ms |",
        "|---|---|---|---|---|",
        _stats_row("update (`OnlineAdapter.step`)", adapter["update_ms"]),
        _stats_row("sync (`push`, checked and swapped in)", adapter["sync_ms"]),
        "",
        f"{adapter['sync_ok']} of {len(adapter['sync_ms'])} timed pushes went live; "
        f"{adapter['resets']} of the timed updates ended in a reset to the source weights "
        "(the collapse check; a reset adds the reload to that update).",
    ]
    lines += [f"- a push was refused: {reason}" for reason in adapter["sync_failures"]]
    return lines


def render(
    model: str,
    video: str,
    seg: Segmenter,
    speed: dict,
    memory: dict,
    adapter: dict[str, Any] | str | None = None,
) -> str:
    ratio = speed["e2e_fps"] / speed["backend_fps"]
    lines = [
        f"Input: {video}, a synthetic drive (mp4v). Model: {model}, backend {seg.backend} "
        f"{seg.precision} on {seg.device}. End-to-end writes the overlay MP4, the label PNGs "
        "and the JSONL stats.",
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
    lines += render_adapter(seg, adapter)
    return "\n".join(lines) + "\n"


@dataclass
class StreamRun:
    """A run's results file, its Markdown and the measurements behind it (adapter: the timings,
    the reason they are missing, or None when not asked for)."""

    path: Path
    body: str
    speed: dict[str, Any]
    memory: dict[str, Any]
    adapter: dict[str, Any] | str | None


def run(
    bundle: Path,
    video: Path,
    model: str,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    block: int = 150,
    rounds: int = 3,
    frames: int = 10_000,
    adapt_steps: int = 8,
    syncs: int = 3,
    results: Path = RESULTS,
    work: Path = WORK,
) -> StreamRun:
    """Measure, write <results>/stream.md and return what was measured; the stream's outputs
    go to a scratch directory under `work`, removed at the end."""
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="stream-", dir=work))
    chosen: int | str = 0 if device == "auto" else device  # 0: GPU 0 where usable, else CPU
    try:
        with Segmenter.from_bundle(bundle, backend=backend, device=chosen, threads=threads) as seg:
            print(f"segmenter: {seg.backend} {seg.precision} on {seg.device}", flush=True)
            speed = measure_speed(seg, video, block, rounds, scratch)
            print(f"speed: {speed['e2e_fps'] / speed['backend_fps']:.3f} ratio", flush=True)
            memory = measure_memory(seg, video, frames, scratch)
            print(f"memory: {memory['growth_mb']:+.1f} MB over {memory['frames']}", flush=True)
            adapter: dict[str, Any] | str | None = None
            if adapt_steps > 0 or syncs > 0:
                print(f"adapter: {adapt_steps} updates, {syncs} syncs", flush=True)
                shots = decoded_frames(video, max(adapt_steps, 1) + ADAPT_WARMUP)
                try:
                    adapter = measure_adapter(seg, bundle, shots, adapt_steps, syncs)
                except UserError as exc:  # a bundle without an adaptation package
                    adapter = str(exc)
                print(f"adapter: {_adapter_line(adapter)}", flush=True)
            body = render(model, describe_video(video), seg, speed, memory, adapter)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = write_results("stream", "Streaming: pipeline overhead and memory", body, results)
    return StreamRun(path, body, speed, memory, adapter)


def _adapter_line(adapter: dict[str, Any] | str) -> str:
    """The progress line of the adapter timings."""
    if isinstance(adapter, str):
        return f"not measured: {adapter}"
    update, sync = (
        statistics.median(adapter[k] or [float("nan")]) for k in ("update_ms", "sync_ms")
    )
    return f"update {update:.1f} ms, sync {sync:.1f} ms (medians) on {adapter['device']}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None,
        help="bundle to stream (default: random ResNet-18 with an adaptation package)",
    )  # fmt: skip
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
    parser.add_argument(
        "--device", default="auto",
        help="auto (GPU 0 where the backend can use it, else the CPU), cuda, cuda:N or cpu",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    parser.add_argument(
        "--adapt-steps", type=int, default=8, help="timed on-device adapter updates (0: none)"
    )
    parser.add_argument(
        "--syncs", type=int, default=3, help="timed pushes of the adapted weights (0: none)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where stream.md goes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.frames, args.block, args.rounds) < 1 or min(args.adapt_steps, args.syncs) < 0:
        print("error: --frames, --block and --rounds must be >= 1, --adapt-steps and --syncs "
              ">= 0", file=sys.stderr)  # fmt: skip
        return 2
    print("input video (rendered on the first run only)", flush=True)
    video = dashcam_video()
    if args.bundle is not None:
        bundle, model = args.bundle, str(args.bundle)
    else:
        print("random bundle with an adaptation package (exported on the first run)", flush=True)
        bundle = random_bundle(source=source_data())
        model = "random-init DeepLab-v2 ResNet-18, width 16, BN calibrated on the source images"
    try:
        done = run(
            bundle, video, model, backend=args.backend, device=args.device,
            threads=args.threads, block=args.block, rounds=args.rounds, frames=args.frames,
            adapt_steps=args.adapt_steps, syncs=args.syncs, results=args.results,
        )  # fmt: skip
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(done.body)
    print(f"wrote {done.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
