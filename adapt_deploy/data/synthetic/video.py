"""Videos: a drive along one road, populated zone by zone, styled and corrupted per schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from adapt_deploy.data.corruptions import CORRUPTIONS, apply_corruption
from adapt_deploy.data.synthetic.appearance import finish
from adapt_deploy.data.synthetic.populate import Placer, camera, make_road, populate_zone
from adapt_deploy.data.synthetic.render import paint_scene
from adapt_deploy.data.synthetic.styles import SCENE_TYPES, TARGET_STYLE, Style, get_style
from adapt_deploy.data.synthetic.world import ALONG_ROAD, FAR, ZMIN_OBJ, Scene

_VIDEO_CODE = 3

# (start_frame, style, corruption or None, severity): the default 300-frame drive.
Segment = tuple[int, str, "str | None", int]
DEFAULT_SCHEDULE: tuple[Segment, ...] = (
    (0, "target", None, 0),
    (50, "target", "fog", 3),
    (100, "target", "night", 2),
    (150, "target", "rain", 4),
    (200, "target", "snow", 2),
    (250, "target", None, 0),
)
_DEFAULT_SCHEDULE_FRAMES = 300


def scale_schedule(schedule: Sequence[Segment], num_frames: int, reference: int) -> list[Segment]:
    """Stretch a schedule written for `reference` frames to `num_frames` frames."""
    return [(round(s * num_frames / reference), st, c, v) for s, st, c, v in schedule]


def _check_schedule(schedule: Sequence[Segment]) -> list[Segment]:
    """Validate a schedule: sorted start frames, known styles, known corruptions."""
    out = sorted(((int(s), st, c, int(v)) for s, st, c, v in schedule), key=lambda seg: seg[0])
    if not out or out[0][0] != 0:
        raise ValueError("a schedule needs a segment starting at frame 0")
    for _, st, c, v in out:
        get_style(st)
        if c is not None and c not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {c!r}; expected one of {CORRUPTIONS} or None")
        if c is not None and not 1 <= v <= 5:
            raise ValueError(f"severity must be 1..5, got {v}")
    return out


def _segment_at(schedule: list[Segment], frame: int) -> Segment:
    """The schedule segment active at `frame`."""
    current = schedule[0]
    for seg in schedule:
        if seg[0] <= frame:
            current = seg
    return current


class VideoWorld:
    """A road that is populated zone by zone as the camera drives along it."""

    ZONE = 150.0

    def __init__(self, seed: int, video: int, style: Style, height: int, width: int) -> None:
        self.seed, self.video = seed, video
        rng = np.random.default_rng([seed, _VIDEO_CODE, video])
        self.kinds_p = style.scene_mix
        kind = SCENE_TYPES[int(rng.choice(len(SCENE_TYPES), p=self.kinds_p))]
        cam_h, focal, horizon = camera(rng, style, height, width)
        road = make_road(rng, "downtown" if kind == "highway" else kind, still=False)
        road.curv_amp = float(rng.uniform(0.001, 0.003))
        self.scene = Scene(height, width, cam_h, focal, horizon, road, kind)
        self.scene.sun = float(rng.uniform(0, 2 * math.pi))
        self.scene.sun_strength = float(rng.uniform(0.1, 0.3))
        self.spawned = 0  # number of zones populated

    def ensure(self, s_cam: float) -> None:
        """Populate zones up to FAR ahead and drop what the camera has left behind."""
        while self.spawned * self.ZONE < s_cam + FAR:
            z = self.spawned
            rng = np.random.default_rng([self.seed, _VIDEO_CODE, self.video, z + 1])
            kind = SCENE_TYPES[int(rng.choice(len(SCENE_TYPES), p=self.kinds_p))]
            if kind == "highway":
                kind = "suburb"  # one road per video: keep lanes believable
            s0 = z * self.ZONE
            place = Placer(s0 if z else ZMIN_OBJ + 1, s0 + self.ZONE)
            lay, things = populate_zone(rng, self.scene.road, kind, place, s_start=s0)
            self.scene.layouts.append(lay)
            self.scene.things.extend(things)
            self.spawned += 1
        self.scene.layouts = [la for la in self.scene.layouts if la.s1 > s_cam]
        self.scene.things = [
            t
            for t in self.scene.things
            if t.s + (t.size[0] if t.kind in ALONG_ROAD else 0) > s_cam - 5
            and not (t.layer == 0 and t.s - s_cam < 100)
        ]

    def advance(self, dt: float) -> None:
        """Move the things that move on their own."""
        for t in self.scene.things:
            if t.speed:
                t.s += t.speed * dt


def render_video(
    seed: int,
    num_frames: int,
    height: int,
    width: int,
    schedule: Sequence[Segment] | None = None,
    *,
    video: int = 0,
    fps: float = 15.0,
    speed: float = 9.0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Frames (RGB, trainIds) of a drive along one road, styled and corrupted per `schedule`.

    `schedule` is a sequence of (start_frame, style, corruption or None, severity); None means
    DEFAULT_SCHEDULE stretched to `num_frames`. The camera moves forward at `speed` m/s, objects
    approach and pass, cars, riders and pedestrians move on their own.
    """
    if schedule is None:
        schedule = scale_schedule(DEFAULT_SCHEDULE, num_frames, _DEFAULT_SCHEDULE_FRAMES)
    sched = _check_schedule(schedule)
    base = VideoWorld(seed, video, TARGET_STYLE, height, width)
    dt = 1.0 / fps
    for frame in range(num_frames):
        _, style_name, corruption, severity = _segment_at(sched, frame)
        style = get_style(style_name)
        s_cam = frame * dt * speed
        base.ensure(s_cam)
        scene = base.scene
        if style_name != "target":
            scene = _restyled(base.scene, style)
        rng = np.random.default_rng([seed, _VIDEO_CODE, video, 1 << 20, frame])
        pt = paint_scene(scene, style, s_cam)
        image, label = finish(pt, scene, style, rng)
        if corruption is not None:
            image = apply_corruption(image, corruption, severity, rng)
        yield image, label
        base.advance(dt)


def _restyled(scene: Scene, style: Style) -> Scene:
    """The same world seen through another style's camera (height, FOV, horizon mid-range)."""
    h = sum(style.cam_height) / 2
    fov = math.radians(sum(style.hfov_deg) / 2)
    focal = (scene.width / 2) / math.tan(fov / 2)
    horizon = sum(style.horizon) / 2 * scene.height
    return Scene(
        scene.height,
        scene.width,
        h,
        focal,
        horizon,
        scene.road,
        scene.kind,
        scene.layouts,
        scene.things,
        scene.sun,
        scene.sun_strength,
    )
