"""The protocol: every frame scored before that frame's update, round after round; then the
clean target frames re-scored with the final weights."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from adapt_deploy.engine.evaluate import mean_iou
from bench.tta.conditions import CONDITIONS, NUM_CLASSES, confusion
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


def run_method(method: Method, data: dict[str, tuple[np.ndarray, np.ndarray]], rounds: int) -> Run:
    run = Run(method.name)
    start = time.perf_counter()
    for r in range(rounds):
        for name, _, _ in CONDITIONS:
            images, labels = data[name]
            total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
            for image, label in zip(images, labels, strict=True):
                total += confusion(label, method.predict(image))
                method.learn(image)
            run.miou[(r, name)] = 100 * mean_iou(total)
        print(f"  {method.name} round {r + 1}/{rounds}: {run.round_mean(r):.1f} mIoU", flush=True)
    run.seconds = time.perf_counter() - start
    images, labels = data["target"]
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for image, label in zip(images, labels, strict=True):
        with torch.no_grad():
            total += confusion(label, method.predict(image))
    run.clean_end = 100 * mean_iou(total)
    run.counts = method.counts()
    method.close()
    return run


@contextlib.contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Restore torch's thread count on leaving (the adapter sets it for the whole process)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
