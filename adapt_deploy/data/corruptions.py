"""Weather and sensor corruptions (fog, night, rain, snow, noise, motion blur) at severities 1-5.

Used to build hard target conditions for videos and robustness evaluation. Every corruption
takes an RGB uint8 image and a numpy Generator, so results are reproducible, and its damage
(mean absolute difference to the clean image) grows with the severity.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

CORRUPTIONS: tuple[str, ...] = ("fog", "night", "rain", "snow", "noise", "motion_blur")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """A low-frequency random field in [0, 1] (H, W) float32, upsampled from a coarse grid."""
    coarse = rng.random((cells, max(2, cells * w // max(h, 1)))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blend towards a bright haze, denser near the top (far away) and patchy."""
    h, w = image.shape[:2]
    density = (0.25, 0.38, 0.5, 0.62, 0.75)[severity - 1]
    rows = np.linspace(1.0, 0.55, h, dtype=np.float32)[:, None]
    alpha = density * rows * (0.8 + 0.2 * _smooth_field(rng, h, w))
    haze = np.array([205, 208, 212], np.float32)
    img = image.astype(np.float32)
    out = img + alpha[:, :, None] * (haze - img)
    return np.clip(out, 0, 255).astype(np.uint8)


def _night(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Darken with a gamma curve, shift to blue, and amplify sensor noise."""
    gain = (0.55, 0.42, 0.3, 0.2, 0.12)[severity - 1]
    gamma = (1.3, 1.5, 1.7, 1.9, 2.1)[severity - 1]
    img = (image.astype(np.float32) / 255.0) ** gamma * 255.0 * gain
    img *= np.array([0.85, 0.95, 1.15], np.float32)
    sigma = 2.0 + 1.5 * severity
    img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(img, 0, 255).astype(np.uint8)


def _streaks(
    rng: np.random.Generator, h: int, w: int, count: int, length: float, angle: float, width: int
) -> np.ndarray:
    """A float32 (H, W) mask of random line streaks."""
    mask = np.zeros((h, w), np.uint8)
    xs = rng.integers(-w // 4, w + w // 4, count)
    ys = rng.integers(-h // 4, h, count)
    lengths = length * rng.uniform(0.6, 1.4, count)
    dx, dy = np.sin(angle), np.cos(angle)
    for x, y, ln in zip(xs, ys, lengths, strict=True):
        cv2.line(mask, (int(x), int(y)), (int(x + dx * ln), int(y + dy * ln)), 255, width)
    return mask.astype(np.float32) / 255.0


def _rain(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Darken and soften the scene and overlay bright slanted rain streaks."""
    h, w = image.shape[:2]
    count = int((0.0015, 0.003, 0.005, 0.008, 0.012)[severity - 1] * h * w)
    length = h * (0.04 + 0.015 * severity)
    mask = _streaks(rng, h, w, count, length, float(rng.uniform(-0.3, 0.3)), 1)
    img = cv2.GaussianBlur(image, (0, 0), 0.4 + 0.3 * severity).astype(np.float32)
    img *= 1.0 - 0.06 * severity
    alpha = (0.45 + 0.05 * severity) * mask[:, :, None]
    img += alpha * (np.float32(215.0) - img)
    return np.clip(img, 0, 255).astype(np.uint8)


def _snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Whiten the scene and overlay snow flakes of several sizes."""
    h, w = image.shape[:2]
    whiten = (0.1, 0.18, 0.26, 0.34, 0.42)[severity - 1]
    img = image.astype(np.float32)
    img += whiten * (np.float32(230.0) - img)
    count = int((0.002, 0.004, 0.006, 0.009, 0.013)[severity - 1] * h * w)
    mask = np.zeros((h, w), np.uint8)
    xs, ys = rng.integers(0, w, count), rng.integers(0, h, count)
    radii = rng.integers(1, 2 + severity // 2, count)
    for x, y, r in zip(xs, ys, radii, strict=True):
        cv2.circle(mask, (int(x), int(y)), int(r), 255, -1)
    flakes = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32)[:, :, None] / 255.0
    img += flakes * (np.float32(250.0) - img)
    return np.clip(img, 0, 255).astype(np.uint8)


def _noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    sigma = (8.0, 14.0, 22.0, 32.0, 45.0)[severity - 1]
    img = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return np.clip(img, 0, 255).astype(np.uint8)


def _motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Linear motion blur with a random direction."""
    length = (5, 9, 15, 21, 29)[severity - 1]
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    angle = float(rng.uniform(-30, 30))
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    kernel /= kernel.sum()
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "fog": _fog,
    "night": _night,
    "rain": _rain,
    "snow": _snow,
    "noise": _noise,
    "motion_blur": _motion_blur,
}


def apply_corruption(
    image: np.ndarray, kind: str, severity: int, rng: np.random.Generator
) -> np.ndarray:
    """Corrupt an RGB uint8 HxWx3 image with `kind` at `severity` (1..5); same shape and dtype."""
    if kind not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    return _FUNCTIONS[kind](image, int(severity), rng)
