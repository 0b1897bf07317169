"""The finish of a painted canvas: flat colours (source) or a camera look (target)."""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from adapt_deploy.data.synthetic.painter import Painter
from adapt_deploy.data.synthetic.styles import TEXTURES, Style
from adapt_deploy.data.synthetic.world import Scene


@lru_cache(maxsize=8)
def _texture_bank(height: int, width: int) -> np.ndarray:
    """Luminance textures (int16, one per TEXTURES entry) of twice the image size, flattened."""
    rng = np.random.default_rng(12345)
    h2, w2 = 2 * height, 2 * width

    def noise(sigma: float, blur: float = 0.0) -> np.ndarray:
        n = rng.standard_normal((h2, w2)).astype(np.float32)
        if blur:
            n = cv2.GaussianBlur(n, (0, 0), blur)
            n /= n.std() + 1e-6
        return n * sigma

    yy, xx = np.mgrid[0:h2, 0:w2]
    brick_rows = (yy % 7 == 0) | (((yy // 7) % 2 * 7 + xx) % 14 == 0)
    paving = (yy % 11 == 0) | (xx % 17 == 0)
    bank = {
        "none": np.zeros((h2, w2), np.float32),
        "grain": noise(3.0),
        "asphalt": noise(6.0) + noise(7.0, 6.0),
        "paving": noise(4.0) - 16.0 * paving,
        "brick": noise(4.0) + noise(6.0, 3.0) - 20.0 * brick_rows,
        "leaf": noise(16.0, 1.2) + noise(10.0, 5.0),
        "grass": cv2.blur(noise(20.0), (1, 5)) + noise(6.0, 8.0),
        "concrete": noise(3.0) + noise(8.0, 10.0),
        "sky": noise(9.0, 14.0) + 4.0,
    }
    stack = np.stack([bank[name] for name in TEXTURES])
    return np.clip(stack, -100, 100).astype(np.int16).reshape(-1)


@lru_cache(maxsize=8)
def _sensor_noise(height: int, width: int) -> np.ndarray:
    """A (2H, 2W, 3) int16 tile of sensor noise, windowed at random offsets per image."""
    rng = np.random.default_rng(54321)
    return (rng.standard_normal((2 * height, 2 * width, 3)) * 3.5).astype(np.int16)


@lru_cache(maxsize=8)
def _vignette(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vignette gain (H, W), normalised coordinates and the texture base index (H, W)."""
    ys = np.linspace(-1, 1, height, dtype=np.float32)
    xs = np.linspace(-1, 1, width, dtype=np.float32)
    r2 = ys[:, None] ** 2 * 0.6 + xs[None, :] ** 2
    vig = (1.0 - 0.28 * r2 / r2.max()).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy * (2 * width) + xx).astype(np.int32)
    return vig, xs, ys, base


def _flat_image(pt: Painter) -> np.ndarray:
    """Source look: the flat paint colours."""
    p3 = cv2.merge([pt.canvas, pt.canvas, pt.canvas])
    return cv2.LUT(p3, pt.rgb.reshape(256, 1, 3))


def _camera_image(pt: Painter, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Target look: textures, lighting gradient, vignette, slight blur and sensor noise."""
    h, w = pt.canvas.shape
    bank = _texture_bank(h, w)
    vig, xs, ys, base = _vignette(h, w)
    oy, ox = rng.integers(0, h, len(TEXTURES)), rng.integers(0, w, len(TEXTURES))
    offsets = (np.arange(len(TEXTURES)) * 4 * h * w + oy * 2 * w + ox).astype(np.int32)
    tex = bank[base + offsets[pt.tex][pt.canvas]]
    img = _flat_image(pt).astype(np.int16)
    img += tex[:, :, None]
    ny, nx = int(rng.integers(0, h)), int(rng.integers(0, w))
    img += _sensor_noise(h, w)[ny : ny + h, nx : nx + w]
    a = scene.sun_strength
    gain = vig * (1.0 + a * (math.cos(scene.sun) * xs[None, :] + math.sin(scene.sun) * ys[:, None]))
    out = img.astype(np.float32)
    out *= gain[:, :, None]
    out = np.clip(out, 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(out, (3, 3), 0.7)


def finish(pt: Painter, scene: Scene, style: Style, rng: np.random.Generator) -> tuple:
    """Image and trainId label of a painted canvas."""
    label = cv2.LUT(pt.canvas, pt.cls)
    image = _camera_image(pt, scene, rng) if style.camera_like else _flat_image(pt)
    return image, label
