"""Procedural street scenes with a GTA5-like source style and a Cityscapes-like target style.

A scene is built in road coordinates and projected through a pinhole camera over a flat ground
plane (`world`, `populate`); everything is painted far to near into one canvas of paint indices
whose colour, trainId and texture come from the style (`styles`, `painter`, `ground`, `things`),
so the label is pixel-exact; the canvas is then finished flat (source) or with a camera look
(target: textures, lighting, blur, noise, vignette, ego hood) (`appearance`, `render`). Videos
drive along one road populated zone by zone (`video`).
"""

from adapt_deploy.data.synthetic.populate import make_scene
from adapt_deploy.data.synthetic.render import (
    class_presence,
    ego_vehicle_mask,
    image_rng,
    render_image,
)
from adapt_deploy.data.synthetic.styles import (
    ABSENT_CLASSES,
    SCENE_TYPES,
    SOURCE_STYLE,
    STYLES,
    TARGET_STYLE,
    Style,
    get_style,
)
from adapt_deploy.data.synthetic.video import (
    DEFAULT_SCHEDULE,
    Segment,
    render_video,
    scale_schedule,
)
from adapt_deploy.data.synthetic.world import Layout, Road, Scene, Thing

__all__ = [
    "ABSENT_CLASSES",
    "DEFAULT_SCHEDULE",
    "SCENE_TYPES",
    "SOURCE_STYLE",
    "STYLES",
    "TARGET_STYLE",
    "Layout",
    "Road",
    "Scene",
    "Segment",
    "Style",
    "Thing",
    "class_presence",
    "ego_vehicle_mask",
    "get_style",
    "image_rng",
    "make_scene",
    "render_image",
    "render_video",
    "scale_schedule",
]
