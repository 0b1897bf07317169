"""Drawing the things of a scene: buildings, walls, fences, poles, lights, signs, trees,
cars, pedestrians, bicycles with riders and clutter."""

from __future__ import annotations

import math
from itertools import pairwise

import cv2
import numpy as np

from adapt_deploy.data.synthetic.painter import Painter, View, thick, vquad
from adapt_deploy.data.synthetic.world import ALONG_ROAD, ZMIN, ZMIN_OBJ, Thing


def _draw_building(pt: Painter, view: View, t: Thing) -> None:
    """A facade along the road with a window grid and its near end face."""
    length, height, density = t.size
    side = 1 if t.d > 0 else -1
    s0 = max(t.s, view.s_cam + ZMIN)
    s1 = t.s + length
    if s1 <= s0:
        return
    facade = pt.paint("facade", t.jit, t.variant)
    # long facades are split so the chord follows the road's bend
    n = max(1, int((s1 - s0) / 12))
    edges = np.linspace(s0, s1, n + 1)
    for a, b in pairwise(edges):
        pt.convex(vquad(view, t.d, a, t.d, b, 0, height), facade)
    if t.s >= view.s_cam + ZMIN:
        pt.convex(
            vquad(view, t.d, t.s, t.d + side * 12, t.s, 0, height),
            pt.paint("facade_side", t.jit, t.variant),
        )
    if view.scale(t.s) * 1.2 < 1.5 and view.scale(s1) < 1.5:
        return
    col = np.arange(t.s + 1.0, s1 - 1.5, 3.0)
    col = col[col > view.s_cam + 1.0]
    floors = np.arange(1.2 if density > 0.5 else 3.5, height - 1.5, 3.2)
    if not len(col) or not len(floors):
        return
    sa, y0 = np.meshgrid(col, floors)
    sb, y1 = sa + 1.2 + density, y0 + 1.6
    s = np.stack([sa, sa, sb, sb], -1).reshape(-1, 4)
    y = np.stack([y0, y1, y1, y0], -1).reshape(-1, 4)
    pt.polys(view.pts(np.full_like(s, t.d), y, s), pt.paint("window", t.jit))


def _draw_block(pt: Painter, view: View, t: Thing) -> None:
    """A distant building block of the skyline (a flat rectangle facing the camera)."""
    width, height = t.size
    pt.convex(
        vquad(view, t.d, t.s, t.d + width, t.s, 0, height),
        pt.paint("facade_side", t.jit, t.variant),
    )


def _draw_treeline(pt: Painter, view: View, t: Thing) -> None:
    """A distant tree line: a band with a bumpy top."""
    width, height = t.size
    p = pt.paint("leaf", t.jit)
    k = view.scale(t.s)
    a = view.pt(t.d, 0, t.s)
    b = view.pt(t.d + width, height * 0.6, t.s)
    cv2.rectangle(pt.canvas, a, b, p, -1)
    for i in range(5):
        c = view.pt(t.d + width * (0.1 + 0.2 * i), height * 0.6, t.s)
        cv2.circle(pt.canvas, c, max(1, int(k * height * (0.3 + 0.1 * (i % 2)))), p, -1)


def _draw_wall(pt: Painter, view: View, t: Thing, material: str) -> None:
    """A wall or hedge along the road: front face and top."""
    length, height = t.size
    s0 = max(t.s, view.s_cam + ZMIN)
    s1 = t.s + length
    if s1 <= s0:
        return
    side = 1 if t.d > 0 else -1
    p = pt.paint(material, t.jit)
    n = max(1, int((s1 - s0) / 12))
    edges = np.linspace(s0, s1, n + 1)
    depth = 0.3 if material == "wall" else 0.9
    for a, b in pairwise(edges):
        pt.convex(vquad(view, t.d, a, t.d, b, 0, height), p)
        top = [
            view.pt(t.d, height, a),
            view.pt(t.d + side * depth, height, a),
            view.pt(t.d + side * depth, height, b),
            view.pt(t.d, height, b),
        ]
        pt.convex(top, p)


