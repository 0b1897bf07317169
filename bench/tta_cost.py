"""What on-device adaptation costs the stream: frames/s with and without `stream --adapt`.

    python -m bench.tta_cost [--backbone resnet101] [--width 64] [--size 512x1024]
                             [--adapt-size HxW] [--backend torch] [--precision auto]
                             [--every 4] [--rounds 3] [--loops 1] [--streams own]
                             [--name tta_cost]

Issue 20's goal: on a GPU, at 1024x512 with ResNet-101, an update every 4th frame costs at most
15% of the stream's frames/s, through the fast torch path (the torch backend: CUDA graphs and
fp16 on CUDA at --precision auto; the adapter's teacher runs at the runtime's precision, its
student under bf16 autocast).

Model: a randomly initialised DeepLab-v2 (--backbone, --width) exported for --size with its
adaptation package (source statistics over 8 synthetic source images; bench/.work/bundles/,
reused): the cost does not depend on the weights, but the adapter's path does, so its BN
statistics are set on those images and its residual branches scaled first
(`bench.common.calibrate_batchnorm`; bench/results/random_model.md: uncalibrated, a random
ResNet-101 overflows fp16, and every push check and pseudo-label would fail). Input:
bench.stream's 1-minute synthetic dashcam drive (900 frames, 256x512, 15 fps), looped --loops
times; the runtime resizes every frame to --size, and the adapter adapts at --size too, or at
--adapt-size (`AdaptOptions.size`: a cheaper update on smaller frames).

Each round streams the video twice, alternating: without adaptation, then with the background
worker at the `stream --adapt` defaults except `every` (--every) and the time budget (1.0: the
worker is never held back, so what is measured is the cost of adapting every k-th frame, not the
budget's cap). A due frame the worker is still busy with is skipped and counted: the report
gives the share of due frames that got their update, so a cost under the goal at a lower rate
is visible as such. Cost = 1 - median frames/s with / median without.

--streams both adds a third run to each round: adapting as releases before 2026-12-07 did, the
updates on the caller's stream, which every frame waits for, and the runtime's stream at the
default priority (ADAPT_DEPLOY_ADAPTER_STREAM=shared, `adapt_deploy/runtime/stream_priority.py`):
what running the updates on a stream of their own is worth. On the CPU the two are the same
code. Writes bench/results/<name>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from adapt_deploy.errors import UserError
from adapt_deploy.runtime import Segmenter
from adapt_deploy.runtime.stream_priority import OWN, SHARED, STREAMS_ENV
from adapt_deploy.stream import StreamOptions, stream
from adapt_deploy.stream.sources import VideoFile
from adapt_deploy.tta.options import AdaptOptions
from adapt_deploy.tta.session import AdaptSetup, open_adaptation
from adapt_deploy.tta.settings import parse_size as parse_hw
from adapt_deploy.tta.worker import AdaptSummary
from bench.common import random_bundle, write_results
from bench.stream import dashcam_video, source_data

GOAL = 0.15
FULL_RATE = 0.9  # the goal holds for "an update every k-th frame": this share of due frames


def fast_precision(backend: str, precision: str) -> str:
    """--precision as the Segmenter gets it: 'auto' on the torch backend is fp16 on CUDA (the
    fast path the goal names), fp32 on the CPU; anything else as given."""
    if precision != "auto" or backend != "torch":
        return precision
    import torch

    return "fp16" if torch.cuda.is_available() else "fp32"


# the runs of a round: (key, adapting, ADAPT_DEPLOY_ADAPTER_STREAM)
ARMS = {
    OWN: (("without", False, OWN), ("with", True, OWN)),
    SHARED: (("without", False, SHARED), ("with", True, SHARED)),
    "both": (("without", False, OWN), ("with", True, OWN), ("with_shared", True, SHARED)),
}


@contextmanager
def adapter_streams(setting: str) -> Iterator[None]:
    """ADAPT_DEPLOY_ADAPTER_STREAM=`setting` inside (read when the segmenter and the adapter
    are built), restored on leaving."""
    before = os.environ.get(STREAMS_ENV)
    os.environ[STREAMS_ENV] = setting
    try:
        yield
    finally:
        if before is None:
            del os.environ[STREAMS_ENV]
        else:
            os.environ[STREAMS_ENV] = before


def measure(
    bundle: Path, video: Path, backend: str, precision: str, options: AdaptOptions | None
) -> tuple[float, AdaptSummary | None, str]:
    """(frames/s of one pass of `stream` over `video`, the worker's summary, what ran: the
    segmenter, and the adapter's teacher when adapting)."""
    with Segmenter.from_bundle(bundle, backend=backend, precision=precision) as seg:
        worker = open_adaptation(bundle, seg, AdaptSetup(options)) if options else None
        with tempfile.TemporaryDirectory() as tmp:
            stats = StreamOptions(stats=Path(tmp) / "stats.jsonl")
            summary = stream(VideoFile(video), seg, stats, stop=threading.Event(), adapter=worker)
        described = f"{seg.backend} {seg.precision} on {seg.device}"
        if worker is not None:
            adapter = worker.adapter
            described += (
                f", the adapter's teacher at {adapter.teacher_precision} and its student at "
                f"{adapter.student_precision}"
            )
    return summary.fps, (worker.summary if worker else None), described


def report(
    model: str,
    segmenter: str,
    options: AdaptOptions,
    fps: dict[str, list[float]],
    worker: AdaptSummary | None,
    video: str,
    partial: str = "",
    shared_worker: AdaptSummary | None = None,
    streams: str = OWN,
) -> str:
    """The Markdown body: frames/s both ways, the cost against the goal, the update rate; with
    `fps['with_shared']` (--streams both) the same for the updates on the caller's stream, and
    what the adapter's own stream is worth. `partial`: how many rounds ran, when the run has not
    finished them all."""
    without, with_ = (statistics.median(fps[k]) for k in ("without", "with"))
    cost = 1 - with_ / without
    rate = update_rate(worker)
    if cost > GOAL:
        verdict = "MISSED"
    elif rate < FULL_RATE:
        verdict = f"not shown: only {100 * rate:.0f}% of due frames got their update"
    else:
        verdict = "met"
    lines = [
        f"Model: {model}. Runtime: {segmenter}. Input: {video}.",
        "",
        *([f"**Stopped early: {partial} ran.**", ""] if partial else []),
        f"Adapter: `stream --adapt` defaults with every={options.every} and budget "
        f"{options.budget:g}"
        + (f", adapting at {options.size[0]}x{options.size[1]}" if options.size else "")
        + (
            ", its updates on the caller's stream (ADAPT_DEPLOY_ADAPTER_STREAM=shared)."
            if streams == SHARED
            else "."
        ),
        "",
        f"- without adaptation: {without:.1f} frames/s (runs: {runs(fps['without'])})",
        f"- with adaptation: {with_:.1f} frames/s (runs: {runs(fps['with'])})",
        f"- cost: {100 * cost:.1f}% of frames/s (goal <= {100 * GOAL:.0f}% with at least "
        f"{100 * FULL_RATE:.0f}% of due frames updated): {verdict}",
    ]
    if worker is not None:
        lines.append(f"- last run: {updates(worker)}")
        lines += [f"- last run's worker: {line}" for line in worker.lines()]
    if fps.get("with_shared"):
        shared = statistics.median(fps["with_shared"])
        lines += [
            "",
            "The same with the updates on the caller's stream, which each frame waits for, and "
            "the runtime's stream at the default priority (ADAPT_DEPLOY_ADAPTER_STREAM=shared: "
            "as before 2026-12-07):",
            "",
            f"- with adaptation: {shared:.1f} frames/s (runs: {runs(fps['with_shared'])}), "
            f"cost {100 * (1 - shared / without):.1f}%",
            *([f"- last run: {updates(shared_worker)}"] if shared_worker is not None else []),
            f"- the adapter's own stream: {with_ - shared:+.1f} frames/s "
            f"({100 * (with_ - shared) / without:+.1f}% of the frames/s without adaptation)",
        ]
    return "\n".join(lines)


def update_rate(worker: AdaptSummary | None) -> float:
    """The share of due frames that got their update (0 without a worker or a due frame)."""
    return worker.adapted / worker.due if worker is not None and worker.due else 0.0


def updates(worker: AdaptSummary) -> str:
    """'N updates on M due frames (P%; S skipped busy)'."""
    return (
        f"{worker.adapted} updates on {worker.due} due frames "
        f"({100 * update_rate(worker):.0f}%; {worker.skipped_busy} skipped busy)"
    )


def runs(values: list[float]) -> str:
    """The frames/s of each run, '91.2, 90.8'."""
    return ", ".join(f"{v:.1f}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tta_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--backbone", default="resnet101", help="resnet18, resnet50, resnet101")
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64: the standard)")
    parser.add_argument("--size", default="512x1024", help="HxW the runtime and adapter run at")
    parser.add_argument(
        "--adapt-size", default=None, help="HxW the adapter runs at instead (default: --size)"
    )
    parser.add_argument("--backend", default="torch", help="Segmenter backend (torch: fast path)")
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto: fp16 on CUDA on the torch backend (the fast path; the Segmenter's own auto "
        "is fp32 there), else the Segmenter's auto; or fp32, fp16, bf16",
    )
    parser.add_argument("--every", type=int, default=4, help="adapt on every k-th frame")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs")
    parser.add_argument("--loops", type=int, default=1, help="passes over the video per run")
    parser.add_argument(
        "--streams",
        choices=tuple(ARMS),
        default=OWN,
        help="where the adapter's updates run: own (its own CUDA stream, the release's), shared "
        "(the caller's stream, as before 2026-12-07), or both: a third run per round, the two "
        "compared",
    )
    parser.add_argument("--name", default="tta_cost", help="bench/results/NAME.md")
    return parser


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'HxW' → (H, W) (bench.tta's --set size parser, without its 'none'); ValueError naming
    `flag` else."""
    try:
        size = parse_hw(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if size is None:
        raise ValueError(f"{flag}: expected HxW, e.g. 512x1024, got {text!r}")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
        adapt_size = parse_size(args.adapt_size, "--adapt-size") if args.adapt_size else None
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.every, args.rounds, args.loops) < 1:
        parser.error("--every, --rounds and --loops must be at least 1")
    print("input video and source images (rendered on the first run only)", flush=True)
    video = dashcam_video()
    bundle = random_bundle(args.width, size, source_data(), backbone=args.backbone)
    model = (
        f"random-init DeepLab-v2 {args.backbone}, width {args.width}, {size[0]}x{size[1]}, "
        "BN calibrated on the source images"
    )
    options = replace(AdaptOptions(), every=args.every, budget=1.0, size=adapt_size)
    precision = fast_precision(args.backend, args.precision)
    fps: dict[str, list[float]] = {key: [] for key, _, _ in ARMS[args.streams]}
    workers: dict[str, AdaptSummary | None] = {}
    title = "On-device adaptation: what it costs the stream"
    described = f"{video.name} x{args.loops}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            looped = loop_video(video, args.loops, Path(tmp))
            for r in range(args.rounds):
                for key, adapting, setting in ARMS[args.streams]:
                    with adapter_streams(setting):
                        value, workers[key], described_run = measure(
                            bundle, looped, args.backend, precision, options if adapting else None
                        )
                    fps[key].append(value)
                    if key == "with":
                        segmenter = described_run
                print(
                    f"round {r + 1}/{args.rounds}: "
                    + " → ".join(f"{fps[key][-1]:.1f}" for key in fps)
                    + f" frames/s ({', '.join(fps)})",
                    flush=True,
                )
                # written after every round: a run stopped by a time limit keeps what it measured
                rounds = f"{r + 1} of {args.rounds} rounds" if r + 1 < args.rounds else ""
                body = report(
                    model,
                    segmenter,
                    options,
                    fps,
                    workers["with"],
                    described,
                    rounds,
                    workers.get("with_shared"),
                    args.streams,
                )
                path = write_results(args.name, title, body)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(body)
    print(f"wrote {path}")
    return 0


def loop_video(video: Path, loops: int, directory: Path) -> Path:
    """`video` itself for one loop, else `loops` copies of it in one file (OpenCV, mp4v), copied
    frame by frame so the video is never held in memory."""
    if loops == 1:
        return video
    import cv2

    out = directory / f"looped{video.suffix}"
    writer = None
    for _ in range(loops):
        capture = cv2.VideoCapture(str(video))
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if writer is None:
                fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
                size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
            writer.write(frame)
        capture.release()
    if writer is None:
        raise UserError(f"{video}: no frame could be read")
    writer.release()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
