"""The world model: things, ground layouts, the road and the scene, in road coordinates.

Road coordinates are a lateral offset `d` from the road centre (positive to the right) and a
distance `s` along the road; heights `y` are above a flat ground plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ZMIN = 0.6  # near clipping distance (m) for surfaces
ZMIN_OBJ = 1.5  # objects nearer than this are not drawn
FAR = 260.0  # far end of the ground (m)
LANE_W = 3.5
# Things whose first size entry is their length along the road (they start at `s`).
ALONG_ROAD: tuple[str, ...] = ("building", "wall", "hedge", "fence")


@dataclass
class Thing:
    """One object in road coordinates; `speed` (m/s along the road) moves it in videos."""

    kind: str
    d: float  # lateral offset from the road centre (m), positive to the right
    s: float  # distance along the road (m)
    layer: int  # 0 skyline, 1 behind the roadside, 2 roadside line, 3 street
    size: tuple[float, ...] = ()
    jit: tuple[float, float, float] = (0.0, 0.0, 0.0)
    variant: int = 0
    speed: float = 0.0


@dataclass(frozen=True)
class Layout:
    """The ground cross-section of a stretch of road [s0, s1)."""

    s0: float
    s1: float
    sidewalk: tuple[float, float]  # widths left/right (0: none)
    verge: tuple[float, float]  # terrain widths between road and sidewalk, left/right
    outer: str  # material beyond the sidewalk: "terrain" or "sidewalk"
    crossing: tuple[float, float] | None = None  # s-range of a cross street


@dataclass
class Road:
    """Lanes and camera placement; `curv(s)` bends the road ahead of the camera."""

    lanes: int
    cam_d: float  # lateral position of the camera in road coordinates
    yaw: float
    curv_amp: float
    curv_phase: float
    curv_period: float = 400.0
    oneway: bool = False

    @property
    def half(self) -> float:
        """Half of the carriageway width (m)."""
        return self.lanes * LANE_W / 2

    def curv(self, s_cam: float) -> float:
        """Road curvature coefficient seen from the camera at `s_cam`."""
        return self.curv_amp * math.sin(2 * math.pi * s_cam / self.curv_period + self.curv_phase)


@dataclass
class Scene:
    """A camera, a road, ground layouts and things: everything needed to render a frame."""

    height: int
    width: int
    cam_h: float
    focal: float
    horizon: float
    road: Road
    kind: str
    layouts: list[Layout] = field(default_factory=list)
    things: list[Thing] = field(default_factory=list)
    sun: float = 0.0  # sun direction (radians) for the target lighting gradient
    sun_strength: float = 0.0


def edges(road: Road, lay: Layout, side: int) -> tuple[float, float, float]:
    """Lateral distances (positive) of kerb, sidewalk start and roadside line on one side."""
    i = 0 if side < 0 else 1
    verge = lay.verge[i]
    kerb = road.half + verge
    line = kerb + lay.sidewalk[i]
    return road.half, kerb, line


def in_crossing(lay: Layout, s0: float, s1: float) -> bool:
    """Whether [s0, s1) overlaps the layout's cross street."""
    c = lay.crossing
    return c is not None and s0 < c[1] + 1 and s1 > c[0] - 1


def free_spans(lay: Layout, s0: float, s1: float) -> list[tuple[float, float]]:
    """[s0, s1) minus the cross street."""
    c = lay.crossing
    if c is None or s1 <= c[0] or s0 >= c[1]:
        return [(s0, s1)]
    return [(a, b) for a, b in ((s0, c[0] - 1), (c[1] + 1, s1)) if b - a > 1]
