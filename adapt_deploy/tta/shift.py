"""A domain-shift detector on what the runtime already returns for every frame: class presence.

HAMLET adapts when the input distribution moves. Here the cue costs nothing: the presence
vector (sigmoid of LSE pooling) of every segmented frame, as logits. The detector keeps an
exponential average of that vector and of its distance to the average; a frame whose distance
exceeds the typical distance by `sigmas` standard deviations is a shift. After a shift it
stays quiet for `cooldown` frames, so one change of weather fires once.
"""

from __future__ import annotations

import math

import numpy as np


class ShiftDetector:
    """`update(presence) -> bool`: whether this frame starts a shift."""

    def __init__(
        self, smoothing: float = 0.95, sigmas: float = 4.0, warmup: int = 30, cooldown: int = 30
    ) -> None:
        self.smoothing = smoothing
        self.sigmas = sigmas
        self.warmup = warmup
        self.cooldown = cooldown
        self._mean: np.ndarray | None = None
        self._dist_mean = 0.0
        self._dist_var = 0.0
        self._seen = 0
        self._quiet = 0

    def update(self, presence: np.ndarray) -> bool:
        p = np.clip(np.asarray(presence, np.float64), 1e-6, 1 - 1e-6)
        z = np.log(p) - np.log1p(-p)
        self._seen += 1
        if self._mean is None:
            self._mean = z
            return False
        distance = float(np.linalg.norm(z - self._mean))
        std = math.sqrt(max(self._dist_var, 1e-12))
        shifted = (
            self._seen > self.warmup
            and self._quiet == 0
            and distance > self._dist_mean + self.sigmas * std
        )
        s = self.smoothing
        self._mean = s * self._mean + (1 - s) * z
        delta = distance - self._dist_mean
        self._dist_mean += (1 - s) * delta
        self._dist_var = s * (self._dist_var + (1 - s) * delta * delta)
        self._quiet = self.cooldown if shifted else max(0, self._quiet - 1)
        return shifted
