"""The overlay: each pixel's class colour blended over the frame.

The same blend as `adapt_deploy.runtime.overlay` (which may not import OpenCV), done by
`cv2.addWeighted`: about 5x faster (0.4 against 2.2 ms at 256x512), and it runs once per frame
in the stream's writing stage.
"""

from __future__ import annotations

import cv2
import numpy as np

from adapt_deploy.runtime.colors import colorize, colour_table

__all__ = ["colour_table", "overlay"]


def overlay(image: np.ndarray, labels: np.ndarray, table: np.ndarray, alpha: float) -> np.ndarray:
    """RGB uint8: (1 - alpha) · image + alpha · colour of each pixel's label (same size);
    `table` is a `colour_table`."""
    return cv2.addWeighted(image, 1.0 - alpha, colorize(labels, table), alpha, 0.0)
