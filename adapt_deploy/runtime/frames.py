"""Frames in: checking what a caller passes, and writing it into the graph's input buffer.

The runtime takes RGB uint8 frames (H, W, 3). It also accepts grey frames, (H, W) or (H, W, 1),
which are repeated into the three channels, and RGBA frames (H, W, 4), whose alpha is dropped.
Anything else is a FrameError naming the frame, the dtype or shape, and what was expected.
Conversions are views and broadcasts: a frame is copied exactly once, into the input buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adapt_deploy.errors import UserError
from adapt_deploy.runtime.resize import resize_bilinear

EXPECTED = "RGB uint8 (H, W, 3), grey (H, W) or (H, W, 1), or RGBA (H, W, 4)"


class FrameError(UserError):
    """A frame that is not a uint8 image of a supported shape."""


def as_image(frame: Any, where: str = "frame") -> np.ndarray:
    """The frame as an (H, W, 3) RGB or (H, W) grey view; FrameError for anything else."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"{where}: expected a numpy array, {EXPECTED}; got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise FrameError(
            f"{where}: expected dtype uint8 (0-255), got {frame.dtype}; convert float images "
            "in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    channels = frame.shape[2] if frame.ndim == 3 else None
    if not (frame.ndim == 2 or channels in (1, 3, 4)):
        raise FrameError(f"{where}: expected {EXPECTED}; got shape {frame.shape}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise FrameError(f"{where}: empty frame of shape {frame.shape}")
    if channels == 1:
        return frame[:, :, 0]
    if channels == 4:
        return frame[:, :, :3]
    return frame


def write_image(out: np.ndarray, image: np.ndarray) -> None:
    """Write an `as_image` view into one (h, w, 3) uint8 slot, resized bilinearly if needed."""
    height, width = out.shape[:2]
    if image.shape[:2] != (height, width):
        image = resize_bilinear(image, height, width)
    out[...] = image[:, :, None] if image.ndim == 2 else image


def graph_input(
    frames: np.ndarray, input_meta: dict[str, Any], out: np.ndarray | None = None
) -> np.ndarray:
    """What the graph is fed for RGB uint8 (N, H, W, 3) frames: the frames themselves (NHWC
    bundles normalize in the graph) or (x - mean) / std as float32 (N, 3, H, W) for NCHW ones.
    Written into `out` when given (the runtime's preallocated buffer)."""
    if input_meta["layout"] == "NHWC":
        if out is None:
            return np.ascontiguousarray(frames)
        out[...] = frames
        return out
    mean = np.asarray(input_meta["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(input_meta["std"], np.float32).reshape(1, 3, 1, 1)
    if out is None:
        out = np.empty((frames.shape[0], 3, *frames.shape[1:3]), np.float32)
    np.subtract(frames.transpose(0, 3, 1, 2), mean, out=out)
    np.divide(out, std, out=out)
    return out
