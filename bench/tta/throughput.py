"""Throughput: `adapt-deploy stream`'s pipeline on a video of the stream, without adaptation,
with the background adaptation worker, and with `--adapt-wait` (every due frame's update run
before the next frame)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from adapt_deploy.runtime import Segmenter
from adapt_deploy.stream import StreamOptions, stream
from adapt_deploy.stream.sources import VideoFile
from adapt_deploy.tta.options import AdaptOptions
from bench.tta.conditions import SIZE, Stream
from bench.tta.methods import make_worker


def write_video(
    data: dict[str, tuple[np.ndarray, np.ndarray]], stream: Stream, path: Path, loops: int
) -> Path:
    """`loops` rounds of the stream as an MJPG AVI at the dashcam size 256x512 (the frames
    upscaled), so each run lasts long enough to measure the steady state."""
    size = (2 * SIZE[1], 2 * SIZE[0])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, size)
    for _ in range(loops):
        for name in stream.names:
            for image in data[name][0]:
                big = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                writer.write(cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def stream_fps(
    bundle: Path, video: Path, options: AdaptOptions | None, wait: bool = False
) -> tuple[float, Any]:
    """frames/s of the stream pipeline on `video` (stats written), without adapting (`options`
    None), or adapting in the background or, with `wait`, as `stream --adapt-wait` does; and
    the worker's summary."""
    segmenter = Segmenter.from_bundle(bundle, backend="onnxruntime", precision="fp32")
    worker = make_worker(bundle, segmenter, options, wait) if options is not None else None
    with tempfile.TemporaryDirectory() as tmp, segmenter:
        stats = Path(tmp) / "stats.jsonl"
        summary = stream(
            VideoFile(video), segmenter, StreamOptions(stats=stats), stop=threading.Event(),
            adapter=worker,
        )  # fmt: skip
    return summary.fps, worker.summary if worker else None
