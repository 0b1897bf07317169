"""The streams: synthetic drives through conditions with ground truth, and their scoring.

- drive: target → fog 3 → night 2 → rain 4 → snow 2 (the demo video's severities), 40 frames
  each, 10 rounds (2,000 frames). Every default of the adapter was set on this stream.
- second: a stream no parameter was tuned on: other severities, two corruptions `drive` does
  not have (noise, motion blur), source-style frames (the model's home: what it was trained
  on), in another order, 64 frames each, 10 rounds (5,120 frames), rendered from another seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adapt_deploy.data.synthetic.video import render_video
from adapt_deploy.engine.evaluate import confusion_matrix
from bench.common import WORK as BENCH_WORK

WORK = BENCH_WORK / "tta"
SIZE = (128, 256)
NUM_CLASSES = 19
CLEAN = "target"  # the clear-weather condition both streams hold: the forgetting measures use it


@dataclass(frozen=True)
class Condition:
    """One segment of a round: a style (source / target) and an optional corruption."""

    name: str
    style: str
    corruption: str | None
    severity: int


@dataclass(frozen=True)
class Stream:
    """Conditions in order, `frames` each, the same frames replayed for `rounds` rounds."""

    name: str
    conditions: tuple[Condition, ...]
    frames: int
    rounds: int
    seed: int
    first_video: int  # render_video's video index of the first condition (then +1 each)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.conditions]

    def describe(self, frames: int, rounds: int) -> str:
        order = " → ".join(self.names)
        total = frames * rounds * len(self.conditions)
        return (
            f"'{self.name}': {order}, {frames} frames each at {SIZE[0]}x{SIZE[1]}, "
            f"{rounds} rounds ({total} frames per method), rendered from seed {self.seed}"
        )


STREAMS: dict[str, Stream] = {
    "drive": Stream(
        "drive",
        (
            Condition("target", "target", None, 0),
            Condition("fog", "target", "fog", 3),
            Condition("night", "target", "night", 2),
            Condition("rain", "target", "rain", 4),
            Condition("snow", "target", "snow", 2),
        ),
        frames=40,
        rounds=10,
        seed=0,
        first_video=10,
    ),
    "second": Stream(
        "second",
        (
            Condition("home", "source", None, 0),
            Condition("night4", "target", "night", 4),
            Condition("target", "target", None, 0),
            Condition("snow4", "target", "snow", 4),
            Condition("noise3", "target", "noise", 3),
            Condition("fog1", "target", "fog", 1),
            Condition("rain2", "target", "rain", 2),
            Condition("blur2", "target", "motion_blur", 2),
        ),
        frames=64,
        rounds=10,
        seed=1,
        first_video=40,
    ),
}


def render_conditions(stream: Stream, frames: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{condition: (images (n, H, W, 3) uint8, labels (n, H, W) uint8)}, cached."""
    tag = "" if stream.name == "drive" else f"{stream.name}_"  # drive's cache predates streams
    path = WORK / f"stream_{tag}{frames}_{SIZE[0]}x{SIZE[1]}_seed{stream.seed}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return {c: (data[f"{c}_images"], data[f"{c}_labels"]) for c in stream.names}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, c in enumerate(stream.conditions):
        schedule = [(0, c.style, c.corruption, c.severity)]
        video = stream.first_video + i
        pairs = list(render_video(stream.seed, frames, *SIZE, schedule, video=video))
        out[c.name] = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    WORK.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{c}_{k}": v for c, (im, lb) in out.items() for k, v in (("images", im), ("labels", lb))
    }
    np.savez_compressed(path, **arrays)
    return out


def confusion(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """(C, C) counts of one frame (numpy), as the project's evaluation counts them."""
    matrix = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(preds), NUM_CLASSES)
    return matrix.numpy()
