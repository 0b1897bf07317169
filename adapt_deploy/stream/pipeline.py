"""`adapt-deploy stream`: decode, segment and write in three overlapping stages.

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
it has no time for are skipped and counted); its events go to the stats file.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter
from adapt_deploy.runtime.selection import parse_device
from adapt_deploy.signals import SignalStop
from adapt_deploy.stream.channel import Channel
from adapt_deploy.stream.destinations import Inputs, check_destinations
from adapt_deploy.stream.outputs import StreamOutputs, check_writable
from adapt_deploy.stream.sources import Frame, Source, open_source

if TYPE_CHECKING:
    from adapt_deploy.tta.session import AdaptSetup
    from adapt_deploy.tta.worker import AdaptWorker

LATENCY_WINDOW = 100_000  # latency percentiles are over the last this many frames


class SegmenterLike(Protocol):
    """What the pipeline needs of `adapt_deploy.runtime.Segmenter`."""

    classes: list[str]
    palette: np.ndarray

    def __call__(self, frame: np.ndarray) -> Any: ...


@dataclass
class StreamOptions:
    """The options of `adapt-deploy stream` (see its --help)."""

    out: Path | None = None
    labels_dir: Path | None = None
    stats: Path | None = None
    backend: str = "auto"
    precision: str = "auto"
    max_frames: int | None = None
    show: bool = False
    alpha: float = 0.5
    fps: float | None = None  # of an image folder, or of a source that does not say
    reconnect_timeout: float = 30.0
    queue_size: int = 2  # frames waiting between two stages; more only adds latency
    device: int | str = 0  # a GPU index, "cuda:N" or "cpu", as Segmenter.from_bundle takes
    force: bool = False  # replace outputs that already exist (never an input)
    cuda_graph: bool | None = None  # replay CUDA graphs (None: the backend's default)

    def check(self) -> None:
        """UserError naming the option when a value is out of range."""
        parse_device(self.device, "--device")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise UserError(f"--fps must be positive, got {self.fps}")
        if self.reconnect_timeout < 0:
            raise UserError(f"--reconnect-timeout must be >= 0, got {self.reconnect_timeout}")


@dataclass
class StreamSummary:
    """What a stream did: frame counts, rates, latencies, outputs and why it ended."""

    source: str
    live: bool
    frames: int = 0  # segmented and written
    decoded: int = 0
    dropped: int = 0  # live: decoded, then replaced by a newer frame before inference
    skipped: int = 0  # could not be decoded
    resized: int = 0  # written to the overlay video at another size than the first frame's
    reconnects: int = 0
    lost: bool = False  # a live source that did not come back
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # decode → labels: p50, p95
    infer_ms: dict[str, float] = field(default_factory=dict)  # the backend's own: p50, p95
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "window", or None (ran to its end)
    signal: int | None = None  # the number of the signal that stopped it
    outputs: dict[str, str] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)  # frames found in each output
    adaptation: list[str] = field(default_factory=list)  # the adapter's summary lines

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The summary as printed by the CLI."""
        lines = [
            f"{self.frames} frames from {self.source} in {self.seconds:.1f} s: "
            f"{self.fps:.1f} frames/s ({self.decoded} decoded, {self.dropped} dropped, "
            f"{self.skipped} unreadable skipped)",
            f"latency decode→labels p50 {self.latency_ms.get('p50', 0):.1f} ms, "
            f"p95 {self.latency_ms.get('p95', 0):.1f} ms; inference p50 "
            f"{self.infer_ms.get('p50', 0):.1f} ms, p95 {self.infer_ms.get('p95', 0):.1f} ms",
        ]
        if self.live:
            lines.append(f"reconnects: {self.reconnects}" + (" (then lost)" if self.lost else ""))
        if self.resized:
            lines.append(f"{self.resized} frames of another size resized into the overlay video")
        lines += self.adaptation
        for name, path in self.outputs.items():
            count = self.written.get(name)
            lines.append(f"{name}: {path}" + (f" ({count} frames written)" if count else ""))
        if self.stopped_by:
            lines.append(f"stopped by {self.stopped_by}: the outputs hold every frame done so far")
        return lines


