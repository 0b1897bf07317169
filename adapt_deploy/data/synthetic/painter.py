"""The paint canvas and the projection from road coordinates to pixels, with shared primitives.

Everything is painted far to near into one uint8 canvas of paint indices; each paint carries a
colour, a trainId and a texture kind, so image and label come from the same polygons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from adapt_deploy.data.synthetic.styles import MATERIALS, TEXTURES, Style
from adapt_deploy.data.synthetic.world import ZMIN
from adapt_deploy.labels import IGNORE_INDEX


@dataclass(frozen=True)
class View:
    """Projection from road coordinates to pixels for one frame."""

    f: float
    cx: float
    hor: float
    cam_h: float
    off: float
    yaw: float
    curv: float
    s_cam: float

    def x(self, d: float, dz: float) -> float:
        """Camera-frame lateral position of road offset `d` at depth `dz`."""
        return self.off + d + (self.yaw + self.curv * dz) * dz

    def pt(self, d: float, y: float, s: float) -> tuple[int, int]:
        """Pixel of the road-coordinate point (d, height y, s); depth clamped to ZMIN."""
        dz = max(s - self.s_cam, ZMIN)
        return (
            int(self.cx + self.f * self.x(d, dz) / dz),
            int(self.hor + self.f * (self.cam_h - y) / dz),
        )

    def pts(self, d: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Vectorised `pt`: int32 array (..., 2)."""
        dz = np.maximum(s - self.s_cam, ZMIN)
        x = self.off + d + (self.yaw + self.curv * dz) * dz
        u = self.cx + self.f * x / dz
        v = self.hor + self.f * (self.cam_h - y) / dz
        return np.stack([u, v], axis=-1).astype(np.int32)

    def scale(self, s: float) -> float:
        """Pixels per metre at road distance `s`."""
        return self.f / max(s - self.s_cam, ZMIN)


class Painter:
    """A uint8 canvas of paint indices; each paint has a colour, a trainId and a texture."""

    def __init__(self, height: int, width: int, style: Style) -> None:
        self.canvas = np.zeros((height, width), np.uint8)
        self.rgb = np.zeros((256, 3), np.uint8)
        self.cls = np.full(256, IGNORE_INDEX, np.uint8)
        self.tex = np.zeros(256, np.int32)
        self.style = style
        self.n = 0
        self.cache: dict[tuple[str, int, int], int] = {}
        self.first = {m: self._new(m, (0.0, 0.0, 0.0), 0) for m in MATERIALS}

    def _new(self, material: str, jit: Sequence[float], variant: int) -> int:
        """Allocate the next paint index."""
        variants = self.style.variants.get(material)
        base = variants[variant % len(variants)] if variants else self.style.colours[material]
        amp = self.style.jitter
        i = self.n
        self.rgb[i] = [min(255, max(0, int(c + amp * j))) for c, j in zip(base, jit, strict=True)]
        cls, tex = MATERIALS[material]
        self.cls[i] = cls
        self.tex[i] = TEXTURES.index(tex)
        self.n += 1
        return i

    def paint(self, material: str, jit: Sequence[float] = (0.0, 0.0, 0.0), variant: int = 0) -> int:
        """The paint index of one instance of `material`; jitter is quantised to 4 levels."""
        bucket = min(3, int((jit[0] + 1.0) * 2.0))
        variants = self.style.variants.get(material)
        variant = variant % len(variants) if variants else 0
        key = (material, variant, bucket)
        i = self.cache.get(key)
        if i is None:
            if self.n >= 256:
                return self.first[material]
            q = (bucket - 1.5) / 1.5
            i = self.cache[key] = self._new(material, (q, jit[1] * q, jit[2] * q), variant)
        return i

    def poly(self, pts: np.ndarray | list, p: int) -> None:
        """Fill one polygon (any shape)."""
        cv2.fillPoly(self.canvas, [np.asarray(pts, np.int32)], p)

    def convex(self, pts: list[tuple[int, int]], p: int) -> None:
        """Fill one convex polygon (faster)."""
        cv2.fillConvexPoly(self.canvas, np.asarray(pts, np.int32), p)

    def polys(self, arr: np.ndarray, p: int) -> None:
        """Fill many non-overlapping polygons given as an int32 array (N, K, 2)."""
        if len(arr):
            cv2.fillPoly(self.canvas, list(arr), p)


def depth_samples(s_cam: float, s0: float, s1: float, n: int = 14) -> np.ndarray:
    """Road distances between s0 and s1 spaced geometrically in depth from the camera."""
    z0 = max(s0 - s_cam, ZMIN)
    z1 = max(s1 - s_cam, z0 + 1e-3)
    return s_cam + np.geomspace(z0, z1, n)


def strip(view: View, d0: float, d1: float, s: np.ndarray, y: float = 0.0) -> np.ndarray:
    """The polygon of the ground strip between lateral offsets d0 and d1 over samples s."""
    ys = np.full_like(s, y)
    a = view.pts(np.full_like(s, d0), ys, s)
    b = view.pts(np.full_like(s, d1), ys, s)
    return np.concatenate([a, b[::-1]])


def vquad(view: View, d0: float, s0: float, d1: float, s1: float, y0: float, y1: float) -> list:
    """Corners of a vertical rectangle between two ground points, heights y0..y1."""
    return [view.pt(d0, y0, s0), view.pt(d0, y1, s0), view.pt(d1, y1, s1), view.pt(d1, y0, s1)]


def thick(k: float, metres: float) -> int:
    """A line thickness in pixels (at least 1)."""
    return max(1, min(200, int(k * metres + 0.5)))