def _draw_fence(pt: Painter, view: View, t: Thing) -> None:
    """A fence: posts and rails with a diagonal lattice (variant 0) or a mesh panel (else)."""
    length, height = t.size
    s1 = t.s + length
    s0 = max(t.s, view.s_cam + 1.0)
    if s1 <= s0:
        return
    p = pt.paint("fence", t.jit)
    low = 0.1 * height
    if t.variant:
        mesh = pt.paint("fence_mesh", t.jit)
        n = max(1, int((s1 - s0) / 12))
        for a, b in pairwise(np.linspace(s0, s1, n + 1)):
            pt.convex(vquad(view, t.d, a, t.d, b, low, height), mesh)
    posts = np.arange(math.ceil(s0 / 2.5) * 2.5, s1, 2.5)
    lines = [(view.pt(t.d, 0, s), view.pt(t.d, height, s), view.scale(s) * 0.12) for s in posts]
    rails = np.linspace(s0, s1, max(2, int((s1 - s0) / 2.5) + 1))
    for a, b in pairwise(rails):
        k = view.scale(0.5 * (a + b)) * 0.07
        for y in (low, height):
            lines.append((view.pt(t.d, y, a), view.pt(t.d, y, b), k))
        if not t.variant:
            lines.append((view.pt(t.d, low, a), view.pt(t.d, height, b), k * 0.8))
            lines.append((view.pt(t.d, height, a), view.pt(t.d, low, b), k * 0.8))
    for a, b, k in lines:
        cv2.line(pt.canvas, a, b, p, max(1, min(40, int(k + 0.5))))


def _draw_pole(pt: Painter, view: View, t: Thing) -> None:
    """A street pole, tapering upwards, sometimes with a lamp arm."""
    height, lamp = t.size
    k = view.scale(t.s)
    p = pt.paint("pole", t.jit)
    mid, top = view.pt(t.d, 0.5 * height, t.s), view.pt(t.d, height, t.s)
    cv2.line(pt.canvas, view.pt(t.d, 0, t.s), mid, p, thick(k, 0.22))
    cv2.line(pt.canvas, mid, top, p, thick(k, 0.15))
    if lamp:
        side = 1 if t.d > 0 else -1
        end = view.pt(t.d - side * 1.8, height + 0.3, t.s)
        cv2.line(pt.canvas, top, end, p, thick(k, 0.12))
        cv2.line(pt.canvas, end, view.pt(t.d - side * 2.3, height + 0.2, t.s), p, thick(k, 0.22))


def _draw_light(pt: Painter, view: View, t: Thing) -> None:
    """A traffic light on a pole (the pole is labelled pole), optionally on an arm: a back plate,
    a housing and three lamps."""
    height, arm = t.size
    k = view.scale(t.s)
    pole = pt.paint("pole", t.jit)
    side = 1 if t.d > 0 else -1
    top = view.pt(t.d, height, t.s)
    cv2.line(pt.canvas, view.pt(t.d, 0, t.s), top, pole, thick(k, 0.2))
    if arm:
        cx = t.d - side * arm
        a, b = view.pt(t.d, height - 0.2, t.s), view.pt(cx, height - 0.2, t.s)
        cv2.line(pt.canvas, a, b, pole, thick(k, 0.14))
        y0 = height - 1.3
    else:
        y0 = height - 1.5
        cx = t.d - side * 0.35
    plate = pt.paint("tl_plate", t.jit)
    a, b = view.pt(cx - 0.32, y0 - 0.12, t.s), view.pt(cx + 0.32, y0 + 1.12, t.s)
    cv2.rectangle(pt.canvas, a, b, plate, -1)
    box = pt.paint("tl_box", t.jit)
    a, b = view.pt(cx - 0.19, y0, t.s), view.pt(cx + 0.19, y0 + 1.0, t.s)
    cv2.rectangle(pt.canvas, a, b, box, -1)
    if k * 0.12 >= 1:
        lamp = pt.paint("tl_lamp")
        for i in range(3):
            c = view.pt(cx, y0 + 0.18 + 0.32 * i, t.s)
            cv2.circle(pt.canvas, c, max(1, int(k * 0.12)), lamp, -1)


