"""Label maps to colours: the palette lookup and the overlay on the frame.

The overlay blends with OpenCV's `addWeighted` when OpenCV imports (faster; imported on the
first overlay, never when the runtime is imported) and with numpy otherwise; the two differ by
at most one grey level (OpenCV rounds halves to even).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adapt_deploy.runtime.resize import _opencv


def colour_table(palette: np.ndarray | list[list[int]]) -> np.ndarray:
    """A (256, 3) uint8 lookup from trainId to colour; ids past the palette are black."""
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette[:256]
    return table


def colorize(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) uint8 labels -> (H, W, 3) uint8 colours through a `colour_table`."""
    return np.take(table, labels, axis=0)


def overlay(image: np.ndarray, labels: np.ndarray, table: np.ndarray, alpha: float) -> np.ndarray:
    """RGB uint8 (H, W, 3): (1 - alpha) · image + alpha · each pixel's class colour. A grey
    (H, W) image is spread over the three channels."""
    colours = colorize(labels, table)
    if image.ndim == 2:
        image = image[:, :, None]
    cv2: Any = _opencv()
    if cv2 is not None and image.dtype == np.uint8:
        image = np.broadcast_to(image, colours.shape)  # grey: OpenCV copies it to 3 channels
        return cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    blend = image * np.float32(1.0 - alpha) + colours * np.float32(alpha)
    return (blend + 0.5).astype(np.uint8)
