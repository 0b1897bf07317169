"""Scene sampling: scene type, camera, road, ground layout and the things that populate it.

Still images place the small things (people, riders, bicycles, poles, lights, signs, cars)
log-uniformly in depth from where their lateral offset comes into view, so that they are often
near enough to be learnable at low resolution; video zones place them uniformly along the road.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adapt_deploy.data.synthetic.styles import SCENE_TYPES, Style
from adapt_deploy.data.synthetic.world import (
    FAR,
    LANE_W,
    ZMIN_OBJ,
    Layout,
    Road,
    Scene,
    Thing,
    edges,
    free_spans,
    in_crossing,
)

# Per scene type: probability that a class group is present, and its rate per 100 m when so.
_PRESENCE: dict[str, dict[str, tuple[float, float]]] = {
    "downtown": {
        "building": (0.97, 0), "person": (0.9, 8), "rider": (0.65, 11), "car": (0.9, 10),
        "parked": (0.75, 8), "pole": (0.9, 5), "light": (0.75, 4), "sign": (0.85, 7),
        "tree": (0.35, 6), "wall": (0.25, 0), "fence": (0.45, 0), "hedge": (0.05, 0),
        "bicycle": (0.6, 5), "clutter": (0.5, 4), "skyline": (0.9, 0), "terrain": (0.0, 0),
    },
    "residential": {
        "building": (0.7, 0), "person": (0.65, 5.5), "rider": (0.5, 7), "car": (0.75, 6),
        "parked": (0.7, 8), "pole": (0.85, 4.5), "light": (0.4, 2.5), "sign": (0.7, 5),
        "tree": (0.9, 10), "wall": (0.45, 0), "fence": (0.6, 0), "hedge": (0.35, 0),
        "bicycle": (0.45, 4), "clutter": (0.3, 2), "skyline": (0.3, 0), "terrain": (0.5, 0),
    },
    "suburb": {
        "building": (0.35, 0), "person": (0.35, 3.5), "rider": (0.35, 4), "car": (0.6, 4),
        "parked": (0.35, 4), "pole": (0.7, 4), "light": (0.1, 1.5), "sign": (0.55, 4),
        "tree": (1.0, 16), "wall": (0.25, 0), "fence": (0.65, 0), "hedge": (0.45, 0),
        "bicycle": (0.2, 2), "clutter": (0.15, 1), "skyline": (0.0, 0), "terrain": (1.0, 0),
    },
    "highway": {
        "building": (0.05, 0), "person": (0.0, 0), "rider": (0.0, 0), "car": (0.95, 12),
        "parked": (0.0, 0), "pole": (0.85, 4.5), "light": (0.0, 0), "sign": (0.8, 4),
        "tree": (0.6, 8), "wall": (0.55, 0), "fence": (0.7, 0), "hedge": (0.1, 0),
        "bicycle": (0.0, 0), "clutter": (0.05, 1), "skyline": (0.15, 0), "terrain": (1.0, 0),
    },
}  # fmt: skip
_GROUP_SIZES = (1, 1, 2, 2, 3, 4)  # people walking or waiting together
_RAILING_KINDS = ("downtown", "residential", "suburb")  # kerbside pedestrian railings


@dataclass(frozen=True)
class Placer:
    """Distances along the road [s0, s1) for things.

    With a camera (`cam_d`, `tan_half`: still images) depths are log-uniform from where the
    thing's lateral offset comes into view; without one (video zones) uniform along the road.
    """

    s0: float
    s1: float
    cam_d: float | None = None
    tan_half: float = 1.0

    def at(self, rng: np.random.Generator, d: float, lo: float = 0.0, near: float = 4.0) -> float:
        """A distance for a thing at lateral offset `d`, at least `lo` past s0 (and `near` m
        from the camera when placing for a still)."""
        a = self.s0 + lo
        if self.cam_d is None:
            return float(rng.uniform(a, self.s1))
        z = max(a, near, 0.9 * abs(d - self.cam_d) / self.tan_half)
        if z >= self.s1:
            return float(rng.uniform(a, self.s1))
        return float(z * (self.s1 / z) ** rng.random())


def _jit(rng: np.random.Generator) -> tuple[float, float, float]:
    """Random per-instance colour jitter in [-1, 1]^3."""
    a, b, c = rng.uniform(-1.0, 1.0, 3)
    return (float(a), float(b), float(c))


def make_road(rng: np.random.Generator, kind: str, still: bool) -> Road:
    """Lanes, camera lane and curvature for a scene type."""
    lanes = int(rng.choice([4, 5, 6])) if kind == "highway" else int(rng.choice([2, 2, 3, 4]))
    oneway = kind != "highway" and rng.random() < 0.25
    first = 0 if oneway else lanes // 2
    lane = int(rng.integers(first, lanes))
    half = lanes * LANE_W / 2
    cam_d = -half + (lane + 0.5) * LANE_W + float(rng.uniform(-0.5, 0.5))
    yaw = float(rng.uniform(-0.06, 0.06)) if still else 0.0
    amp = float(rng.uniform(0.0, 0.004)) * (1 if rng.random() < 0.7 else 0)
    return Road(lanes, cam_d, yaw, amp, float(rng.uniform(0, 2 * math.pi)), oneway=oneway)


def _make_layout(
    rng: np.random.Generator, kind: str, flags: dict[str, bool], s0: float, s1: float
) -> Layout:
    """A ground cross-section for one scene type."""
    if kind == "downtown":
        sw = (float(rng.uniform(2.5, 6)), float(rng.uniform(2.5, 6)))
    elif kind == "residential":
        sw = (float(rng.uniform(1.5, 3.5)), float(rng.uniform(1.5, 3.5)))
    elif kind == "suburb":
        sw = (0.0, float(rng.uniform(1.5, 2.5))) if rng.random() < 0.5 else (0.0, 0.0)
    else:
        sw = (0.0, 0.0)
    if flags["terrain"]:
        verge = (float(rng.uniform(1, 4)), float(rng.uniform(1, 4)))
        if kind == "residential" and rng.random() < 0.5:
            verge = (0.0, 0.0)
    else:
        verge = (0.0, 0.0)
    outer = "terrain" if flags["terrain"] else "sidewalk"
    crossing = None
    if kind in ("downtown", "residential") and rng.random() < (0.5 if kind == "downtown" else 0.3):
        c0 = float(rng.uniform(s0 + 10, s0 + 60))
        crossing = (c0, c0 + float(rng.uniform(8, 16)))
    return Layout(s0, s1, sw, verge, outer, crossing)


def _populate_roadside(
    rng: np.random.Generator, road: Road, lay: Layout, kind: str, flags: dict[str, bool],
    out: list[Thing],
) -> None:  # fmt: skip
    """Facades, walls, fences, hedges (the roadside line) and what stands behind them."""
    for side in (-1, 1):
        _, _, line = edges(road, lay, side)
        options = []
        if flags["building"]:
            options += ["building"] * 3
        for k, weight in (("wall", 2), ("fence", 2), ("hedge", 1)):
            if flags[k]:
                options += [k] * weight
        if not options:
            options = ["none"]
        for a, b in free_spans(lay, lay.s0, lay.s1):
            s = a + float(rng.uniform(-4, 4))
            while s < b:
                what = options[int(rng.integers(len(options)))]
                length = float(rng.uniform(8, 30))
                e = min(s + length, b)
                if what == "building":
                    setback = 0.0 if kind == "downtown" else float(rng.uniform(0, 8))
                    height = float(rng.uniform(8, 32) if kind == "downtown" else rng.uniform(5, 12))
                    layer = 2 if setback < 1 else 1
                    out.append(
                        Thing(
                            "building",
                            side * (line + setback),
                            s,
                            layer,
                            (e - s, height, float(rng.uniform(0.2, 1))),
                            _jit(rng),
                            int(rng.integers(4)),
                        )
                    )
                elif what in ("wall", "fence", "hedge"):
                    height = {"wall": (0.8, 3.0), "fence": (1.0, 2.2), "hedge": (0.7, 1.8)}[what]
                    out.append(
                        Thing(
                            what,
                            side * (line + 0.2),
                            s,
                            2,
                            (e - s, float(rng.uniform(*height))),
                            _jit(rng),
                            int(rng.integers(3)),
                        )
                    )
                    if what != "wall" and flags["tree"] and rng.random() < 0.6:
                        for _ in range(int(rng.integers(1, 4))):
                            dd = side * (line + float(rng.uniform(2, 10)))
                            out.append(_tree(rng, dd, float(rng.uniform(s, e)), layer=1))
                gap = float(rng.uniform(0, 6)) if rng.random() < 0.4 else 0.3
                s = e + gap


def _tree(rng: np.random.Generator, d: float, s: float, layer: int = 3) -> Thing:
    """A tree: trunk height, canopy radius and blob count."""
    trunk = float(rng.uniform(1.5, 3.5))
    radius = float(rng.uniform(1.2, 3.0))
    return Thing(
        "tree",
        d,
        s,
        layer,
        (trunk, radius, float(rng.integers(3, 7))),
        _jit(rng),
        int(rng.integers(1 << 30)),
    )


def _count(rng: np.random.Generator, rate: float, length: float) -> int:
    """Poisson count for a rate per 100 m over `length` metres."""
    return int(rng.poisson(rate * length / 100.0))


def _person(rng: np.random.Generator, d: float, s: float, speed: float) -> Thing:
    """A pedestrian of random height and clothes."""
    size = (float(rng.uniform(1.55, 1.9)),)
    return Thing("person", d, s, 3, size, _jit(rng), int(rng.integers(8)), speed)


def _populate_street(
    rng: np.random.Generator, road: Road, lay: Layout, kind: str, flags: dict[str, bool],
    rates: dict[str, float], place: Placer, out: list[Thing],
) -> None:  # fmt: skip
    """Cars, people, riders, bicycles, poles, lights, signs, railings, trees and clutter."""
    s0, s1 = place.s0, place.s1
    length = s1 - s0
    if length <= 0:
        return
    half = road.half

    def walk_d(side: int, inset: float) -> float:
        """A lateral position where people walk on one side: sidewalk, or verge/terrain."""
        _, kerb, line = edges(road, lay, side)
        if line - kerb < 1.0 and lay.outer != "sidewalk":
            return side * float(rng.uniform(half + 0.4, half + 3.0))
        lo, hi = half + 0.4, max(line - inset, half + 0.6)
        if line - kerb > 1.0:
            lo = kerb + 0.4
        return side * float(rng.uniform(lo, hi))

    def kerbside_d(side: int) -> float:
        """The lateral position of street furniture on one side."""
        _, kerb, line = edges(road, lay, side)
        return side * (kerb + 0.5 if line - kerb > 1.2 else half + 0.5)

    def sides() -> int:
        return int(rng.choice([-1, 1]))

    if flags["car"]:
        for _ in range(_count(rng, rates["car"], length)):
            lane = int(rng.integers(road.lanes))
            d = -half + (lane + 0.5) * LANE_W + float(rng.uniform(-0.3, 0.3))
            ahead = abs(d - road.cam_d) < 1.5  # in our lane: keep a gap, it pulls away
            s = place.at(rng, d, lo=10 if ahead else 4, near=12 if ahead else 8)
            same_dir = road.oneway or d > 0
            speed = float(rng.uniform(6, 14)) * (1 if same_dir else -1)
            if ahead:
                speed = float(rng.uniform(10, 14))
            size = (
                float(rng.uniform(1.7, 1.95)),
                float(rng.uniform(3.9, 4.8)),
                float(rng.uniform(1.35, 1.6)),
            )
            out.append(Thing("car", d, s, 3, size, _jit(rng), int(rng.integers(8)), speed))
    if flags["parked"]:
        for _ in range(_count(rng, rates["parked"], length)):
            d = sides() * (half - 1.1)
            s = place.at(rng, d, lo=2, near=5)
            if abs(d - road.cam_d) < 2.2 or in_crossing(lay, s - 2, s + 5):
                continue
            size = (1.8, float(rng.uniform(3.9, 4.6)), float(rng.uniform(1.35, 1.55)))
            out.append(Thing("car", d, s, 3, size, _jit(rng), int(rng.integers(8))))
    if flags["person"]:
        for _ in range(_count(rng, rates["person"], length)):
            side = sides()
            d0 = walk_d(side, 0.3)
            s = place.at(rng, d0)
            speed = float(rng.choice([-1.3, 0.0, 1.3]))
            for k in range(int(rng.choice(_GROUP_SIZES))):
                dd = d0 + (side * float(rng.uniform(-0.7, 0.7)) if k else 0.0)
                if abs(dd) < half + 0.3:
                    dd = side * (half + 0.3)
                ds = float(rng.uniform(-1.2, 1.2)) if k else 0.0
                out.append(_person(rng, dd, s + ds, speed))
        if lay.crossing:
            _populate_crossing(rng, road, lay, walk_d, out)
    if flags["bicycle"]:
        for _ in range(_count(rng, rates["bicycle"], length)):
            side = sides()
            d0 = walk_d(side, 0.5)
            s = place.at(rng, d0)
            if in_crossing(lay, s, s + 1):
                continue
            for k in range(int(rng.integers(1, 4))):  # a row of parked bicycles
                b = Thing("bicycle", d0 + side * 0.6 * k, s + 0.2 * k, 3, (), _jit(rng))
                out.append(b)
    if flags["rider"]:
        for _ in range(_count(rng, rates["rider"], length)):
            side = 1 if road.oneway else sides()
            d = side * (half - 0.7) + float(rng.uniform(-0.25, 0.25))
            behind = abs(d - road.cam_d) < 1.2  # in our lane: we follow at a distance
            s = place.at(rng, d, lo=3, near=10 if behind else 5)
            speed = 4.5 * (1 if side > 0 or road.oneway else -1)
            size = (float(rng.uniform(1.65, 1.85)),)
            out.append(Thing("rider", d, s, 3, size, _jit(rng), int(rng.integers(8)), speed))
    for kind_, near in (("pole", 6.0), ("sign", 5.0)):
        if not flags[kind_]:
            continue
        for _ in range(_count(rng, rates[kind_], length)):
            d = kerbside_d(sides())
            s = place.at(rng, d, near=near)
            if in_crossing(lay, s, s + 1):
                continue
            if kind_ == "pole":
                size = (float(rng.uniform(5, 9)), float(rng.random() < 0.5))
            elif kind == "highway":  # large direction signs
                size = (float(rng.uniform(2.2, 3.0)), float(rng.uniform(1.2, 2.0)), 0.0)
            else:  # sometimes a second sign below the first
                size = (float(rng.uniform(2.0, 2.8)), float(rng.uniform(0.6, 0.9)), 0.0)
                if rng.random() < 0.35:
                    size = (size[0] + 0.5, size[1], float(rng.uniform(0.5, 0.75)))
            out.append(Thing(kind_, d, s, 3, size, _jit(rng), int(rng.integers(8))))
    for kind_ in ("clutter", "tree"):
        if not flags[kind_]:
            continue
        for _ in range(_count(rng, rates[kind_], length)):
            side = sides()
            s = float(rng.uniform(s0, s1))
            if in_crossing(lay, s, s + 1):
                continue
            if kind_ == "tree":
                out.append(_tree(rng, kerbside_d(side), s))
            else:
                size = (float(rng.uniform(0.4, 1.0)),)
                out.append(Thing("clutter", walk_d(side, 0.5), s, 3, size, _jit(rng)))
    if flags["light"]:
        _populate_lights(rng, road, lay, rates["light"], place, kerbside_d, out)
    if flags["fence"] and kind in _RAILING_KINDS:
        _populate_railings(rng, road, lay, place, out)


def _populate_crossing(
    rng: np.random.Generator, road: Road, lay: Layout, walk_d, out: list[Thing]
) -> None:
    """People waiting at the corners of the pedestrian crossing, and some crossing the road."""
    assert lay.crossing is not None
    z0, z1 = lay.crossing[0] - 3.5, lay.crossing[0] - 0.5  # the zebra
    for side in (-1, 1):
        if rng.random() < 0.7:
            for _ in range(int(rng.choice(_GROUP_SIZES))):
                out.append(_person(rng, walk_d(side, 0.3), float(rng.uniform(z0, z1)), 0.0))
    if rng.random() < 0.5:
        for _ in range(int(rng.choice(_GROUP_SIZES))):
            d = float(rng.uniform(-road.half + 0.5, road.half - 0.5))
            out.append(_person(rng, d, float(rng.uniform(z0 + 0.5, z1)), 0.0))


def _populate_lights(
    rng: np.random.Generator, road: Road, lay: Layout, rate: float, place: Placer, kerbside_d,
    out: list[Thing],
) -> None:  # fmt: skip
    """Traffic lights: on both sides before and after a crossing, and some along the road."""
    spots = []
    if lay.crossing:
        for s in (lay.crossing[0] - 1.5, lay.crossing[1] + 1.5):
            spots += [(s, -1), (s, 1)]
    for _ in range(_count(rng, rate, place.s1 - place.s0)):
        side = int(rng.choice([-1, 1]))
        spots.append((place.at(rng, kerbside_d(side), lo=6, near=8), side))
    for s, side in spots:
        arm = float(rng.uniform(0, road.half)) if rng.random() < 0.5 else 0.0
        height = float(rng.uniform(3.5, 6))
        out.append(Thing("light", kerbside_d(side), s, 3, (height, arm), _jit(rng)))


def _populate_railings(
    rng: np.random.Generator, road: Road, lay: Layout, place: Placer, out: list[Thing]
) -> None:
    """Pedestrian railings along the kerb, as short pieces so they sort with what they hide."""
    for i, side in enumerate((-1, 1)):
        if lay.sidewalk[i] < 1.5 or rng.random() < 0.35:
            continue
        _, kerb, _ = edges(road, lay, side)
        d = side * (kerb + 0.25)
        start = place.at(rng, d, near=3)
        for a, b in free_spans(lay, start, start + float(rng.uniform(12, 40))):
            for s in np.arange(a, b - 0.5, 5.0):
                piece = (float(min(5.0, b - s)), float(rng.uniform(0.9, 1.2)))
                out.append(Thing("fence", d, float(s), 3, piece, _jit(rng), 0))


def _populate_skyline(
    rng: np.random.Generator, kind: str, flags: dict[str, bool], s_base: float, out: list[Thing]
) -> None:
    """Distant buildings or a tree line near the horizon."""
    if flags["skyline"]:
        for _ in range(int(rng.integers(6, 16))):
            d = float(rng.uniform(-120, 120))
            s = s_base + float(rng.uniform(180, 260))
            out.append(
                Thing(
                    "block",
                    d,
                    s,
                    0,
                    (float(rng.uniform(10, 35)), float(rng.uniform(8, 40))),
                    _jit(rng),
                    int(rng.integers(4)),
                )
            )
    if kind in ("suburb", "highway", "residential") and rng.random() < 0.7:
        for _ in range(int(rng.integers(6, 14))):
            d = float(rng.uniform(-140, 140))
            out.append(
                Thing(
                    "treeline",
                    d,
                    s_base + float(rng.uniform(120, 200)),
                    0,
                    (float(rng.uniform(15, 40)), float(rng.uniform(6, 14))),
                    _jit(rng),
                )
            )


def zone_flags(rng: np.random.Generator, kind: str) -> tuple[dict[str, bool], dict[str, float]]:
    """Which class groups appear in a stretch, and their rates per 100 m."""
    table = _PRESENCE[kind]
    flags = {k: bool(rng.random() < p) for k, (p, _) in table.items()}
    rates = {k: float(r * rng.uniform(0.5, 1.5)) for k, (_, r) in table.items()}
    flags["person"] = flags["person"] or (flags["rider"] and rng.random() < 0.3)
    return flags, rates


def populate_zone(
    rng: np.random.Generator, road: Road, kind: str, place: Placer, s_start: float
) -> tuple[Layout, list[Thing]]:
    """The layout of the stretch [s_start, place.s1) and its things, skyline included."""
    flags, rates = zone_flags(rng, kind)
    lay = _make_layout(rng, kind, flags, s_start, place.s1)
    things: list[Thing] = []
    _populate_roadside(rng, road, lay, kind, flags, things)
    _populate_street(rng, road, lay, kind, flags, rates, place, things)
    _populate_skyline(rng, kind, flags, s_start, things)
    return lay, things


def camera(rng: np.random.Generator, style: Style, height: int, width: int) -> tuple:
    """Camera height, focal length (px) and horizon row for one image."""
    cam_h = float(rng.uniform(*style.cam_height))
    fov = math.radians(float(rng.uniform(*style.hfov_deg)))
    focal = (width / 2) / math.tan(fov / 2)
    horizon = float(rng.uniform(*style.horizon)) * height
    return cam_h, focal, horizon


def make_scene(rng: np.random.Generator, style: Style, height: int, width: int) -> Scene:
    """A random still scene in the style's camera and scene-type mix."""
    kind = SCENE_TYPES[int(rng.choice(len(SCENE_TYPES), p=style.scene_mix))]
    cam_h, focal, horizon = camera(rng, style, height, width)
    road = make_road(rng, kind, still=True)
    scene = Scene(height, width, cam_h, focal, horizon, road, kind)
    place = Placer(ZMIN_OBJ + 1, FAR, road.cam_d, (width / 2) / focal)
    lay, things = populate_zone(rng, road, kind, place, s_start=-5.0)
    scene.layouts.append(lay)
    scene.things.extend(things)
    scene.sun = float(rng.uniform(0, 2 * math.pi))
    scene.sun_strength = float(rng.uniform(0.1, 0.35))
    return scene
