"""Resizing: bilinear for frames going in, nearest for labels coming out.

Both use half-pixel centres (OpenCV's INTER_LINEAR convention), so a label map resized back
lines up with the frame it came from. Frames go through OpenCV when it imports (faster;
imported on the first resize, never when the runtime is imported) and through the numpy
implementation here otherwise; the two differ by at most one grey level. Labels always use
numpy. Index and weight tables are cached per (source, destination) size.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np


def fit_size(
    height: int, width: int, low: tuple[int, int], high: tuple[int, int]
) -> tuple[int, int]:
    """(H, W) inside [low, high] per dimension: the frame's own size when it fits, else scaled
    (aspect ratio kept where the range allows) to the nearest size that does."""
    (lo_h, lo_w), (hi_h, hi_w) = low, high
    if lo_h <= height <= hi_h and lo_w <= width <= hi_w:
        return height, width
    scale = min(hi_h / height, hi_w / width, 1.0)
    scale = max(scale, lo_h / height, lo_w / width)
    fitted_h = min(max(round(height * scale), lo_h), hi_h)
    fitted_w = min(max(round(width * scale), lo_w), hi_w)
    return fitted_h, fitted_w


@lru_cache(maxsize=32)
def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of each output position."""
    centres = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    centres = np.clip(centres, 0, src - 1)
    lower = np.floor(centres).astype(np.intp)
    upper = np.minimum(lower + 1, src - 1)
    return lower, upper, (centres - lower).astype(np.float32)


@lru_cache(maxsize=32)
def _nearest_index(src: int, dst: int) -> np.ndarray:
    index = np.floor((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst)).astype(np.intp)
    return np.minimum(index, src - 1)


@lru_cache(maxsize=1)
def _opencv() -> ModuleType | None:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W) or (H, W, C) image: OpenCV when it imports, else numpy."""
    cv2: Any = _opencv()
    if cv2 is not None:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return resize_bilinear_numpy(image, height, width)


def resize_bilinear_numpy(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W) or (H, W, C) image in numpy; rounds back to uint8."""
    lower, upper, weight = _linear_taps(image.shape[0], height)
    top = image[lower].astype(np.float32)
    rows = top + (image[upper] - top) * weight.reshape((-1,) + (1,) * (image.ndim - 1))
    lower, upper, weight = _linear_taps(image.shape[1], width)
    left = rows[:, lower]
    out = left + (rows[:, upper] - left) * weight.reshape((-1,) + (1,) * (image.ndim - 2))
    return np.clip(out + 0.5, 0, 255, out=out).astype(np.uint8)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label map (any dtype)."""
    rows = _nearest_index(labels.shape[0], height)
    cols = _nearest_index(labels.shape[1], width)
    return labels.take(rows, axis=0).take(cols, axis=1)
