"""Streaming segmentation: video files, cameras, network streams and image folders through an
exported bundle into an overlay video, per-frame label maps and per-frame stats."""

from adapt_deploy.signals import SignalStop
from adapt_deploy.stream.options import StreamOptions
from adapt_deploy.stream.pipeline import run_stream, stream
from adapt_deploy.stream.sources import Frame, Source, SourceError, open_source
from adapt_deploy.stream.summary import StreamSummary

__all__ = [
    "Frame",
    "SignalStop",
    "Source",
    "SourceError",
    "StreamOptions",
    "StreamSummary",
    "open_source",
    "run_stream",
    "stream",
]
