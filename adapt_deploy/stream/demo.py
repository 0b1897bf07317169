"""The demo's last step: export the adapted model and stream a synthetic dashcam video through it.

Both steps are reused when run again (not with `fresh`): the bundle while it was exported from
the same checkpoint, the overlay while it was made from the same bundle and video.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from adapt_deploy.atomic import atomic_write_json
from adapt_deploy.bundle.meta import load_meta, sha256_file
from adapt_deploy.progress import Reporter
from adapt_deploy.stream.options import StreamOptions
from adapt_deploy.stream.pipeline import stream
from adapt_deploy.stream.sources import open_source
from adapt_deploy.stream.summary import StreamSummary


def export_demo_bundle(
    checkpoint: Path, bundle: Path, reporter: Reporter, fresh: bool = False
) -> tuple[Path, bool]:
    """(`bundle` exported from `checkpoint`, whether an earlier export was reused: one that
    already holds that checkpoint, unless `fresh`)."""
    from adapt_deploy.export.pipeline import export_bundle

    exported = (bundle / "meta.json").is_file() and load_meta(bundle)["checkpoint"]["sha256"]
    if not fresh and exported == sha256_file(checkpoint):
        reporter.log(f"  reusing the bundle in {bundle}")
        return bundle, True
    return export_bundle(checkpoint, bundle, force=True, reporter=reporter).bundle, False


def stream_demo_video(
    checkpoint: Path,
    video: Path,
    out: Path,
    reporter: Reporter | None = None,
    fresh: bool = False,
) -> tuple[StreamSummary, bool]:
    """Export `checkpoint` to OUT/bundle and stream `video` to OUT/stream/overlay.mp4 (with
    stats.jsonl and summary.json beside it); the summary, and whether both steps were reused
    from an earlier run (never with `fresh`)."""
    from adapt_deploy.runtime import Segmenter

    reporter = reporter or Reporter()
    bundle, reused = export_demo_bundle(Path(checkpoint), Path(out) / "bundle", reporter, fresh)
    directory = Path(out) / "stream"
    overlay, summary_file = directory / "overlay.mp4", directory / "summary.json"
    made_from = {"bundle": sha256_file(bundle / "meta.json"), "video": sha256_file(video)}
    if not fresh and overlay.is_file() and summary_file.is_file():
        saved = _saved_summary(summary_file, made_from)
        if saved is not None:
            reporter.log(f"  reusing the overlay video {overlay}")
            return saved, reused
    options = StreamOptions(out=overlay, stats=directory / "stats.jsonl", force=True)
    with Segmenter.from_bundle(bundle) as segmenter:
        summary = stream(open_source(str(video)), segmenter, options, reporter)
    atomic_write_json(summary_file, {**asdict(summary), "made_from": made_from})
    return summary, False


def _saved_summary(path: Path, made_from: dict[str, str]) -> StreamSummary | None:
    """The summary saved at `path` when it was made from `made_from`; None when it was not, or
    when the file is unreadable or from another version (the stream then runs again)."""
    try:
        saved = json.loads(path.read_text())
        if saved.pop("made_from", None) != made_from:
            return None
        return StreamSummary(**saved)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
