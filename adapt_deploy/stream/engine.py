"""The stream's three overlapping stages: decode, segment, and render-and-write.

    reader thread ──Channel──▶ inference thread ──Channel──▶ calling thread: render, write, show

Files and folders go through bounded channels: every frame is processed, in order, and a slow
stage holds the others back. For live sources the reader's channel holds one frame that a newer
one replaces (newest wins; the replaced frames are counted as dropped). A stop (Ctrl-C, SIGTERM,
`q` in the window) ends reading, starts no new inference, writes what is already segmented and
releases the video, so the output plays. Outputs are written under temporary names and renamed
into place at the end (`stream.outputs`): a stream that fails or segments nothing leaves what
was there before.

With adaptation (`adapter`, a `tta.worker.AdaptWorker`), the inference thread offers each
segmented frame to the adapter's background worker, which never holds inference up (frames
it has no time for are skipped and counted), or, with `--adapt-wait`, runs each due frame's
update itself before it takes the next frame; its events go to the stats file.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from adapt_deploy.channel import Channel
from adapt_deploy.progress import Reporter
from adapt_deploy.stream.options import StreamOptions
from adapt_deploy.stream.outputs import StreamOutputs
from adapt_deploy.stream.sources import Frame, Source
from adapt_deploy.stream.summary import LATENCY_WINDOW, StreamSummary, percentiles

if TYPE_CHECKING:
    from adapt_deploy.tta.worker import AdaptWorker


class SegmenterLike(Protocol):
    """What the pipeline needs of `adapt_deploy.runtime.Segmenter`."""

    classes: list[str]
    palette: np.ndarray

    def __call__(self, frame: np.ndarray) -> Any: ...


def run_stages(
    source: Source,
    segmenter: SegmenterLike,
    options: StreamOptions,
    reporter: Reporter | None,
    stop: threading.Event | None,
    adapter: AdaptWorker | None,
) -> StreamSummary:
    """`stream.pipeline.stream` with `options` already checked: the reader and inference
    threads, and the writing in this thread; closes `source`."""
    reporter = reporter or Reporter()
    stop = stop or threading.Event()
    summary = StreamSummary(source.name, source.live)
    frames: Channel[Frame] = Channel(
        1 if source.live else options.queue_size, newest_wins=source.live
    )
    results: Channel[tuple[Frame, Any, float]] = Channel(options.queue_size)
    errors: list[BaseException] = []
    decoded = [0]
    reader = threading.Thread(
        target=_read,
        args=(source, frames, stop, options.max_frames, decoded, errors),
        name="stream-reader",
        daemon=True,  # a camera read can block; it must not keep the process alive
    )
    infer = threading.Thread(
        target=_infer,
        args=(segmenter, frames, results, stop, options.max_frames, errors, adapter),
        name="stream-inference",
        daemon=True,
    )
    outputs = None
    done = False
    start = time.perf_counter()
    try:
        outputs = StreamOutputs(
            options.out, options.labels_dir, options.stats, options.show, options.alpha,
            source.fps, segmenter.classes, segmenter.palette,
        )  # fmt: skip
        if adapter is not None:
            adapter.start()
        reader.start()
        infer.start()
        _write_all(results, outputs, summary, source, options, reporter, stop, adapter)
        done = True
    finally:
        stop.set()  # a live source reconnecting waits on it: the reader ends now, not later
        frames.close()
        results.close()
        if infer.ident is not None:
            infer.join()
        if adapter is not None:  # for a failed stream; after _write_all's close it does not wait
            adapter.close()
        summary.seconds = time.perf_counter() - start
        complete = done and not errors and summary.frames > 0
        if outputs is not None and not complete:  # what was at the outputs' paths stays
            outputs.discard()
        if reader.ident is not None:
            reader.join(timeout=5.0)
        if not reader.is_alive():  # else it is stuck in a device read: leave the device to it
            source.close()
    if errors:
        raise errors[0]
    assert outputs is not None
    if complete:  # the video is counted, then every output is renamed into place
        outputs.finish()
    summary.decoded = decoded[0]
    summary.dropped = frames.dropped
    summary.skipped = source.skipped
    summary.reconnects = source.reconnects
    summary.lost = source.lost
    summary.resized = outputs.video.resized if outputs.video else 0
    summary.outputs = outputs.paths if summary.frames > 0 else {}
    summary.written = outputs.written()
    return summary


def _read(
    source: Source,
    frames: Channel[Frame],
    stop: threading.Event,
    max_frames: int | None,
    decoded: list[int],
    errors: list[BaseException],
) -> None:
    """Decode into `frames` until the source ends, a stop, or `max_frames` (files)."""
    try:
        for frame in source.frames(stop):
            decoded[0] += 1
            if not frames.put(frame):
                break
            if not source.live and max_frames and decoded[0] >= max_frames:
                break
    except BaseException as exc:
        errors.append(exc)
    finally:
        frames.close()


def _infer(
    segmenter: SegmenterLike,
    frames: Channel[Frame],
    results: Channel[tuple[Frame, Any, float]],
    stop: threading.Event,
    max_frames: int | None,
    errors: list[BaseException],
    adapter: AdaptWorker | None = None,
) -> None:
    """Segment frames until the reader ends, a stop or `max_frames`; no new frame after a stop."""
    done = 0
    try:
        while not stop.is_set() and (frame := frames.get()) is not None:
            segmentation = segmenter(frame.image)
            if adapter is not None:
                adapter.offer(frame.image, segmentation.presence, frame.index)
            if not results.put((frame, segmentation, time.perf_counter())):
                break
            done += 1
            if max_frames and done >= max_frames:
                break
    except BaseException as exc:
        errors.append(exc)
    finally:
        frames.close()
        results.close()


def _write_all(
    results: Channel[tuple[Frame, Any, float]],
    outputs: StreamOutputs,
    summary: StreamSummary,
    source: Source,
    options: StreamOptions,
    reporter: Reporter,
    stop: threading.Event,
    adapter: AdaptWorker | None = None,
) -> None:
    """The calling thread's stage: outputs, progress, latency statistics, adaptation events."""
    total = None if source.live else source.total
    if options.max_frames:
        total = min(total or options.max_frames, options.max_frames)
    latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
    infer: deque[float] = deque(maxlen=LATENCY_WINDOW)
    shown, start = 0, time.perf_counter()
    with reporter.task(f"streaming {source.name}", total):
        while (item := results.get()) is not None:
            frame, segmentation, done = item
            latency.append(done - frame.captured)
            infer.append(float(segmentation.timings.get("total", float("nan"))))
            if not outputs.write(frame.index, frame.timestamp, frame.image, segmentation,
                                 latency[-1], infer[-1]):  # fmt: skip
                stop.set()
                summary.stopped_by = "window"
            if adapter is not None:
                outputs.events(adapter.events())
            summary.frames += 1
            position = summary.frames if source.live else frame.index + 1
            rate = summary.frames / max(time.perf_counter() - start, 1e-9)
            reporter.advance(position - shown, status=f"{rate:.1f} frames/s")
            shown = position
    if adapter is not None:  # let the last update finish so its events reach the stats file
        adapter.close()
        outputs.events(adapter.events())
    summary.latency_ms = percentiles(latency)
    summary.infer_ms = percentiles(infer)
