"""The protocol: every frame scored before that frame's update, round after round; then the
drive ends in clear weather: the clean target frames once more, run as in the stream (scored,
then learned from), the measure of what adapting to the stream cost the clear-weather driver.

(Until session 13 the end pass re-scored the target with the final weights frozen. A method
that serves each condition its own state must see the frames to choose one, as it does in a
car, where adaptation never stops at the end of bad weather; the frozen re-score measured the
snow state on clear frames.)"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from adapt_deploy.engine.evaluate import mean_iou
from bench.tta.conditions import CLEAN, NUM_CLASSES, Stream, confusion
from bench.tta.methods import Method


@dataclass
class Run:
    """One method's scores: mIoU per (round, condition), final clean-target mIoU, seconds."""

    name: str
    miou: dict[tuple[int, str], float] = field(default_factory=dict)
    clean_end: float = float("nan")
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def mean(self) -> float:
        return float(np.mean(list(self.miou.values())))

    def round_mean(self, r: int) -> float:
        return float(np.mean([v for (rr, _), v in self.miou.items() if rr == r]))


def run_method(
    method: Method, data: dict[str, tuple[np.ndarray, np.ndarray]], stream: Stream, rounds: int
) -> Run:
    run = Run(method.name)
    start = time.perf_counter()
    for r in range(rounds):
        for name in stream.names:
            run.miou[(r, name)] = online_miou(method, *data[name])
        print(f"  {method.name} round {r + 1}/{rounds}: {run.round_mean(r):.1f} mIoU", flush=True)
    run.seconds = time.perf_counter() - start
    run.clean_end = online_miou(method, *data[CLEAN])
    run.counts = method.counts()
    method.close()
    return run


def online_miou(method: Method, images: np.ndarray, labels: np.ndarray) -> float:
    """mIoU (%) of one segment, every frame scored before the method learns from it."""
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for image, label in zip(images, labels, strict=True):
        total += confusion(label, method.predict(image))
        method.learn(image)
    return 100 * mean_iou(total)


@contextlib.contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Restore torch's thread count on leaving (the adapter sets it for the whole process)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
