"""Painting a scene into a canvas and rendering still images of either domain."""

from __future__ import annotations

import cv2
import numpy as np

from adapt_deploy.data.synthetic.appearance import finish
from adapt_deploy.data.synthetic.ground import draw_ground
from adapt_deploy.data.synthetic.painter import Painter, View
from adapt_deploy.data.synthetic.populate import make_scene
from adapt_deploy.data.synthetic.styles import Style, get_style
from adapt_deploy.data.synthetic.things import draw_thing
from adapt_deploy.data.synthetic.world import FAR, Scene, Thing
from adapt_deploy.labels import CLASS_NAMES

DOMAIN_CODES = {"source": 1, "target": 2, "synthia": 3}


def _sort_key(t: Thing, s_cam: float) -> tuple[int, float]:
    """Painter's order: by layer, then far to near."""
    return (t.layer, -(t.s - s_cam))


def _hood_polygon(height: int, width: int) -> np.ndarray:
    """The ego-vehicle hood outline at the bottom of the target camera."""
    xs = np.linspace(-1.0, 1.0, 24)
    ys = height * (0.90 + 0.05 * xs**2)
    pts = np.stack([(xs * 0.62 + 0.5) * width, ys], axis=1)
    pts = np.concatenate([pts, [[width * 1.2, height + 2], [-width * 0.2, height + 2]]])
    return pts.astype(np.int32)


def ego_vehicle_mask(domain: str, height: int, width: int) -> np.ndarray | None:
    """Where the ego vehicle's hood covers an image of `domain` (None: no hood in that domain).
    The hood is painted last, over everything, from this same polygon."""
    if not get_style(domain).camera_like:
        return None
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_hood_polygon(height, width)], 1)
    return mask.astype(bool)


def paint_scene(scene: Scene, style: Style, s_cam: float = 0.0) -> Painter:
    """Paint sky, ground, things and (target) hood for the camera at road distance `s_cam`."""
    pt = Painter(scene.height, scene.width, style)
    road = scene.road
    view = View(
        scene.focal,
        scene.width / 2,
        scene.horizon,
        scene.cam_h,
        -road.cam_d,
        road.yaw,
        road.curv(s_cam),
        s_cam,
    )
    hor = int(scene.horizon)
    pt.canvas[:] = pt.paint("sky")
    pt.canvas[max(hor, 0) :] = pt.paint(scene.layouts[0].outer if scene.layouts else "terrain")
    for lay in sorted(scene.layouts, key=lambda la: -la.s0):
        draw_ground(pt, view, road, lay, s_cam + FAR)
    for t in sorted(scene.things, key=lambda th: _sort_key(th, s_cam)):
        if t.s - s_cam < FAR:
            draw_thing(pt, view, t)
    if style.camera_like:
        pt.poly(_hood_polygon(scene.height, scene.width), pt.paint("hood"))
    return pt


def image_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The generator that fully determines image `index` of `domain` for `seed`."""
    get_style(domain)
    return np.random.default_rng([seed, DOMAIN_CODES[domain], index])


def render_image(
    seed: int, domain: str, index: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `domain`: (RGB uint8 HxWx3, trainIds uint8 HxW, 255 = ignore).

    A pure function of (seed, domain, index, size), so any image can be regenerated alone.
    """
    style = get_style(domain)
    rng = image_rng(seed, domain, index)
    scene = make_scene(rng, style, height, width)
    pt = paint_scene(scene, style)
    return finish(pt, scene, style, rng)


def class_presence(label: np.ndarray) -> np.ndarray:
    """Boolean (19,) vector of the classes present in a trainId label."""
    counts = np.bincount(label.reshape(-1), minlength=256)[: len(CLASS_NAMES)]
    return counts > 0
