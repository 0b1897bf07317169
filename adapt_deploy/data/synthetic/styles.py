"""The domains' looks: materials (colour, trainId, texture per paint) and the Style records.

The source style is game-like (saturated, flat); the target style is camera-like (muted,
textured), seen through another camera, and a few classes change appearance outright, so the
domain gap has a global and a class-level part. A second, SYNTHIA-like source (`synthia`, written
only with `adapt-deploy synth --sources gta5,synthia`) is another game: pastel and cool, seen
from a high, wide camera, with its own car, clothing and sign colours.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapt_deploy.labels import CLASS_NAMES, IGNORE_INDEX

STYLES: tuple[str, ...] = ("source", "target")
SCENE_TYPES: tuple[str, ...] = ("downtown", "residential", "suburb", "highway")
# Classes never drawn (present in the label set, absent from the benchmark on purpose).
ABSENT_CLASSES: tuple[int, ...] = tuple(
    CLASS_NAMES.index(n) for n in ("truck", "bus", "train", "motorcycle")
)

_C = {name: i for i, name in enumerate(CLASS_NAMES)}

# material -> (trainId, texture kind)
MATERIALS: dict[str, tuple[int, str]] = {
    "sky": (_C["sky"], "sky"),
    "road": (_C["road"], "asphalt"),
    "marking": (_C["road"], "grain"),
    "sidewalk": (_C["sidewalk"], "paving"),
    "kerb": (_C["sidewalk"], "concrete"),
    "facade": (_C["building"], "brick"),
    "facade_side": (_C["building"], "brick"),
    "window": (_C["building"], "grain"),
    "wall": (_C["wall"], "concrete"),
    "fence": (_C["fence"], "grain"),
    "fence_mesh": (_C["fence"], "grain"),
    "pole": (_C["pole"], "grain"),
    "tl_box": (_C["traffic light"], "grain"),
    "tl_lamp": (_C["traffic light"], "none"),
    "tl_plate": (_C["traffic light"], "grain"),
    "sign": (_C["traffic sign"], "grain"),
    "sign_rim": (_C["traffic sign"], "grain"),
    "leaf": (_C["vegetation"], "leaf"),
    "trunk": (_C["vegetation"], "concrete"),
    "hedge": (_C["vegetation"], "leaf"),
    "terrain": (_C["terrain"], "grass"),
    "shirt": (_C["person"], "grain"),
    "pants": (_C["person"], "grain"),
    "skin": (_C["person"], "none"),
    "rider_shirt": (_C["rider"], "grain"),
    "rider_pants": (_C["rider"], "grain"),
    "helmet": (_C["rider"], "none"),
    "car": (_C["car"], "grain"),
    "car_side": (_C["car"], "grain"),
    "car_glass": (_C["car"], "none"),
    "tyre": (_C["car"], "none"),
    "car_light": (_C["car"], "none"),
    "bike": (_C["bicycle"], "none"),
    "bike_wheel": (_C["bicycle"], "grain"),
    "hood": (IGNORE_INDEX, "grain"),
    "clutter": (IGNORE_INDEX, "concrete"),
}

# Game-like source: saturated, flat.
_SOURCE_COLOURS: dict[str, tuple[int, int, int]] = {
    "sky": (90, 170, 255), "road": (84, 72, 96), "marking": (250, 250, 250),
    "sidewalk": (215, 180, 140), "kerb": (235, 215, 190), "facade": (178, 100, 66),
    "facade_side": (140, 78, 52), "window": (60, 200, 235), "wall": (215, 205, 110),
    "fence": (150, 95, 40), "pole": (55, 55, 70), "tl_box": (240, 200, 20),
    "tl_lamp": (255, 40, 20), "sign": (30, 80, 230), "sign_rim": (250, 250, 250),
    "leaf": (40, 160, 40), "trunk": (110, 70, 30), "hedge": (30, 135, 50),
    "terrain": (175, 205, 60), "shirt": (230, 40, 90), "pants": (40, 40, 150),
    "skin": (245, 190, 150), "rider_shirt": (255, 130, 0), "rider_pants": (20, 20, 20),
    "helmet": (255, 255, 0), "car": (210, 25, 35), "car_side": (170, 20, 30),
    "car_glass": (30, 30, 60), "tyre": (15, 15, 15), "car_light": (255, 230, 120),
    "bike": (0, 210, 210), "hood": (0, 0, 0), "clutter": (120, 120, 120),
    "tl_plate": (30, 30, 30), "fence_mesh": (120, 85, 50), "bike_wheel": (25, 105, 105),
}  # fmt: skip

# Camera-like target: the source palette seen through another camera (desaturated, lower
# contrast, a warm cast), so every class keeps its own colour and no target class looks like a
# *different* source class; a few classes also change appearance outright (real-world car and
# clothing colours, traffic lights and signs of another country), which only target supervision
# or adaptation can bridge.
_TARGET_OVERRIDES: dict[str, tuple[int, int, int]] = {
    "car": (40, 44, 56), "car_side": (32, 35, 45), "shirt": (70, 62, 80), "pants": (44, 44, 52),
    "rider_shirt": (40, 90, 150), "tl_box": (38, 40, 36), "tl_lamp": (90, 230, 120),
    "sign": (205, 200, 40), "sign_rim": (180, 40, 40), "bike": (150, 40, 40),
}  # fmt: skip

# Classes whose target appearance changes outright (not only through the camera tone).
RECOLOURED_CLASSES: tuple[str, ...] = tuple(
    sorted({CLASS_NAMES[MATERIALS[m][0]] for m in _TARGET_OVERRIDES}, key=CLASS_NAMES.index)
)


def _camera_tone(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A source colour as the target camera sees it: half the saturation, 3/4 of the contrast."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    tint = (8.0, 2.0, -10.0)
    out = (36.0 + 0.75 * (lum + 0.5 * (c - lum)) + t for c, t in zip(rgb, tint, strict=True))
    return tuple(int(min(255.0, max(0.0, round(v)))) for v in out)  # type: ignore[return-value]


_TARGET_COLOURS: dict[str, tuple[int, int, int]] = {
    name: _TARGET_OVERRIDES.get(name, _camera_tone(rgb)) for name, rgb in _SOURCE_COLOURS.items()
}

# Per-instance colour variants for a few materials (the first entry of the colour table is
# used for the others).
_SOURCE_VARIANTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "car": ((210, 25, 35), (30, 60, 210), (235, 120, 20), (150, 25, 170)),
    "shirt": ((230, 40, 90), (240, 90, 160), (200, 30, 200)),
    "facade": ((178, 100, 66), (190, 120, 80), (165, 90, 60)),
}
_TARGET_VARIANTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "car": ((40, 44, 56), (200, 200, 204), (130, 134, 140), (110, 28, 32), (32, 48, 92)),
    "shirt": ((70, 62, 80), (160, 150, 130), (40, 40, 44), (120, 40, 40)),
    "facade": tuple(_camera_tone(c) for c in _SOURCE_VARIANTS["facade"]),
}

TEXTURES: tuple[str, ...] = (
    "none", "grain", "asphalt", "paving", "brick", "leaf", "grass", "concrete", "sky",
)  # fmt: skip


@dataclass(frozen=True)
class Style:
    """Camera, scene mix and appearance of one domain."""

    name: str
    cam_height: tuple[float, float]
    hfov_deg: tuple[float, float]
    horizon: tuple[float, float]  # horizon row as a fraction of the image height
    scene_mix: tuple[float, ...]  # probabilities of SCENE_TYPES
    colours: dict[str, tuple[int, int, int]]
    variants: dict[str, tuple[tuple[int, int, int], ...]]
    jitter: float  # per-instance colour jitter amplitude
    camera_like: bool  # textures, lighting, blur, noise, vignette, hood


SOURCE_STYLE = Style(
    "source", (1.5, 2.0), (76.0, 90.0), (0.44, 0.52), (0.40, 0.15, 0.20, 0.25),
    _SOURCE_COLOURS, _SOURCE_VARIANTS, 14.0, False,
)  # fmt: skip
TARGET_STYLE = Style(
    "target", (1.1, 1.3), (50.0, 60.0), (0.38, 0.44), (0.30, 0.35, 0.25, 0.10),
    _TARGET_COLOURS, _TARGET_VARIANTS, 10.0, True,
)  # fmt: skip


def _synthia_tone(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A source colour as the SYNTHIA-like game paints it: 0.7 of the saturation, brighter
    (pastel) and cooler."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    tint = (-8.0, 4.0, 16.0)
    out = (50.0 + 0.8 * (lum + 0.7 * (c - lum)) + t for c, t in zip(rgb, tint, strict=True))
    return tuple(int(min(255.0, max(0.0, round(v)))) for v in out)  # type: ignore[return-value]


_SYNTHIA_OVERRIDES: dict[str, tuple[int, int, int]] = {
    "car": (225, 225, 230), "car_side": (190, 190, 198), "shirt": (90, 200, 120),
    "pants": (120, 90, 60), "sign": (240, 240, 240), "sign_rim": (220, 30, 30),
    "bike": (240, 200, 0),
}  # fmt: skip
_SYNTHIA_COLOURS: dict[str, tuple[int, int, int]] = {
    name: _SYNTHIA_OVERRIDES.get(name, _synthia_tone(rgb)) for name, rgb in _SOURCE_COLOURS.items()
}
_SYNTHIA_VARIANTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "car": ((225, 225, 230), (60, 110, 200), (40, 160, 150), (250, 210, 60)),
    "shirt": ((90, 200, 120), (250, 240, 110), (120, 130, 240)),
    "facade": tuple(_synthia_tone(c) for c in _SOURCE_VARIANTS["facade"]),
}
# SYNTHIA-RAND's cameras: higher and wider than a dashcam, horizon higher up; mostly city.
SYNTHIA_STYLE = Style(
    "synthia", (2.6, 4.0), (84.0, 100.0), (0.30, 0.40), (0.55, 0.25, 0.15, 0.05),
    _SYNTHIA_COLOURS, _SYNTHIA_VARIANTS, 18.0, False,
)  # fmt: skip
_STYLE_BY_NAME = {"source": SOURCE_STYLE, "target": TARGET_STYLE, "synthia": SYNTHIA_STYLE}
# Every domain get_style knows: the benchmark's two (STYLES) and the optional second source.
DOMAINS: tuple[str, ...] = tuple(_STYLE_BY_NAME)


def get_style(domain: str) -> Style:
    """The Style of `domain`; raises ValueError naming the allowed values."""
    if domain not in _STYLE_BY_NAME:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return _STYLE_BY_NAME[domain]
