"""The ground of one layout: terrain, sidewalks, kerbs, road, cross street and markings."""

from __future__ import annotations

import math

import numpy as np

from adapt_deploy.data.synthetic.painter import Painter, View, depth_samples, strip
from adapt_deploy.data.synthetic.world import LANE_W, ZMIN, Layout, Road, edges


def draw_ground(pt: Painter, view: View, road: Road, lay: Layout, s_far: float) -> None:
    """Terrain, sidewalks, kerbs, road, markings and the cross street of one layout."""
    s0, s1 = max(lay.s0, view.s_cam + ZMIN), min(lay.s1, s_far)
    if s1 <= s0:
        return
    s = depth_samples(view.s_cam, s0, s1)
    big = 400.0
    pt.poly(strip(view, -big, big, s), pt.paint(lay.outer))
    for side in (-1, 1):
        half, kerb, line = edges(road, lay, side)
        i = 0 if side < 0 else 1
        if lay.sidewalk[i] > 0:
            far = line + (big if lay.outer == "sidewalk" else 0.0)
            pt.poly(strip(view, side * kerb, side * far, s, 0.15), pt.paint("sidewalk"))
        if lay.verge[i] > 0:
            pt.poly(strip(view, side * half, side * kerb, s, 0.05), pt.paint("terrain"))
        if lay.sidewalk[i] > 0 or lay.outer == "sidewalk":
            top = view.pts(np.full_like(s, side * kerb), np.full_like(s, 0.15), s)
            bottom = view.pts(np.full_like(s, side * kerb), np.zeros_like(s), s)
            pt.poly(np.concatenate([bottom, top[::-1]]), pt.paint("kerb"))
    pt.poly(strip(view, -road.half, road.half, s), pt.paint("road"))
    if lay.crossing:
        c0, c1 = max(lay.crossing[0], s0), min(lay.crossing[1], s1)
        if c1 > c0:
            cs = depth_samples(view.s_cam, c0, c1, 4)
            pt.poly(strip(view, -big, big, cs)[[0, 3, 4, 7]], pt.paint("road"))
            _draw_zebra(pt, view, road, c0 - 3.5, c0 - 0.5, lay.crossing[0] - 3.5)
    _draw_markings(pt, view, road, s0, min(s1, view.s_cam + 120))


def _draw_zebra(pt: Painter, view: View, road: Road, s0: float, s1: float, anchor: float) -> None:
    """Pedestrian-crossing stripes across the road."""
    if s1 - view.s_cam < ZMIN or anchor < s0 - 10:
        return
    ds = np.arange(-road.half + 0.3, road.half - 0.3, 1.0)
    d = np.stack([ds, ds + 0.5, ds + 0.5, ds], axis=1)
    s = np.array([s0, s0, s1, s1])[None].repeat(len(ds), 0)
    pt.polys(view.pts(d, np.zeros_like(d), s), pt.paint("marking"))


def _draw_markings(pt: Painter, view: View, road: Road, s0: float, s1: float) -> None:
    """Dashed lane dividers (labelled road) and solid edge lines."""
    if s1 <= s0:
        return
    period, dash, w = 9.0, 3.0, 0.08
    start = math.floor(s0 / period) * period
    sa = np.arange(start, s1, period)
    sa = sa[sa + dash > view.s_cam + ZMIN]
    if len(sa):
        sa = np.maximum(sa, view.s_cam + ZMIN)
        sb = np.minimum(sa + dash, s1)
        quads = []
        for k in range(1, road.lanes):
            d = -road.half + k * LANE_W
            w2 = 2 * w if (not road.oneway and k == road.lanes // 2) else w
            dd = np.array([d - w2, d + w2, d + w2, d - w2])
            quads.append((dd, sa, sb))
        if quads:
            d = np.concatenate([np.broadcast_to(q[0], (len(sa), 4)) for q in quads])
            s = np.concatenate([np.stack([q[1], q[1], q[2], q[2]], axis=1) for q in quads])
            pt.polys(view.pts(d, np.zeros_like(d), s), pt.paint("marking"))
    s = depth_samples(view.s_cam, s0, s1, 10)
    p = pt.paint("marking")
    for side in (-1, 1):
        pt.poly(strip(view, side * (road.half - 0.25), side * (road.half - 0.1), s), p)
