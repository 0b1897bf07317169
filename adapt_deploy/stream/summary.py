"""What a stream did (`StreamSummary`, printed by the CLI), and the latency percentiles in it."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

LATENCY_WINDOW = 100_000  # latency percentiles are over the last this many frames


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


def percentiles(seconds: Iterable[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds of durations in seconds, NaNs left out; {} when none is left."""
    values = [s for s in seconds if s == s]  # drop NaN
    if not values:
        return {}
    ms = np.asarray(values) * 1000.0
    return {
        "p50": float(statistics.median(ms.tolist())),
        "p95": float(np.percentile(ms, 95)),
    }
