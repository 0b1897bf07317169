"""The stream: a synthetic drive through five conditions with ground truth, and its scoring."""

from __future__ import annotations

import numpy as np
import torch

from adapt_deploy.data.synthetic.video import render_video
from adapt_deploy.engine.evaluate import confusion_matrix
from bench.common import WORK as BENCH_WORK

WORK = BENCH_WORK / "tta"
CONDITIONS: tuple[tuple[str, str | None, int], ...] = (
    ("target", None, 0),
    ("fog", "fog", 3),
    ("night", "night", 2),
    ("rain", "rain", 4),
    ("snow", "snow", 2),
)
SIZE = (128, 256)
NUM_CLASSES = 19


def render_conditions(frames: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{condition: (images (n, H, W, 3) uint8, labels (n, H, W) uint8)}, cached."""
    path = WORK / f"stream_{frames}_{SIZE[0]}x{SIZE[1]}_seed{seed}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return {c: (data[f"{c}_images"], data[f"{c}_labels"]) for c, _, _ in CONDITIONS}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, (name, corruption, severity) in enumerate(CONDITIONS):
        schedule = [(0, "target", corruption, severity)]
        pairs = list(render_video(seed, frames, *SIZE, schedule, video=10 + i))
        out[name] = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
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