def stream(
    source: Source,
    segmenter: SegmenterLike,
    options: StreamOptions | None = None,
    reporter: Reporter | None = None,
    stop: threading.Event | None = None,
    adapter: AdaptWorker | None = None,
) -> StreamSummary:
    """Run `source` through `segmenter` into the outputs of `options`; closes `source`.

    `stop` (set from another thread or a signal handler) ends the stream cleanly; it is set on
    return, so a live source waiting to reconnect gives up at once. `adapter` (started and
    closed here, its last events written) adapts the segmenter's model on the frames; saving
    its state is the caller's (`tta.session.finish_adaptation`).
    """
    options = options or StreamOptions()
    _check(options, source.inputs)
    return _stream(source, segmenter, options, reporter, stop, adapter)


def _check(options: StreamOptions, inputs: Inputs) -> None:
    """The options' values and every destination, before anything is written."""
    options.check()
    check_destinations(options.out, options.labels_dir, options.stats, inputs, options.force)
    check_writable(options.out, options.labels_dir, options.stats)


def _stream(
    source: Source,
    segmenter: SegmenterLike,
    options: StreamOptions,
    reporter: Reporter | None,
    stop: threading.Event | None,
    adapter: AdaptWorker | None,
) -> StreamSummary:
    """`stream` with `options` already checked."""
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
    summary.latency_ms = _percentiles(latency)
    summary.infer_ms = _percentiles(infer)


def _percentiles(seconds: deque[float]) -> dict[str, float]:
    values = [s for s in seconds if s == s]  # drop NaN
    if not values:
        return {}
    ms = np.asarray(values) * 1000.0
    return {
        "p50": float(statistics.median(ms.tolist())),
        "p95": float(np.percentile(ms, 95)),
    }


def run_stream(
    spec: str,
    bundle: Path,
    options: StreamOptions,
    reporter: Reporter | None = None,
    adapt: AdaptSetup | None = None,
) -> StreamSummary:
    """The CLI path: check the outputs, open the source and bundle (and the adapter, with
    `adapt`), stream until the end or a signal. `summary.stopped_by` names the signal that
    ended it, if one did. A source that yields no frame is a UserError."""
    from adapt_deploy.runtime import Segmenter

    options.check()
    source = open_source(spec, options.fps, options.reconnect_timeout)
    segmenter = worker = None
    try:
        _check(options, source.inputs.with_folder(bundle))
        if adapt is not None:
            from adapt_deploy.tta.session import check_state_path

            check_state_path(adapt.state)
        segmenter = Segmenter.from_bundle(
            bundle,
            backend=options.backend,
            device=options.device,
            precision=options.precision,
            cuda_graph=options.cuda_graph,
        )
        for note in segmenter.notes if reporter is not None else ():
            reporter.log(f"runtime: {note}")
        if adapt is not None:
            from adapt_deploy.tta.session import open_adaptation

            worker = open_adaptation(bundle, segmenter, adapt, reporter)
    except BaseException:
        source.close()
        if segmenter is not None:
            segmenter.close()
        raise
    with segmenter, SignalStop() as signals:
        summary = _stream(source, segmenter, options, reporter, signals.event, worker)
    if summary.frames == 0 and signals.signum is None and summary.stopped_by is None:
        _no_frames(spec, summary)
    if worker is not None and adapt is not None:
        from adapt_deploy.tta.session import finish_adaptation

        summary.adaptation = finish_adaptation(worker, adapt, summary.frames)
    if signals.signum is not None:
        summary.signal = signals.signum
        summary.stopped_by = signal.Signals(signals.signum).name
    return summary


def _no_frames(spec: str, summary: StreamSummary) -> None:
    """UserError for a stream that segmented nothing (its outputs were discarded unwritten)."""
    raise UserError(
        f"{spec}: no usable frames ({summary.decoded} decoded, {summary.skipped} unreadable); "
        "nothing was written"
    )