def _sign_face(pt: Painter, c: tuple[int, int], r: int, shape: int, rim: int, face: int) -> None:
    """One sign face of half-size `r` px around `c`: round, triangular, square or a wide panel."""
    if shape == 0:
        cv2.circle(pt.canvas, c, r, rim, -1)
        cv2.circle(pt.canvas, c, max(1, int(r * 0.75)), face, -1)
    elif shape == 1:
        tri = [(c[0], c[1] - r), (c[0] - r, c[1] + int(0.7 * r)), (c[0] + r, c[1] + int(0.7 * r))]
        pt.convex(tri, rim)
        if r > 3:
            inner = [
                (c[0], c[1] - r // 2),
                (c[0] - r // 2, c[1] + r // 3),
                (c[0] + r // 2, c[1] + r // 3),
            ]
            pt.convex(inner, face)
    elif shape == 2:
        cv2.rectangle(pt.canvas, (c[0] - r, c[1] - r), (c[0] + r, c[1] + r), face, -1)
    else:
        h = max(1, int(0.6 * r))
        cv2.rectangle(pt.canvas, (c[0] - r, c[1] - h), (c[0] + r, c[1] + h), rim, -1)
        b = max(1, r // 8)
        cv2.rectangle(
            pt.canvas, (c[0] - r + b, c[1] - h + b), (c[0] + r - b, c[1] + h - b), face, -1
        )


def _draw_sign(pt: Painter, view: View, t: Thing) -> None:
    """A traffic sign on a pole (labelled pole); `size` holds the height of the lower edge of the
    face, the face size and the size of a second face below it (0: none)."""
    height, size, second = t.size
    k = view.scale(t.s)
    top = view.pt(t.d, height + 0.5 * size, t.s)
    cv2.line(pt.canvas, view.pt(t.d, 0, t.s), top, pt.paint("pole", t.jit), thick(k, 0.1))
    rim, face = pt.paint("sign_rim", t.jit), pt.paint("sign", t.jit)
    shape = 3 if size > 1.1 else t.variant % 4
    _sign_face(
        pt, view.pt(t.d, height + size / 2, t.s), max(1, int(k * size / 2)), shape, rim, face
    )
    if second:
        c = view.pt(t.d, height - 0.05 - second / 2, t.s)
        _sign_face(pt, c, max(1, int(k * second / 2)), 3 - t.variant % 2, rim, face)


def _draw_tree(pt: Painter, view: View, t: Thing) -> None:
    """A tree: a trunk and overlapping canopy blobs (all labelled vegetation)."""
    trunk, radius, blobs = t.size
    k = view.scale(t.s)
    cv2.line(
        pt.canvas,
        view.pt(t.d, 0, t.s),
        view.pt(t.d, trunk + radius * 0.5, t.s),
        pt.paint("trunk", t.jit),
        thick(k, 0.3),
    )
    leaf = pt.paint("leaf", t.jit)
    g = np.random.default_rng(t.variant)
    offs = g.uniform(-1.0, 1.0, (int(blobs), 3))
    for dx, dy, dr in offs:
        c = view.pt(t.d + dx * radius * 0.6, trunk + radius * (1 + 0.5 * dy), t.s)
        cv2.circle(pt.canvas, c, max(1, int(k * radius * (0.7 + 0.2 * dr))), leaf, -1)


def _draw_car(pt: Painter, view: View, t: Thing) -> None:
    """A car seen from behind or in front: side face, back face, cabin, windows, wheels."""
    width, length, height = t.size
    s0 = t.s
    s1 = s0 + length
    body = pt.paint("car", t.jit, t.variant)
    side_p = pt.paint("car_side", t.jit, t.variant)
    glass = pt.paint("car_glass", t.jit)
    tyre = pt.paint("tyre")
    x_cam = view.x(t.d, s0 - view.s_cam)
    sd = -1 if x_cam > 0 else 1  # the side facing the camera axis
    d_side = t.d + sd * width / 2
    belt = height * 0.55
    pt.convex(vquad(view, d_side, s0, d_side, s1, 0.25, belt), side_p)
    pt.convex(
        vquad(view, d_side + sd * -0.15, s0 + 0.9, d_side + sd * -0.15, s1 - 0.8, belt, height),
        glass,
    )
    k = view.scale(s0)
    for sw in (s0 + 0.8, s1 - 0.8):
        c = view.pt(d_side, 0.33, sw)
        kk = view.scale(sw)
        cv2.ellipse(
            pt.canvas, c, (max(1, int(kk * 0.12)), max(1, int(kk * 0.33))), 0, 0, 360, tyre, -1
        )
    left, right = t.d - width / 2, t.d + width / 2
    cv2.rectangle(pt.canvas, view.pt(left, 0.0, s0), view.pt(right, 0.3, s0), tyre, -1)
    pt.convex(vquad(view, left, s0, right, s0, 0.2, belt), body)
    cab = [
        view.pt(left + 0.12, belt, s0 + 0.5),
        view.pt(left + 0.3, height, s0 + 1.1),
        view.pt(right - 0.3, height, s0 + 1.1),
        view.pt(right - 0.12, belt, s0 + 0.5),
    ]
    pt.convex(cab, body)
    if k * 0.2 >= 1.5:
        win = [
            view.pt(left + 0.25, belt + 0.06, s0 + 0.55),
            view.pt(left + 0.38, height - 0.08, s0 + 1.05),
            view.pt(right - 0.38, height - 0.08, s0 + 1.05),
            view.pt(right - 0.25, belt + 0.06, s0 + 0.55),
        ]
        pt.convex(win, glass)
        light = pt.paint("car_light")
        for x0 in (left + 0.1, right - 0.35):
            cv2.rectangle(
                pt.canvas,
                view.pt(x0, belt - 0.25, s0),
                view.pt(x0 + 0.25, belt - 0.1, s0),
                light,
                -1,
            )


def _draw_person(pt: Painter, view: View, t: Thing) -> None:
    """A pedestrian: legs, torso, arms and head."""
    (height,) = t.size
    k = view.scale(t.s)
    if k * height < 4:
        return
    shirt = pt.paint("shirt", t.jit, t.variant)
    pants = pt.paint("pants", t.jit)
    head = pt.paint("skin", t.jit)
    u, v0 = view.pt(t.d, 0, t.s)
    h = k * height
    hip = 0.53 * h
    phase = (t.s * 2.0) % 2.0 - 1.0  # walking phase from position: legs swing as it moves
    step = int(0.12 * h * phase)
    leg = max(1, int(0.08 * h))
    cv2.line(pt.canvas, (u, v0 - int(hip)), (u - step, v0), pants, leg)
    cv2.line(pt.canvas, (u, v0 - int(hip)), (u + step, v0), pants, leg)
    tw = max(1, int(0.13 * h))
    cv2.rectangle(pt.canvas, (u - tw, v0 - int(0.83 * h)), (u + tw, v0 - int(hip) + 1), shirt, -1)
    arm = max(1, int(0.055 * h))
    for sgn in (-1, 1):
        cv2.line(
            pt.canvas,
            (u + sgn * tw, v0 - int(0.8 * h)),
            (u + sgn * (tw + step // 3), v0 - int(0.5 * h)),
            shirt,
            arm,
        )
    cv2.circle(pt.canvas, (u, v0 - int(0.91 * h)), max(1, int(0.075 * h)), head, -1)


_WHEEL = np.linspace(0.0, 2 * math.pi, 14, endpoint=False)
_WHEEL_S, _WHEEL_Y = 0.34 * np.cos(_WHEEL), 0.34 + 0.34 * np.sin(_WHEEL)


def _draw_bicycle(pt: Painter, view: View, t: Thing) -> None:
    """A bicycle along the road: wheels (the spoked disc is labelled bicycle, as annotators
    draw it), frame and handlebar; the rider of a "rider" thing sits on it."""
    s0 = t.s
    bike = pt.paint("bike", t.jit)
    spokes = pt.paint("bike_wheel", t.jit)
    k = view.scale(s0)
    hubs = []
    for sw in (s0 + 1.05, s0):
        ring = view.pts(np.full(len(_WHEEL), t.d), _WHEEL_Y, sw + _WHEEL_S)
        pt.convex(ring, spokes)
        cv2.polylines(pt.canvas, [ring], True, bike, thick(view.scale(sw), 0.06))
        hubs.append(view.pt(t.d, 0.34, sw))
    seat = view.pt(t.d, 0.9, s0 + 0.3)
    bar = view.pt(t.d, 1.0, s0 + 0.9)
    w = thick(k, 0.05)
    for a, b in ((hubs[1], seat), (seat, bar), (bar, hubs[0]), (seat, hubs[0]), (hubs[1], bar)):
        cv2.line(pt.canvas, a, b, bike, w)
    cv2.line(pt.canvas, view.pt(t.d - 0.25, 1.05, s0 + 0.9), view.pt(t.d + 0.25, 1.05, s0 + 0.9),
             bike, w)  # fmt: skip
    if t.kind == "rider":
        _draw_rider(pt, view, t, s0 + 0.35)


def _draw_rider(pt: Painter, view: View, t: Thing, s: float) -> None:
    """A cyclist seated on the saddle at distance `s`: leg to the pedal, torso, arms, helmet."""
    k = view.scale(s)
    h = k * t.size[0]
    if h < 4:
        return
    shirt = pt.paint("rider_shirt", t.jit, t.variant)
    pants = pt.paint("rider_pants", t.jit)
    helmet = pt.paint("helmet", t.jit)
    u, v0 = view.pt(t.d, 0.45, s)  # the figure's feet level when seated
    leg = max(1, int(0.085 * h))
    hip = (u, v0 - int(0.12 * h))
    for ds in (0.15, 0.45):
        cv2.line(pt.canvas, hip, view.pt(t.d, 0.25, s + ds), pants, leg)
    tw = max(1, int(0.14 * h))
    cv2.rectangle(pt.canvas, (u - tw, v0 - int(0.46 * h)), (u + tw, v0 - int(0.08 * h)), shirt, -1)
    hands = view.pt(t.d, 1.0, s + 0.55)
    for sgn in (-1, 1):
        shoulder = (u + sgn * tw, v0 - int(0.42 * h))
        cv2.line(pt.canvas, shoulder, (hands[0] + sgn * tw, hands[1]), shirt, max(1, int(0.06 * h)))
    cv2.circle(pt.canvas, (u, v0 - int(0.54 * h)), max(1, int(0.085 * h)), helmet, -1)


def _draw_clutter(pt: Painter, view: View, t: Thing) -> None:
    """Unlabelled street clutter (bins, boxes): ignored pixels."""
    (size,) = t.size
    p = pt.paint("clutter", t.jit)
    pt.convex(vquad(view, t.d - size / 2, t.s, t.d + size / 2, t.s, 0, size * 1.3), p)


_DRAW = {
    "building": _draw_building,
    "fence": _draw_fence,
    "block": _draw_block,
    "treeline": _draw_treeline,
    "wall": lambda pt, view, t: _draw_wall(pt, view, t, "wall"),
    "hedge": lambda pt, view, t: _draw_wall(pt, view, t, "hedge"),
    "car": _draw_car,
    "person": _draw_person,
    "rider": _draw_bicycle,
    "bicycle": _draw_bicycle,
    "tree": _draw_tree,
    "pole": _draw_pole,
    "light": _draw_light,
    "sign": _draw_sign,
    "clutter": _draw_clutter,
}


def draw_thing(pt: Painter, view: View, t: Thing) -> None:
    """Draw one thing unless it is behind the camera (or, for objects, too near to draw)."""
    if t.kind in ALONG_ROAD:
        if t.s + t.size[0] < view.s_cam + ZMIN:
            return
    elif t.s - view.s_cam < (ZMIN if t.layer == 0 else ZMIN_OBJ):
        return
    _DRAW[t.kind](pt, view, t)
