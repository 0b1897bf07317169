"""`adapt-deploy stream`'s entry points: `stream` runs a source through a segmenter, `run_stream`
is the CLI's path from a source spec and a bundle, stopped cleanly by SIGINT or SIGTERM.

Both check the options and every destination before anything is written, then hand the frames to
the three stages of `stream.engine`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from adapt_deploy.errors import UserError
from adapt_deploy.progress import Reporter
from adapt_deploy.signals import SignalStop
from adapt_deploy.stream.destinations import Inputs, check_destinations
from adapt_deploy.stream.engine import SegmenterLike, run_stages
from adapt_deploy.stream.options import StreamOptions
from adapt_deploy.stream.outputs import check_writable
from adapt_deploy.stream.sources import Source, open_source
from adapt_deploy.stream.summary import StreamSummary

if TYPE_CHECKING:
    from adapt_deploy.tta.session import AdaptSetup
    from adapt_deploy.tta.worker import AdaptWorker


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
    return run_stages(source, segmenter, options, reporter, stop, adapter)


def _check(options: StreamOptions, inputs: Inputs) -> None:
    """The options' values and every destination, before anything is written."""
    options.check()
    check_destinations(options.out, options.labels_dir, options.stats, inputs, options.force)
    check_writable(options.out, options.labels_dir, options.stats)


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
            if adapt.wait and source.live and reporter is not None:
                reporter.log(
                    "adaptation: --adapt-wait on a live source: the frames that arrive during "
                    "an update are dropped (counted in the summary)"
                )
    except BaseException:
        source.close()
        if segmenter is not None:
            segmenter.close()
        raise
    with segmenter, SignalStop() as signals:
        summary = run_stages(source, segmenter, options, reporter, signals.event, worker)
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
